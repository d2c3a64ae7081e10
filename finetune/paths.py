"""Reading paths a user hands us without trusting what is at them.

Only regular files are ever opened, without blocking (a FIFO put in place of a file between a scan and the
read would otherwise wait forever for a writer), and every read is bounded. Every command that reads a file
it found by walking a folder, or that a user named, goes through :func:`read_regular_file`.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

# No image or record finetune reads whole is near this; a file over it is refused rather than read.
MAX_READ_BYTES = 1 << 30


class NotReadable(OSError):
    """A path that is not a regular file we can read; ``str()`` is the reason, for a skip or error row."""

    def __str__(self) -> str:
        return str(self.strerror)


def kind_of(mode: int) -> str:
    """A user's word for what a non-regular file is."""
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):  # fmt: skip
        if test(mode):
            return name
    return "not a regular file"


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "a symbolic link that loops"
    if exc.errno == errno.ENOENT:
        return "missing (a broken symbolic link, or it vanished after the folder was listed)"
    return f"unreadable: {exc.strerror or exc}"


def read_regular_file(path: str | os.PathLike, limit: int = MAX_READ_BYTES) -> bytes:
    """The bytes of the regular file at ``path`` (symbolic links followed), at most ``limit`` of them.

    Raises:
        NotReadable: the path is missing, a loop of links, a folder, a FIFO, socket or device, unreadable,
            or bigger than ``limit``; its message says which.
    """
    problem = describe(path)  # a device is never opened (opening one can have effects); the fstat below
    if problem is not None:  # catches one swapped in after this look
        raise NotReadable(errno.EINVAL, problem)
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise NotReadable(exc.errno, describe(path) or _reason(exc)) from None
    try:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            raise NotReadable(errno.EINVAL, f"{kind_of(mode)}, not an image file")
        os.set_blocking(descriptor, True)
        chunks, size = [], 0
        while True:
            chunk = os.read(descriptor, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise NotReadable(errno.EFBIG, f"larger than {limit:,} bytes; not read")
        return b"".join(chunks)
    except NotReadable:
        raise
    except OSError as exc:
        raise NotReadable(exc.errno, _reason(exc)) from None
    finally:
        os.close(descriptor)


def describe(path: str | os.PathLike) -> str | None:
    """None when ``path`` is a regular file (links followed), else why not, without opening it."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return _reason(exc)
    return None if stat.S_ISREG(mode) else f"{kind_of(mode)}, not an image file"


def _listing(folder: str, seen: set[tuple[int, int]]) -> list[os.DirEntry]:
    """The non-hidden entries of ``folder``, sorted by name; none when it was walked already (a link back)."""
    status = os.stat(folder)
    if (status.st_dev, status.st_ino) in seen:
        return []
    seen.add((status.st_dev, status.st_ino))
    with os.scandir(folder) as scan:
        return sorted((entry for entry in scan if not entry.name.startswith(".")), key=lambda entry: entry.name)


def walk_files(
    top: str | os.PathLike, seen: set[tuple[int, int]] | None = None
) -> Iterator[tuple[str, str | None]]:
    """(path, None) for every non-hidden file below ``top``, (path, why not) for an entry that cannot be
    used (a link that loops or dangles, a FIFO, socket or device, an unreadable folder), in sorted order
    (a folder's files and subfolders by name, each subfolder walked where it sorts).

    Follows links to folders once (``seen`` holds the folders walked, shared across calls). The walk keeps
    its own stack instead of recursing, so a tree deeper than Python's recursion limit is walked whole; a
    folder whose path is too long for the system is an entry that cannot be used.
    """
    seen = set() if seen is None else seen
    stack: list[Iterator[os.DirEntry]] = []
    folder: str | None = os.fspath(top)
    while True:
        if folder is not None:
            try:
                stack.append(iter(_listing(folder, seen)))
            except OSError as exc:
                yield folder, f"unreadable folder: {exc.strerror or exc}"
        if not stack:
            return
        entry = next(stack[-1], None)
        folder = None
        if entry is None:
            stack.pop()
            continue
        try:
            is_dir = entry.is_dir()
        except OSError:  # a link that loops: described below
            is_dir = False
        if is_dir:
            folder = entry.path
        else:
            yield entry.path, describe(entry.path)


def printable(path: str | os.PathLike) -> str:
    """A path for a one-line message: newlines and undecodable bytes shown escaped, never raw."""
    text = os.fspath(path)
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\n", "\\n").replace("\r", "\\r")


# ------------------------------------------------------------------------------------ kinds of path flags

# What each path flag must be, by command config and field: "folder" (existing or to be made), "file" (an
# existing file to read), "new file" (a file to write), "file or prefix" (a checkpoint: a file, a prefix of
# files, or a folder holding them, checked by its owner). Checked before a command does anything, so a file
# where a folder belongs (or the reverse) is one error naming the flag instead of an OSError half way.
_DATASET = "pass the folder `finetune build-dataset` wrote"
_RUN = "pass the folder `finetune train` wrote"
_NEW_FOLDER = "pass a new or existing folder"
_MODEL = "pass a model `finetune export` wrote: a .pb, .tflite or .onnx file or a SavedModel folder"
_NEW_FILE = "pass a file name to write"

PATH_FLAGS: dict[str, dict[str, tuple[str, str, str]]] = {  # config -> field -> (kind, flag, fix)
    "BuildDatasetConfig": {"image_dir": ("folder", "IMAGE_DIR", "pass a folder with one subfolder per class"),
                           "out": ("folder", "--out", "choose a folder name for the dataset")},  # fmt: skip
    "PreviewConfig": {"dataset": ("folder", "DATASET", _DATASET), "out": ("new file", "--out", _NEW_FILE)},
    "DownloadConfig": {"dest": ("folder", "--dest", _NEW_FOLDER)},
    "TrainConfig": {"dataset": ("folder", "--dataset", _DATASET),
                    "train_dir": ("folder", "--train-dir", "pass a folder for the run (a new name is created)"),
                    "cache_dir": ("folder", "--cache-dir", _NEW_FOLDER)},  # fmt: skip
    "EvaluateConfig": {"train_dir": ("folder", "--train-dir", _RUN), "model": ("model", "--model", _MODEL),
                       "dataset": ("folder", "--dataset", _DATASET)},  # fmt: skip
    "ExportConfig": {"train_dir": ("folder", "--train-dir", _RUN), "out": ("new file", "--out", _NEW_FILE),
                     "saved_model": ("folder", "--saved-model", "pass a name for a new folder")},  # fmt: skip
    "PredictConfig": {"model": ("model", "--model", _MODEL)},
    "QuickstartConfig": {"workdir": ("folder", "--workdir", _NEW_FOLDER)},
    "ExplainConfig": {"model": ("file", "--model", _MODEL), "train_dir": ("folder", "--train-dir", _RUN),
                      "out": ("folder", "--out", _NEW_FOLDER)},  # fmt: skip
    "AuditConfig": {"dataset": ("folder", "DATASET", _DATASET), "out": ("folder", "--out", _NEW_FOLDER),
                    "cache_dir": ("folder", "--cache-dir", _NEW_FOLDER)},  # fmt: skip
}


def _blocking_ancestor(path: Path) -> Path | None:
    """The first ancestor of ``path`` that exists and is not a folder (so nothing can be made below it)."""
    for parent in reversed(path.parents):
        if parent.exists() and not parent.is_dir():
            return parent
        if not parent.exists():
            return None
    return None


def check_path_kind(value: str, kind: str, flag: str, fix: str) -> None:
    """Raises FinetuneError when the path given for ``flag`` is the wrong kind of thing for ``kind``."""
    from finetune.errors import FinetuneError

    path = Path(value)
    shown = printable(value)
    if path.exists():
        is_dir = path.is_dir()
        if kind == "folder" and not is_dir:
            raise FinetuneError(f"{flag} {shown} is not a folder (it is {_kind_at(path)}); {fix}")
        if kind == "model" and is_dir:  # a SavedModel folder runs
            if (path / "saved_model.pb").exists():
                return
            raise FinetuneError(f"{flag} {shown} is a folder without saved_model.pb, not a model; {fix}")
        if kind in ("file", "new file") and is_dir:
            if kind == "file" and (path / "saved_model.pb").exists():
                raise FinetuneError(f"{flag} {shown} is a SavedModel folder, not a file; {fix} (e.g. RUN/model.pb)")
            raise FinetuneError(f"{flag} {shown} is a folder, not a file; {fix}")
        if kind in ("file", "model") and not is_dir and describe(path) is not None:
            raise FinetuneError(f"{flag} {shown} is {describe(path)}; {fix}")
        return
    blocker = _blocking_ancestor(path)
    if blocker is not None:
        raise FinetuneError(
            f"{flag} {shown}: {printable(blocker)} is a file, so nothing can be made below it; choose another path"
        )


def _kind_at(path: Path) -> str:
    try:
        return kind_of(path.stat().st_mode) if not path.is_file() else "a file"
    except OSError:
        return "unreadable"


def check_path_flags(config: object) -> None:
    """Checks every path flag of a command's config (see PATH_FLAGS); unknown configs pass."""
    for field, (kind, flag, fix) in PATH_FLAGS.get(type(config).__name__, {}).items():
        value = getattr(config, field, None)
        if isinstance(value, str) and value:
            check_path_kind(value, kind, flag, fix)
