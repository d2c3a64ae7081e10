"""The README stays true: its first commands are what CI runs, every flag is documented, its snippet runs."""

from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from finetune import cli
from finetune.quickstart import OWN_FOLDER_COMMANDS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
CI_RUN = (ROOT / ".ci" / "run").read_text()


def _blocks(language: str | None = None) -> list[str]:
    """The README's fenced code blocks, in order (only those of one language when given)."""
    found = re.findall(r"^```(\w*)\n(.*?)^```", README, re.MULTILINE | re.DOTALL)
    return [body for lang, body in found if language is None or lang == language]


def _ci_commands() -> list[str]:
    return [line.strip() for line in CI_RUN.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _install_target(command: str) -> list[str]:
    """What `pip install` is asked for, flags that only change its output left out."""
    words = shlex.split(command)
    words = words[words.index("install") + 1:]
    return [word for word in words if word not in ("--quiet", "-q")]


def test_the_first_command_creates_a_venv_installs_what_ci_installs_and_runs_quickstart():
    first = _blocks()[0].strip()
    assert "\n" not in first, "one line, to copy as it stands"
    steps = first.split(" && ")
    assert steps[0] == "python3 -m venv .venv"
    assert steps[1] == ". .venv/bin/activate"
    assert steps[-1] == "finetune quickstart", "quickstart's defaults must need no flag"
    (ci_install,) = [c for c in _ci_commands() if "pip install" in c and "--upgrade" not in c]
    assert _install_target(steps[2]) == _install_target(ci_install) == ["-e", ".[test]"]


def test_the_test_command_is_the_one_ci_runs():
    second = _blocks()[1].strip()
    assert second == _ci_commands()[-1] == "python -m pytest"


def test_the_commands_quickstart_prints_for_your_own_photos_are_in_the_readme():
    assert "\n".join(OWN_FOLDER_COMMANDS) + "\n" in _blocks("bash")


def test_every_flag_of_every_command_is_documented():
    missing = []
    for command in cli.COMMANDS:
        assert f"finetune {command.name}" in README, command.name
        for spec in dataclasses.fields(command.config):
            if spec.metadata.get("positional"):
                continue
            flag = spec.metadata.get("flag") or "--" + spec.name.replace("_", "-")
            if f"`{flag}" not in README:
                missing.append(f"{command.name} {flag}")
    assert not missing, f"flags the README does not mention: {missing}"


@pytest.mark.slow
def test_the_pb_snippet_runs_with_plain_tensorflow_and_both_inputs_agree(trained_run, tmp_path):
    from finetune.config import ExportConfig
    from finetune.export import export

    (snippet,) = [block for block in _blocks("python") if "import_graph_def" in block]
    export(ExportConfig(train_dir=str(trained_run.train_dir), out=str(tmp_path / "runs" / "flowers" / "model.pb")))
    photo = sorted(trained_run.photos.rglob("*.jpg"))[0]
    shutil.copy(photo, tmp_path / "photo.jpg")
    check = '\nimport sys\nassert "finetune" not in sys.modules and "tf_slim" not in sys.modules\n'
    result = subprocess.run([sys.executable, "-c", snippet + check], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    by_bytes, by_pixels = (line.split() for line in result.stdout.splitlines())
    classes = (tmp_path / "runs" / "flowers" / "model.labels.txt").read_text().split()
    assert by_bytes[0] in classes and by_bytes[0] == by_pixels[0]
    assert float(by_bytes[1]) == pytest.approx(float(by_pixels[1]), abs=0.0015)
