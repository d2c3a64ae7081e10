"""The train dir: the one module that reads and writes a run's config.json and finds its checkpoints.

A train dir holds what ``finetune train`` writes::

    config.json                 the run's resolved settings (the train Plan), with a format version
    checkpoint                  TensorFlow's list of the checkpoints kept, newest last
    model.ckpt-<step>[.meta]    checkpoints, named by the global step they hold
    events.out.tfevents.*       TensorBoard events
    eval-<split>.json/.png      reports of `finetune evaluate --train-dir`

config.json versions: 1 is every file written so far (files from before the version field count as 1).
A config.json this code cannot use (unreadable, truncated, not a JSON object, missing settings, or written
by a newer finetune) is a FinetuneError naming the file and the fix, in every command that reads it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from finetune import __version__
from finetune.errors import FinetuneError
from finetune.files import write_text_atomically

CONFIG_FILE = "config.json"
CHECKPOINT_NAME = "model.ckpt"
CHECKPOINT_STATE = "checkpoint"  # TensorFlow's own name for its list of checkpoints
FORMAT_VERSION = 1
_VERSION_KEY = "format_version"
# What a run writes; --overwrite removes these and nothing else.
_RUN_FILES = ("checkpoint", f"{CHECKPOINT_NAME}-*", "events.out.tfevents.*", CONFIG_FILE, "eval-*.json")


@dataclass(frozen=True)
class RunConfig:
    """A train dir's config.json: the settings other commands rely on, checked, and every setting as saved."""

    path: Path  # the config.json file
    dataset: str
    dataset_fingerprint: str
    classes: tuple[str, ...]
    image_size: int
    total_steps: int
    checkpoint: str | None  # the weights the run started from; None for random initialisation
    values: dict[str, Any]  # the whole file, as JSON values (lists, not tuples)


def config_path(train_dir: str | Path) -> Path:
    return Path(train_dir) / CONFIG_FILE


def _start_over(train_dir: Path) -> str:
    return (
        f"restore it from a copy, or start the run over with `finetune train --train-dir {train_dir} "
        "--overwrite` (with the dataset and flags it was trained with)"
    )


def read_run_config(train_dir: str | Path, flag: str = "--train-dir") -> RunConfig:
    """Reads and checks a train dir's config.json.

    Raises:
        FinetuneError: no config.json (not a train dir), or one that is unreadable, truncated, not the
            expected shape, or of a newer format version than this finetune reads.
    """
    train_dir = Path(train_dir)
    path = config_path(train_dir)
    if not path.is_file():
        raise FinetuneError(f"{flag} {train_dir}: no {CONFIG_FILE}; pass the folder `finetune train` wrote")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise FinetuneError(f"{path} is unreadable or truncated ({reason}); {_start_over(train_dir)}") from None
    if not isinstance(values, dict):
        raise FinetuneError(
            f"{path} is not a finetune run config (a JSON {type(values).__name__}, not an object); "
            f"{_start_over(train_dir)}"
        )
    version = values.get(_VERSION_KEY, 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise FinetuneError(f"{path} has a bad {_VERSION_KEY} ({version!r}); {_start_over(train_dir)}")
    if version > FORMAT_VERSION:
        raise FinetuneError(
            f"{path} is train-dir format version {version}, newer than this finetune ({__version__}) reads "
            f"(up to {FORMAT_VERSION}); upgrade finetune to use this run"
        )
    try:
        classes = values["classes"]
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
            raise ValueError("classes")
        image_size, total_steps = values["image_size"], values["total_steps"]
        if not isinstance(image_size, int) or not isinstance(total_steps, int):
            raise ValueError("image_size" if not isinstance(image_size, int) else "total_steps")
        checkpoint = values.get("checkpoint")
        if checkpoint is not None and not isinstance(checkpoint, str):
            raise ValueError("checkpoint")
        return RunConfig(
            path=path,
            dataset=str(values["dataset"]),
            dataset_fingerprint=str(values["dataset_fingerprint"]),
            classes=tuple(classes),
            image_size=image_size,
            total_steps=total_steps,
            checkpoint=checkpoint,
            values=values,
        )
    except (KeyError, ValueError) as exc:
        raise FinetuneError(
            f"{path} is incomplete or corrupt (bad or missing '{exc.args[0]}'); {_start_over(train_dir)}"
        ) from None


def write_run_config(train_dir: str | Path, settings: dict[str, Any]) -> Path:
    """Writes a run's resolved settings (``dataclasses.asdict`` of the plan) as config.json, atomically."""
    path = config_path(train_dir)
    document = {**json.loads(json.dumps(settings)), _VERSION_KEY: FORMAT_VERSION}
    write_text_atomically(path, json.dumps(document, indent=2, sort_keys=True) + "\n")
    return path


def clear(train_dir: str | Path) -> None:
    """Removes what a run writes (checkpoints, events, config, evaluations), nothing else."""
    for pattern in _RUN_FILES:
        for path in Path(train_dir).glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def prepare(
    train_dir: str | Path, settings: dict[str, Any], overwrite: bool, must_match: Iterable[str] = ()
) -> str | None:
    """Makes the train dir ready for a run; returns the checkpoint to resume from, or None for a new run.

    ``settings`` are the new run's (as :func:`write_run_config` takes them); a run already in the dir is
    resumed only when it agrees on every key of ``must_match``. ``overwrite`` clears an earlier run first.

    Raises:
        FinetuneError: the dir holds files finetune did not write, a run that differs on a ``must_match``
            setting, or a config.json that cannot be read.
    """
    train_dir = Path(train_dir)
    if overwrite and train_dir.exists():
        clear(train_dir)
    if not config_path(train_dir).exists():
        if (train_dir / CHECKPOINT_STATE).exists() or (train_dir / "dataset.json").exists():
            raise FinetuneError(
                f"--train-dir {train_dir} holds files that finetune did not write there (no {CONFIG_FILE}); "
                "choose an empty or new folder"
            )
        train_dir.mkdir(parents=True, exist_ok=True)
        return None
    previous = read_run_config(train_dir).values
    current = json.loads(json.dumps(settings))
    for key in must_match:
        if previous.get(key) != current[key]:
            raise FinetuneError(
                f"--train-dir {train_dir} holds a run with another {key.replace('_', ' ')} "
                f"({previous.get(key)} there, {current[key]} now); pass --overwrite to start over, "
                "or choose a new --train-dir (with --checkpoint pointing at this one to build on it)"
            )
    return newest_checkpoint(train_dir)


def checkpoint_prefix(train_dir: str | Path) -> str:
    """What the Saver is given to write ``model.ckpt-<step>`` into the train dir."""
    return str(Path(train_dir) / CHECKPOINT_NAME)


def newest_checkpoint(folder: str | Path) -> str | None:
    """The newest checkpoint TensorFlow's ``checkpoint`` file lists in a folder, or None when there is none.

    Raises:
        FinetuneError: the ``checkpoint`` file is not text TensorFlow can read.
    """
    from finetune.compat import tf

    try:
        return tf.train.latest_checkpoint(str(folder))
    except (UnicodeDecodeError, ValueError) as exc:
        state = Path(folder) / CHECKPOINT_STATE
        raise FinetuneError(
            f"{state} is unreadable ({exc}); remove it and pass the checkpoint to use with --checkpoint"
        ) from None


def checkpoint_step(path: str | Path) -> int | None:
    """The global step in a checkpoint's name (``model.ckpt-120`` -> 120), or None when it has none."""
    head, dash, tail = str(path).rpartition("-")
    return int(tail) if dash and head and tail.isdigit() else None
