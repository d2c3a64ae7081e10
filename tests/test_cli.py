"""The command-line frame: help, version, verbosity, flags built from config dataclasses."""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass

import pytest

from finetune import cli
from finetune.config import option
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
