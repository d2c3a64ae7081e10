"""One frozen dataclass per command: its options, their defaults and their help text, written once.

The CLI builds each subcommand's flags from these fields (``--some-name`` for ``some_name``, booleans as
``--x/--no-x``), and library code constructs the same dataclasses directly. Validation that needs no files
happens in ``__post_init__`` and raises a FinetuneError naming the flag.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field
from typing import Any, Sequence

from finetune.errors import FinetuneError
from finetune.pretrained import DEFAULT_MODEL, PRETRAINED


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    positional: bool = False,
    flag: str | None = None,
    choices: Sequence[str] | None = None,
    metavar: str | None = None,
) -> Any:
    """A config field with what the CLI needs to offer it as a flag.

    Args:
        default: the default (omit for a required option or a positional argument).
        help: one line for --help; the CLI appends the default.
        positional: offer it as a positional argument; a tuple-typed one takes one or more values.
        flag: the flag's name when ``--field-name`` will not do.
        choices: the values allowed.
        metavar: how --help writes the value.
    """
    metadata = {
        "help": help,
        "positional": positional,
        "flag": flag,
        "choices": tuple(choices) if choices else None,
        "metavar": metavar,
    }
    return field(default=default, metadata=metadata)


_SHA256_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class DownloadConfig:
    """Options of `finetune download`: which pretrained checkpoint, from where, and into which folder."""

    dest: str = option("checkpoints", help="folder for the checkpoint and its manifest", metavar="DIR")
    model: str = option(DEFAULT_MODEL, help="which pretrained checkpoint", choices=tuple(PRETRAINED))
    url: str | None = option(
        None,
        help="fetch from this mirror URL instead of the published ones, or unpack this local tarball "
        "(one downloaded by hand)",
        metavar="URL|PATH",
    )
    sha256: str | None = option(
        None, help="the tarball's expected sha256; a download that differs is refused", metavar="HEX"
    )
    force: bool = option(False, help="download again even when a verified checkpoint is present")
    # 30 s is long for a healthy server and short enough that a dead connection is noticed.
    timeout: float = option(
        30.0, help="seconds to wait for a connection, or for more data, before a try fails", metavar="SECONDS"
    )
    # Four retries with backoff (1, 2, 4, 8 s) ride out a brief outage without hiding a real one.
    retries: int = option(
        4, help="tries after the first on connection errors, timeouts and HTTP 5xx", metavar="N"
    )

    def __post_init__(self) -> None:
        if self.model not in PRETRAINED:
            raise FinetuneError(f"--model {self.model}: unknown; choose one of {', '.join(PRETRAINED)}")
        if self.sha256 is not None:
            digest = self.sha256.strip().lower()
            if len(digest) != 64 or not set(digest) <= _SHA256_HEX:
                raise FinetuneError(
                    f"--sha256 {self.sha256}: not a sha256 digest; give the 64 hex digits that "
                    "`sha256sum FILE` prints"
                )
            object.__setattr__(self, "sha256", digest)
        if not self.timeout > 0:
            raise FinetuneError(f"--timeout {self.timeout}: must be more than 0 seconds")
        if self.retries < 0:
            raise FinetuneError(f"--retries {self.retries}: must be 0 or more")
