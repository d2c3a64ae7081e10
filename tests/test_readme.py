"""The README stays a true front door: short, its commands are what CI runs, its snippet runs."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.quickstart import OWN_FOLDER_COMMANDS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
WALKTHROUGH = (ROOT / "docs" / "walkthrough.md").read_text()
CI_RUN = (ROOT / ".ci" / "run").read_text()


def _blocks(text: str, language: str | None = None) -> list[str]:
    """The fenced code blocks of a Markdown text, in order (only those of one language when given)."""
    found = re.findall(r"^```(\w*)\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    return [body for lang, body in found if language is None or lang == language]


def _ci_commands() -> list[str]:
    return [line.strip() for line in CI_RUN.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _install_target(command: str) -> list[str]:
    """What `pip install` is asked for, flags that only change its output left out."""
    words = shlex.split(command)
    words = words[words.index("install") + 1:]
    return [word for word in words if word not in ("--quiet", "-q")]


def test_the_readme_stays_short():
    assert len((ROOT / "README.md").read_bytes()) < 12_500, "move detail into docs/ and link to it"


def test_the_first_command_creates_a_venv_installs_what_ci_installs_and_runs_quickstart():
    first = _blocks(README)[0].strip()
    assert "\n" not in first, "one line, to copy as it stands"
    steps = first.split(" && ")
    assert steps[0] == "python3 -m venv .venv"
    assert steps[1] == ". .venv/bin/activate"
    assert steps[-1] == "finetune quickstart", "quickstart's defaults must need no flag"
    (ci_install,) = [c for c in _ci_commands() if "pip install" in c and "--upgrade" not in c]
    assert _install_target(steps[2]) == _install_target(ci_install) == ["-e", ".[test]"]


def test_the_test_command_is_the_one_ci_runs():
    second = _blocks(README)[1].strip()
    assert second == _ci_commands()[-1] == "python -m pytest -n auto --dist loadfile"


def test_the_commands_quickstart_prints_for_your_own_photos_are_in_the_readme():
    assert "\n".join(OWN_FOLDER_COMMANDS) + "\n" in _blocks(README, "bash")


def test_the_tensorboard_the_docs_name_is_installed_with_finetune():
    assert "tensorboard --logdir runs/mine" in README and "tensorboard --logdir runs/flowers" in WALKTHROUGH
    # tomllib is Python 3.11+; the dependency list is a plain block of quoted lines.
    dependencies = re.search(r"^dependencies = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), re.M | re.S)
    assert re.search(r'^\s*"tensorboard\b', dependencies.group(1), re.M), "TensorFlow 2.21 does not bring it"
    commands = _ci_commands()
    install = next(i for i, c in enumerate(commands) if "pip install" in c and "-e" in c)
    assert "tensorboard --version" in commands[install + 1:], "CI checks the viewer after installing"
    # Installed by this environment's install, beside this Python, as the README's command would put it.
    viewer = shutil.which("tensorboard", path=str(Path(sys.executable).parent)) or shutil.which("tensorboard")
    assert viewer, "tensorboard is not installed: run pip install -e '.[test]'"
    result = subprocess.run([viewer, "--version"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and re.match(r"2\.21\.", result.stdout.strip()), result.stdout + result.stderr


@pytest.mark.slow
def test_the_snippets_run_with_plain_tensorflow_and_agree(trained_run, exported_model, tmp_path):
    (short,) = [block for block in _blocks(README, "python") if "import_graph_def" in block]
    (full,) = [block for block in _blocks(WALKTHROUGH, "python") if "import_graph_def" in block]
    (tmp_path / "runs").mkdir()
    shutil.copytree(exported_model.parent, tmp_path / "runs" / "flowers")  # `finetune export`'s files, shared
    assert (tmp_path / "runs" / "flowers" / "model.pb").exists()
    shutil.copytree(tmp_path / "runs" / "flowers", tmp_path / "runs" / "mine")
    photo = sorted(trained_run.photos.rglob("*.jpg"))[0]
    shutil.copy(photo, tmp_path / "photo.jpg")
    # One fresh Python runs both, each in a namespace of its own (so each must import and define all it uses),
    # and then checks that neither needed finetune or tf_slim: TensorFlow is imported once, not twice.
    script = tmp_path / "snippets.py"
    script.write_text(
        f"import sys\nfor snippet in {[full, short]!r}:\n"
        "    exec(compile(snippet, 'snippet', 'exec'), {'__name__': '__main__'})\n"
        "    print('-- end of snippet', flush=True)\n"
        "assert 'finetune' not in sys.modules and 'tf_slim' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    outputs = [part.strip().splitlines() for part in result.stdout.split("-- end of snippet")[:2]]
    assert result.stdout.count("-- end of snippet") == 2, result.stdout
    (by_bytes, by_pixels), (readme,) = ([line.split() for line in lines] for lines in outputs)
    classes = (tmp_path / "runs" / "flowers" / "model.labels.txt").read_text().split()
    assert by_bytes[0] in classes and by_bytes[0] == by_pixels[0]
    assert float(by_bytes[1]) == pytest.approx(float(by_pixels[1]), abs=0.0015)
    assert readme == by_bytes, "the README's short snippet answers as the walk-through's image_bytes run does"
