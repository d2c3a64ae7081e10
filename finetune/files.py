"""Writing a file so that it is never seen half written, with the permissions the user's umask gives.

Every file finetune writes itself goes through here. A temporary file is made with ``os.open`` and mode
0666, which the umask then narrows, as for any file a program creates; ``tempfile.mkstemp`` would make it
0600 and the renamed file would keep that, hiding a run's reports from teammates on a shared machine.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


def _temporary_name(path: Path) -> Path:
    """A name beside ``path`` (``.<name>.<pid>.<random>.tmp``) that no other writer picks."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def open_temporary(path: Path) -> tuple[int, Path]:
    """Creates a new temporary file beside ``path`` for writing, mode 0666 less the umask.

    Returns its descriptor and its name; the caller writes, then renames it onto ``path`` or removes it.
    """
    while True:
        temporary = _temporary_name(path)
        try:
            return os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), temporary
        except FileExistsError:  # another writer drew the same name: draw again
            continue


def write_bytes_atomically(path: Path, data: bytes) -> None:
    """Writes ``data`` to a temporary file beside ``path`` and renames it into place.

    A reader sees the old file or the new one, never a part; a failure or an interrupt removes the
    temporary file. Concurrent writers each use a temporary file of their own, and the last rename wins.
    The file's mode is 0666 less the umask.
    """
    descriptor, temporary = open_temporary(Path(path))
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as exc:
        temporary.unlink(missing_ok=True)
        _name_in(exc, path)
        raise


def read_versioned_json(path: Path, *, what: str, newest: int, fix: str, use: str, kind: str = "") -> dict:
    """A finetune JSON file whose ``format_version`` (1 when absent) this finetune reads, as a dict.

    The owner of the format checks the fields; this checks what every owner's file shares.

    Args:
        what: what the file is, for the messages ("run config", "model description").
        kind: whose format version it is ("train-dir", "exported-model"), when the message names it.
        newest: the newest format version this finetune reads.
        fix: what to do about a damaged file.
        use: what a newer file is for, in "upgrade finetune to use this run".

    Raises:
        FinetuneError: the file is unreadable, truncated, not a JSON object, or of a bad or newer version.
    """
    import json

    from finetune import __version__
    from finetune.errors import FinetuneError

    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise FinetuneError(f"{path} is unreadable or truncated ({reason}); {fix}") from None
    if not isinstance(values, dict):
        raise FinetuneError(f"{path} is not a finetune {what} (a JSON {type(values).__name__}, not an object); {fix}")
    version = values.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise FinetuneError(f"{path} has a bad format_version ({version!r}); {fix}")
    if version > newest:
        raise FinetuneError(
            f"{path} is {kind + ' ' if kind else ''}format version {version}, newer than this finetune ({__version__}) reads "
            f"(up to {newest}); upgrade finetune to use {use}"
        )
    return values


def write_text_atomically(path: Path, text: str) -> None:
    """Writes ``text`` (UTF-8) as :func:`write_bytes_atomically` does."""
    write_bytes_atomically(path, text.encode("utf-8"))


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` (``.<name>.<pid>.<random>.tmp``) for a writer that takes a path.

    When the block ends the temporary file is renamed onto ``path``; a failure or an interrupt removes it
    instead, so ``path`` is never seen half written. The file is not created in advance: the writer
    creates it, with its usual permissions (0666 less the umask for Python's ``open``, PIL and TensorFlow).
    """
    temporary = _temporary_name(Path(path))
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException as exc:
        _name_in(exc, path)
        raise
    finally:
        temporary.unlink(missing_ok=True)


def _name_in(exc: BaseException, path: str | os.PathLike) -> None:
    """Puts the final name in an OSError that names no file (a write on a full disk, say), so the one error
    line a user sees says which output it was."""
    if isinstance(exc, OSError) and exc.filename is None:
        exc.filename = os.fspath(path)
