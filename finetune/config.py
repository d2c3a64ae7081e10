"""One frozen dataclass per command: its options, their defaults and their help text, written once.

The CLI builds each subcommand's flags from these fields (``--some-name`` for ``some_name``, booleans as
``--x/--no-x``), and library code constructs the same dataclasses directly. Validation that needs no files
happens in ``__post_init__`` and raises a FinetuneError naming the flag.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field
from typing import Any, NoReturn, Sequence

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

def _fail(flag: str, problem: str) -> NoReturn:
    raise FinetuneError(f"{flag} {problem}")


@dataclass(frozen=True)
class BuildDatasetConfig:
    """`finetune build-dataset`: a class-per-folder tree of images to sharded TFRecords."""

    image_dir: str = option(
        help="folder with one subfolder of images per class", positional=True, metavar="IMAGE_DIR"
    )
    out: str = option(help="dataset folder to write, e.g. datasets/flowers", metavar="DIR")
    # slim held out about 10% of flowers (350 of 3,670) for validation.
    validation_fraction: float = option(
        0.1, help="share of each class held out for validation", metavar="FRACTION"
    )
    test_fraction: float = option(
        0.0, help="share of each class held out for a final test", metavar="FRACTION"
    )
    # The split depends only on an image's bytes and this seed, so it survives adding images.
    seed: int = option(0, help="seed of the split; the same seed gives the same split")
    # None: one shard per ~100 MB of images, so a split reads in parallel without thousands of small files.
    shards: int | None = option(
        None, help="TFRecord files per split (default: one per ~100 MB of images)", metavar="N"
    )
    # None: images keep their size; decoding huge photos then dominates training input time.
    max_side: int | None = option(
        None, help="downsize images whose longer side exceeds this (default: off)", metavar="PIXELS"
    )
    # None: every core this process may use.
    workers: int | None = option(
        None, help="processes decoding and checking images (default: all cores)", metavar="N"
    )
    overwrite: bool = option(False, help="replace a dataset already at --out")

    def __post_init__(self) -> None:
        fractions = {"--validation-fraction": self.validation_fraction, "--test-fraction": self.test_fraction}
        for flag, value in fractions.items():
            if not 0.0 <= value < 1.0:
                _fail(flag, f"must be at least 0 and below 1, got {value}")
        if self.validation_fraction + self.test_fraction >= 1.0:
            _fail(
                "--validation-fraction",
                f"plus --test-fraction must stay below 1 to leave images for training, "
                f"got {self.validation_fraction} + {self.test_fraction}",
            )
        counts = (("--shards", self.shards), ("--max-side", self.max_side), ("--workers", self.workers))
        for flag, value in counts:
            if value is not None and value < 1:
                _fail(flag, f"must be at least 1, got {value}")


@dataclass(frozen=True)
class PreviewConfig:
    """`finetune preview`: training examples after train preprocessing, beside their originals."""

    dataset: str = option(
        help="dataset folder written by build-dataset", positional=True, metavar="DATASET"
    )
    out: str = option("preview.png", help="image file to write (.png or .jpg)", metavar="FILE")
    count: int = option(8, help="training examples to show", metavar="N")
    # InceptionV3's pretrained input size (finetune.model.DEFAULT_IMAGE_SIZE; not imported: it loads TF).
    image_size: int = option(
        299, help="network input size the examples are preprocessed to", metavar="PIXELS"
    )
    seed: int = option(0, help="picks the examples and their random crops")

    def __post_init__(self) -> None:
        if not 1 <= self.count <= 64:
            _fail("--count", f"must be between 1 and 64, got {self.count}")
        if self.image_size < 32:
            _fail("--image-size", f"must be at least 32 pixels, got {self.image_size}")


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
