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
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


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
    finally:
        temporary.unlink(missing_ok=True)
