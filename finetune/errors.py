"""The errors a user can fix. Each message says what went wrong, where (file or flag), and how to fix it.

The CLI prints a FinetuneError as one `error: ...` line on stderr and exits 1; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


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
