"""The train dir: the one module that reads and writes a run's config.json and finds its checkpoints.

A train dir holds what ``finetune train`` writes::

    config.json                 the run's resolved settings (the train Plan), with a format version
    checkpoint                  TensorFlow's list of the checkpoints kept, newest last
    model.ckpt-<step>[.meta]    checkpoints, named by the global step they hold; the one a run ends
                                on also has its graph (.meta)
    events.out.tfevents.*       TensorBoard events
    best/                       the best validation pass's checkpoint and best.json (see below)
    calibration.json/.png       the temperature fitted on the validation split, its reliability diagram
    eval-<split>.json/.png      reports of `finetune evaluate --train-dir`

config.json versions: 1 is every file written so far (files from before the version field count as 1).
A config.json this code cannot use (unreadable, truncated, not a JSON object, missing settings, or written
by a newer finetune) is a FinetuneError naming the file and the fix, in every command that reads it.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from finetune.errors import FinetuneError
from finetune.files import read_versioned_json, write_text_atomically

CONFIG_FILE = "config.json"
CHECKPOINT_NAME = "model.ckpt"
CHECKPOINT_STATE = "checkpoint"  # TensorFlow's own name for its list of checkpoints
FORMAT_VERSION = 1
_VERSION_KEY = "format_version"
# What a run writes; --overwrite removes these and nothing else.
_RUN_FILES = ("checkpoint", f"{CHECKPOINT_NAME}-*", "events.out.tfevents.*", CONFIG_FILE, "eval-*.json", "best",
              "calibration.json", "calibration-*.png")


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
    values = read_versioned_json(path, kind="train-dir", what="run config", newest=FORMAT_VERSION,
                                 fix=_start_over(train_dir), use="this run")  # fmt: skip
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


@contextlib.contextmanager
def partial_checkpoint_removed(train_dir: str | Path, step: int) -> Iterator[None]:
    """Removes what a failed save of step ``step`` left: TensorFlow writes ``model.ckpt-<step>.data-...
    .tempstate<n>`` and renames it when complete, but leaves it behind when the write fails (a full disk)."""
    try:
        yield
    except BaseException:
        for partial in Path(train_dir).glob(f"{CHECKPOINT_NAME}-{step}.*.tempstate*"):
            partial.unlink(missing_ok=True)
        raise


def newest_checkpoint(folder: str | Path) -> str | None:
    """The newest checkpoint TensorFlow's ``checkpoint`` file lists in a folder, or None when there is none.

    Raises:
        FinetuneError: the ``checkpoint`` file is not text TensorFlow can read.
    """
    from finetune.compat import tf

    state = Path(folder) / CHECKPOINT_STATE
    try:
        newest = tf.train.latest_checkpoint(str(folder))
        if newest or not state.is_file():
            return newest
        listed = tf.train.get_checkpoint_state(str(folder))  # lists a step whose files are gone?
    except (UnicodeDecodeError, ValueError) as exc:
        raise FinetuneError(
            f"{state} is unreadable ({exc}); remove it and pass the checkpoint to use with --checkpoint"
        ) from None
    if listed is None or not listed.model_checkpoint_path:
        return None
    _refuse_missing_step(Path(folder), state, Path(listed.model_checkpoint_path))
    return None


def _refuse_missing_step(folder: Path, state: Path, listed: Path) -> None:
    """Raises FinetuneError for a ``checkpoint`` file naming a step whose files are gone (deleted by hand,
    or a copy of the run that left them behind), naming the step and the newest one still there."""
    listed = listed if listed.is_absolute() else folder / listed
    present = sorted(
        (step, str(index)[: -len(".index")])
        for index in folder.glob(f"{CHECKPOINT_NAME}-*.index")
        if (step := checkpoint_step(str(index)[: -len(".index")])) is not None
    )
    if present:
        other = present[-1][1]
        fix = (f"put its files back, or use the newest step still there, {other}: pass `--checkpoint {other}` "
               "to evaluate or export, or to train with a new --train-dir")  # fmt: skip
    else:
        fix = "put its files back, or start the run over with `finetune train ... --overwrite`"
    raise FinetuneError(f"{state} names {listed} as the newest checkpoint, but {listed}.index is missing; {fix}")


def checkpoint_step(path: str | Path) -> int | None:
    """The global step in a checkpoint's name (``model.ckpt-120`` -> 120), or None when it has none."""
    head, dash, tail = str(path).rpartition("-")
    return int(tail) if dash and head and tail.isdigit() else None


# ----------------------------------------------------------------------------------- the best checkpoint
#
# A run with validation passes keeps the checkpoint of its best pass in TRAIN_DIR/best/, apart from the
# newest K that rotation deletes, and records it in best/best.json:
#
#     {"format_version": 1, "metric": "accuracy", "step": 40, "value": 0.93,
#      "checkpoint": "model.ckpt-40", "passes": [[10, 0.8], [20, 0.9], ...], "stopped_early": false}
#
# ``passes`` is every validation pass so far (step, value): a resumed run counts passes without improvement
# from it. best.json is written after its checkpoint and before older best checkpoints are removed, so an
# interrupted save leaves the previous best in place and named.

BEST_DIR = "best"
BEST_FILE = "best.json"
BEST_FORMAT_VERSION = 1
SELECTION_METRICS = ("accuracy", "loss")  # validation accuracy (higher is better) or loss (lower is better)


@dataclass(frozen=True)
class Best:
    """The best validation pass of a run so far, and where its checkpoint is."""

    metric: str  # "accuracy" or "loss"
    step: int
    value: float
    checkpoint: str  # the checkpoint prefix, absolute
    passes: tuple[tuple[int, float], ...]  # every validation pass: (step, value)
    stopped_early: bool = False


def best_prefix(train_dir: str | Path) -> str:
    """What the best checkpoint's Saver is given: ``best/model.ckpt`` (the step is appended)."""
    return str(Path(train_dir) / BEST_DIR / CHECKPOINT_NAME)


def improves(metric: str, value: float, best: float | None) -> bool:
    """Whether a validation pass beats the best so far (strictly: the earlier of two equal passes stays)."""
    if best is None:
        return value == value  # anything but NaN
    return value > best if metric == "accuracy" else value < best


def read_best(train_dir: str | Path) -> Best | None:
    """The run's best checkpoint as best/best.json records it, or None when the run has none.

    Raises:
        FinetuneError: a best.json that is unreadable, of another shape, or of a newer format version.
    """
    path = Path(train_dir) / BEST_DIR / BEST_FILE
    if not path.is_file():
        return None
    fix = f"remove {path.parent} (the run's newest checkpoints stay usable with --checkpoint newest)"
    values = read_versioned_json(path, what="best-checkpoint record", newest=BEST_FORMAT_VERSION, fix=fix,
                                 use="this run")  # fmt: skip
    try:
        if values["metric"] not in SELECTION_METRICS:
            raise ValueError("metric")
        return Best(
            metric=values["metric"],
            step=int(values["step"]),
            value=float(values["value"]),
            checkpoint=str(path.parent / values["checkpoint"]),
            passes=tuple((int(s), float(v)) for s, v in values.get("passes", [])),
            stopped_early=bool(values.get("stopped_early", False)),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FinetuneError(f"{path} is unreadable or corrupt ({exc}); {fix}") from None


def write_best(train_dir: str | Path, best: Best) -> Path:
    """Records the best checkpoint (atomically), then removes the best checkpoints it replaced."""
    folder = Path(train_dir) / BEST_DIR
    folder.mkdir(parents=True, exist_ok=True)
    name = Path(best.checkpoint).name
    document = {
        "format_version": BEST_FORMAT_VERSION, "metric": best.metric, "step": best.step, "value": best.value,
        "checkpoint": name, "passes": [list(p) for p in best.passes], "stopped_early": best.stopped_early,
    }  # fmt: skip
    path = folder / BEST_FILE
    write_text_atomically(path, json.dumps(document, indent=2) + "\n")
    for old in folder.glob(f"{CHECKPOINT_NAME}-*"):
        if old.name.split(".")[1] != name.split(".")[1]:  # "ckpt-<step>..." of another step
            old.unlink()
    return path


@dataclass(frozen=True)
class ChosenCheckpoint:
    """The checkpoint evaluate or export takes from a train dir, and a phrase saying which it is."""

    path: str
    # The step of this run it holds (None outside the train dir). For a given path, judged from the path as
    # typed (a folder or an .index file gives None): export and evaluate judge the checkpoint they open with
    # run_step instead.
    step: int | None
    which: str  # e.g. "best (step 40, validation accuracy 0.9300)", "newest (step 60)", "given"


def run_step(train_dir: str | Path, prefix: str | Path) -> int | None:
    """The step of the run in ``train_dir`` that a checkpoint prefix holds: its number when the checkpoint lies in
    the train dir or its best/ folder, else None. A checkpoint elsewhere (another run's, a copy, the pretrained
    one) is no step of this run whatever its name says, so the temperatures this run fitted do not apply."""
    train_dir = Path(train_dir).resolve()
    inside = Path(prefix).resolve().parent in (train_dir, (train_dir / BEST_DIR).resolve())
    return checkpoint_step(prefix) if inside else None


def choose_checkpoint(train_dir: str | Path, choice: str | None, flag: str = "--checkpoint") -> ChosenCheckpoint:
    """Resolves ``--checkpoint newest|best|PATH`` (None: the best when the run has one, else the newest).

    Raises:
        FinetuneError: ``best`` for a run without one, or a run with no checkpoint yet.
    """
    train_dir = Path(train_dir)
    if choice not in (None, "newest", "best"):
        return ChosenCheckpoint(choice, run_step(train_dir, choice), "given")
    best = read_best(train_dir) if choice != "newest" else None
    if best is not None:
        return ChosenCheckpoint(best.checkpoint, best.step,
                                f"best (step {best.step}, validation {best.metric} {best.value:.4f})")  # fmt: skip
    if choice == "best":
        raise FinetuneError(
            f"{flag} best: {train_dir} has no best checkpoint (it is kept only by runs with validation "
            "passes); use --checkpoint newest"
        )
    newest = newest_checkpoint(train_dir)
    if not newest:
        raise FinetuneError(f"--train-dir {train_dir} holds no checkpoint yet; run `finetune train` first")
    return ChosenCheckpoint(newest, checkpoint_step(newest), f"newest (step {checkpoint_step(newest)})")


# ------------------------------------------------------------------------------------------------ calibration
#
# calibration.json: per checkpoint step, the temperature fitted on the validation split's logits (see
# finetune/calibration.py), with the expected calibration error before and after:
#
#     {"format_version": 1, "fits": {"40": {"temperature": 1.8, "step": 40, "split": "validation",
#      "examples": 60, "ece_before": 0.12, "ece_after": 0.03, "nll_before": 0.9, "nll_after": 0.6}}}

CALIBRATION_FILE = "calibration.json"
CALIBRATION_FORMAT_VERSION = 1


def _read_calibration_file(train_dir: Path) -> dict[str, dict[str, Any]]:
    path = train_dir / CALIBRATION_FILE
    if not path.is_file():
        return {}
    fix = "remove it (export then leaves the probabilities uncalibrated)"
    values = read_versioned_json(path, what="calibration record", newest=CALIBRATION_FORMAT_VERSION, fix=fix,
                                 use="this run")  # fmt: skip
    try:
        fits = values["fits"]
        for fit in fits.values():
            if not float(fit["temperature"]) > 0:
                raise ValueError(f"temperature {fit['temperature']}")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FinetuneError(f"{path} is unreadable or corrupt ({exc}); {fix}") from None
    return fits


def write_calibration(train_dir: str | Path, step: int | None, fit: dict[str, Any]) -> Path:
    """Records the temperature fitted for one checkpoint step (atomically), beside those of other steps."""
    train_dir = Path(train_dir)
    fits = {**_read_calibration_file(train_dir), str(step): {**fit, "step": step}}
    path = train_dir / CALIBRATION_FILE
    document = {"format_version": CALIBRATION_FORMAT_VERSION, "fits": fits}
    write_text_atomically(path, json.dumps(document, indent=2) + "\n")
    return path


def read_calibration(train_dir: str | Path, step: int | None) -> dict[str, Any] | None:
    """The temperature fitted for a checkpoint step (with its ECE before and after), or None.

    Raises:
        FinetuneError: a calibration.json that is unreadable, holds a temperature that is not positive, or is
            of a newer format version.
    """
    return _read_calibration_file(Path(train_dir)).get(str(step))
