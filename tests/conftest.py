"""Shared fixtures: real small things built once per session (a stand-in checkpoint, an image folder)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Tests run offline and quietly; TensorFlow's C++ lines would only bury pytest's output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@pytest.fixture(scope="session")
def standin_checkpoint(tmp_path_factory) -> Path:
    """The published checkpoint's stand-in: 1001 classes, real names and shapes, random values, V1 file."""
    from finetune.synthetic import write_standin_checkpoint

    return write_standin_checkpoint(tmp_path_factory.mktemp("pretrained") / "inception_v3.ckpt", seed=1)


@pytest.fixture(scope="session")
def checkpoint_values(standin_checkpoint) -> dict:
    """Every tensor of the stand-in checkpoint, by name, as numpy arrays."""
    from finetune.compat import tf

    reader = tf.compat.v1.train.NewCheckpointReader(str(standin_checkpoint))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs `python -m finetune ARGS` in a fresh process, as a user would, and captures its output."""
    return subprocess.run(
        [sys.executable, "-m", "finetune", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
