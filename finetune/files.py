"""Writing a file so that it is never seen half written."""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path


def write_text_atomically(path: Path, text: str) -> None:
    """Writes ``text`` to a temporary file beside ``path`` (``.<name>.*.tmp``) and renames it into place.

    A reader sees the old file or the new one, never a part; a failure or an interrupt removes the
    temporary file. Concurrent writers each use a temporary file of their own, and the last rename wins.
    """
    descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` (``.<name>.<pid>.<random>.tmp``) for a writer that takes a path.

    When the block ends the temporary file is renamed onto ``path``; a failure or an interrupt removes it
    instead, so ``path`` is never seen half written. The file is not created in advance: the writer
    creates it, with its usual permissions.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
