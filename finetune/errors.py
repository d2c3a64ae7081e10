"""The errors a user can fix. Each message says what went wrong, where (file or flag), and how to fix it.

The CLI prints a FinetuneError as one `error: ...` line on stderr and exits 1; anything else is a bug and
keeps its traceback. TensorFlow's errors about damaged or missing files are translated here, once
(:func:`translated_tf_errors`), at the CLI's edge and at the library's entry points (:func:`translates_tf_errors`
on ``train``, ``evaluate`` and ``export``), so a script gets the same error the command line prints.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import sys
from collections.abc import Callable, Iterator
from typing import TypeVar

_Entry = TypeVar("_Entry", bound=Callable)


class FinetuneError(Exception):
    """A mistake the user can fix; the message names the file or flag and the fix."""


class CheckpointError(FinetuneError):
    """A checkpoint is missing, unreadable, or does not fit the model being built."""


class ScopeError(FinetuneError):
    """A scope or preset name that the model does not have."""


class DataError(FinetuneError):
    """An image folder or dataset that cannot be used as it is."""


class EmptySplitError(DataError):
    """Some class would have no image in a split at the requested fractions (another seed may give it one)."""


class DownloadError(FinetuneError):
    """A download that failed, or whose file did not verify.

    The message is ``problem; fix``, the fix being what `finetune download` can do about it; a caller with
    other means (quickstart falls back to random weights) shows ``problem`` alone.
    """

    def __init__(self, problem: str, fix: str = "") -> None:
        super().__init__(f"{problem}; {fix}" if fix else problem)
        self.problem = problem


def _no_space(filename: str | None, reason: str | None) -> str:
    where = f" writing {filename}" if filename else ""
    return (
        f"the disk is full{where} ({reason}); nothing was left half-written and the previous output is "
        f"untouched: free some space, or write to another folder"
    )


def _tf_reason(exc: BaseException) -> str:
    """TensorFlow's informative line, without "Graph execution error:" and node tags."""
    message = getattr(exc, "message", None) or str(exc)
    for line in (part.strip() for part in message.splitlines()):
        if line and not line.startswith(_TF_NOISE):
            return line.rstrip(".")
    return type(exc).__name__


# Lines of a TensorFlow error that say where in the graph or the Python code, not what went wrong.
_TF_NOISE = ("[[", "Graph execution error", "Detected at node", "File \"", "Node:", "Hint:", "Original stack trace")


def _no_space_in_tf(exc: BaseException) -> str:
    """The no-space message for TensorFlow's "FILE.tempstate123; No space left on device", naming the final
    file (TensorFlow removes its temporary one)."""
    reason = _tf_reason(exc)
    filename, _, why = reason.rpartition("; ")
    if not filename:
        return _no_space(None, reason)
    return _no_space(re.sub(r"\.tempstate\d+$", "", filename), why)


@contextlib.contextmanager
def translated_tf_errors(
    what: str, fix: str, locate: Callable[[], str | None] | None = None
) -> Iterator[None]:
    """Turns TensorFlow's errors about damaged or missing files into a FinetuneError.

    DataLossError (a damaged record or checkpoint), NotFoundError (a file gone), ResourceExhaustedError (out
    of memory or disk) and an InvalidArgumentError that ``locate`` can pin on a file become ``what: reason;
    fix``; ``locate``, called only on failure, names the damaged file with its own fix ("FILE: ...; fix")
    when it can. Anything else keeps its traceback: it is a bug, not the user's file.
    """
    try:
        yield
    except OSError as exc:  # a full disk or quota while writing, from Python's own writes
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise FinetuneError(_no_space(exc.filename, exc.strerror)) from None
    except Exception as exc:
        tf_module = sys.modules.get("tensorflow")
        if tf_module is None or not isinstance(exc, tf_module.errors.OpError):
            raise
        errors = tf_module.errors
        if isinstance(exc, errors.ResourceExhaustedError) and "space left on device" in _tf_reason(exc):
            raise FinetuneError(_no_space_in_tf(exc)) from None
        if isinstance(exc, errors.ResourceExhaustedError):
            raise FinetuneError(
                f"{what}: out of memory or disk ({_tf_reason(exc)}); use a smaller --batch-size or free space"
            ) from None
        kinds = (errors.DataLossError, errors.NotFoundError, errors.InvalidArgumentError, errors.OutOfRangeError)
        if not isinstance(exc, kinds):
            raise
        located = locate() if locate is not None else None
        if located:
            raise FinetuneError(located) from None
        if isinstance(exc, (errors.InvalidArgumentError, errors.OutOfRangeError)):
            raise
        raise FinetuneError(f"{what}: {_tf_reason(exc)}; {fix}") from None


def _dataset_of(config: object) -> str | None:
    """The dataset folder a command reads: its --dataset, else the one its run or model was trained on."""
    dataset = getattr(config, "dataset", None)
    if dataset:
        return str(dataset)
    try:
        if getattr(config, "train_dir", None):
            from finetune.rundir import read_run_config

            return read_run_config(config.train_dir).dataset
        if getattr(config, "model", None):
            from finetune.modelfile import read_model

            return read_model(config.model).dataset or None
    except (FinetuneError, OSError):
        return None
    return None


def _damaged_shard(config: object) -> str | None:
    """"SHARD is damaged (...); rebuild ..." for the first damaged shard of the command's dataset, if any."""
    dataset = _dataset_of(config)
    if not dataset:
        return None
    from finetune.dataset import damaged_shards

    try:
        damaged = damaged_shards(dataset)
    except (FinetuneError, OSError):
        return None
    if not damaged:
        return None
    shard, reason = damaged[0]
    more = f" (and {len(damaged) - 1} more shards)" if len(damaged) > 1 else ""
    return (
        f"dataset shard {shard} is damaged ({_tf_reason(reason)}){more}; rebuild the dataset with "
        f"`finetune build-dataset IMAGE_DIR --out {dataset} --overwrite`"
    )


def _damaged_checkpoint(config: object) -> str | None:
    """"checkpoint X is damaged (...); pass another" for the checkpoint the command reads, if it is damaged."""
    try:
        from finetune.model import damaged_checkpoint
        from finetune.rundir import newest_checkpoint

        prefix = getattr(config, "checkpoint", None)
        if prefix and os.path.isdir(prefix):
            prefix = newest_checkpoint(prefix)
        elif not prefix and getattr(config, "train_dir", None):
            prefix = newest_checkpoint(config.train_dir)
        if not prefix:
            return None
        return damaged_checkpoint(str(prefix))
    except (FinetuneError, OSError):
        return None


def translated_command_errors(config: object) -> contextlib.AbstractContextManager:
    """The CLI's edge for one command: TensorFlow's file errors as FinetuneErrors naming the damaged file
    (a dataset shard, a checkpoint) and its fix."""
    return translated_tf_errors(
        f"{type(config).__name__.removesuffix('Config').lower()} failed reading its files",
        "check the files the command reads (a damaged dataset: rebuild it with --overwrite)",
        lambda: _damaged_shard(config) or _damaged_checkpoint(config),
    )


def translates_tf_errors(entry: _Entry) -> _Entry:
    """Gives a library entry point (``train(config)``, ``evaluate(config)``, ``export(config)``) the same edge
    as the CLI: a caller gets a FinetuneError naming the damaged file rather than TensorFlow's raw error."""

    @functools.wraps(entry)
    def translated(config, *args, **kwargs):
        with translated_command_errors(config):
            return entry(config, *args, **kwargs)

    return translated  # type: ignore[return-value]
