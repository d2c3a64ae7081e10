"""One frozen dataclass per command: its options, their defaults and their help text, written once.

The CLI builds each subcommand's flags from these fields (``--some-name`` for ``some_name``, booleans as
``--x/--no-x``), and library code constructs the same dataclasses directly. Validation that needs no files
happens in ``__post_init__`` and raises a FinetuneError naming the flag.
"""

from __future__ import annotations

from dataclasses import MISSING, field
from typing import Any, Sequence


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
