"""The command-line frame: help, version, verbosity, flags built from config dataclasses, Ctrl-C."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass

import pytest

from finetune import cli
from finetune.config import (
    TRAIN_OPTION_GROUPS,
    BuildDatasetConfig,
    DownloadConfig,
    EvaluateConfig,
    ExportConfig,
    PredictConfig,
    PreviewConfig,
    QuickstartConfig,
    TrainConfig,
    option,
)
from finetune.errors import FinetuneError
from tests.conftest import run_cli, spawn_cli


def test_help_lists_the_commands_without_importing_tensorflow():
    code = (
        "import sys; from finetune import cli\n"
        "try:\n    cli.main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "assert 'tensorflow' not in sys.modules, 'help imported tensorflow'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "usage: finetune" in result.stdout
    for command in cli.COMMANDS:
        assert command.name in result.stdout


def test_python_dash_m_and_version():
    result = spawn_cli("--version")
    assert result.returncode == 0 and result.stdout.strip().startswith("finetune ")


def test_unknown_command_is_a_usage_error():
    result = run_cli("frobnicate")
    assert result.returncode == 2
    assert "invalid choice: 'frobnicate'" in result.stderr


@dataclass(frozen=True)
class _Example:
    image_dir: str = option(help="folder of class folders", positional=True)
    out: str = option(help="where to write")
    shards: int = option(4, help="files per split")
    augment: bool = option(True, help="random crops and flips")
    mode: str = option("auto", help="which path", choices=("auto", "on", "off"))
    paths: tuple[str, ...] = option((), help="more inputs", flag="--path")


def _parser():
    parser = argparse.ArgumentParser(prog="x")
    cli.add_config_arguments(parser, _Example)
    return parser


def test_flags_come_from_the_config_with_defaults_in_help():
    parser = _parser()
    config = cli.config_from_args(_Example, parser.parse_args(["photos", "--out", "d", "--no-augment"]))
    assert config == _Example(image_dir="photos", out="d", shards=4, augment=False, mode="auto", paths=())
    config = cli.config_from_args(_Example, parser.parse_args(["p", "--out", "d", "--path", "a", "b"]))
    assert config.paths == ("a", "b")
    text = parser.format_help()
    assert "files per split (default: 4)" in text and "(default: on)" in text
    with pytest.raises(SystemExit):
        parser.parse_args(["p", "--out", "d", "--mode", "sideways"])
    with pytest.raises(SystemExit):
        parser.parse_args(["p"])  # --out is required


def test_train_help_lists_every_flag_under_a_group_title():
    parser = argparse.ArgumentParser(prog="finetune train")
    cli.add_config_arguments(parser, TrainConfig, TRAIN_OPTION_GROUPS)
    text = parser.format_help()
    for title, names in TRAIN_OPTION_GROUPS.items():
        present = [name for name in names if name in _train_fields()]
        if not present:
            continue
        section = text.split(f"\n{title}:\n", 1)[1].split("\n\n", 1)[0]
        for name in present:
            assert "--" + name.replace("_", "-") in section, (title, name)
    assert "other options:" not in text, "a TrainConfig field outside every group"


def _train_fields() -> set[str]:
    return {spec.name for spec in dataclasses.fields(TrainConfig)}


def test_every_train_field_is_in_exactly_one_group():
    seen: dict[str, list[str]] = {}
    for title, names in TRAIN_OPTION_GROUPS.items():
        for name in names:
            seen.setdefault(name, []).append(title)
    ungrouped = sorted(_train_fields() - set(seen))
    assert not ungrouped, f"TrainConfig fields in no group of config.TRAIN_OPTION_GROUPS: {ungrouped}"
    twice = {name: titles for name, titles in seen.items() if len(titles) > 1}
    assert not twice, f"fields in more than one group: {twice}"


def test_a_field_in_no_group_still_gets_its_flag():
    parser = argparse.ArgumentParser(prog="x")
    cli.add_config_arguments(parser, _Example, {"outputs": ("out", "not_a_field_yet")})
    text = parser.format_help()
    assert "outputs:\n  --out OUT" in text
    assert "other options:" in text and "--shards SHARDS" in text.split("other options:")[1]
    config = cli.config_from_args(_Example, parser.parse_args(["p", "--out", "d", "--shards", "2"]))
    assert config.shards == 2 and config.image_dir == "p"


def test_model_names_a_file_everywhere_and_download_takes_pretrained():
    parser = cli.build_parser()
    args = parser.parse_args(["download", "--pretrained", "inception_v3"])
    assert cli.config_from_args(DownloadConfig, args).pretrained == "inception_v3"
    with pytest.raises(SystemExit):
        parser.parse_args(["download", "--model", "inception_v3"])
    with pytest.raises(FinetuneError, match=r"^--pretrained resnet: unknown; choose one of inception_v3$"):
        DownloadConfig(pretrained="resnet")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: TrainConfig(dataset="d", train_dir="t", steps=0), "--steps 0: must be at least 1"),
        (lambda: TrainConfig(dataset="d", train_dir="t", augment=False, augment_views=2),
         "--augment-views 2: caches augmented views"),
        (lambda: EvaluateConfig(train_dir="t", mistakes=-1), "--mistakes -1: must be zero or more"),
        (lambda: PredictConfig(paths=("a",), model="m.pb", top_k=0), "--top-k 0: must be at least 1"),
        (lambda: BuildDatasetConfig(image_dir="i", out="o", workers=0), "--workers 0: must be at least 1"),
        (lambda: PreviewConfig(dataset="d", count=0), "--count 0: must be between 1 and 64"),
        (lambda: DownloadConfig(retries=-1), "--retries -1: must be 0 or more"),
        (lambda: QuickstartConfig(images_per_class=5), "--images-per-class 5: must be at least 20"),
        (lambda: ExportConfig(train_dir="t", precision="fp8"), "--precision fp8: unknown"),
    ],
)  # fmt: skip
def test_config_errors_share_one_shape_flag_value_problem(make, message):
    with pytest.raises(FinetuneError) as caught:
        make()
    assert str(caught.value).startswith(message)
    assert re.fullmatch(r"--[a-z0-9-]+ \S+: [^\n]+", str(caught.value))


def test_ctrl_c_stops_evaluate_watch_with_exit_130(tmp_path):
    # An empty train dir: --watch waits for the first checkpoint, which is where a user presses Ctrl-C.
    process = subprocess.Popen(
        [sys.executable, "-m", "finetune", "evaluate", "--train-dir", str(tmp_path), "--watch"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        # As from a terminal: a suite started in the background (`pytest &`) passes SIGINT on ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        lines = []
        for line in process.stderr:  # the log line says the loop has started; the 600 s bound is below
            lines.append(line)
            if "watching" in line:
                break
        assert any("watching" in line for line in lines), "".join(lines)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, "".join(lines) + err
    assert "error: interrupted" in err
