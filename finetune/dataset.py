"""A class-per-folder tree of images to sharded TFRecords, and the tf.data reader that train and evaluate use.

``build_dataset`` scans ``IMAGE_DIR/<class>/**``, checks and decodes every file in worker processes, splits
the images into train / validation / test, and writes ``<split>-00000-of-000NN.tfrecord`` shards,
``labels.txt`` and ``dataset.json`` into a hidden folder beside ``--out`` that is renamed into place only when
everything is written.

The split of an image is a function of its bytes and ``--seed``: the SHA-256 of the content, hashed again
with the seed, gives a position in [0, 1); positions below the validation fraction go to validation, the next
``test_fraction`` to test, the rest to train. Each class is split on its own (stratified). Images that must
stay together share one position, their lowest: identical files, and (``--near-duplicates on``, the default)
near-duplicates found by perceptual hash (finetune/phash.py), so no picture leaks from train into validation
as a resized or re-encoded copy. A class gets its fraction in expectation, not exactly; a class with no
position in a split it needs gets its nearest image *promoted* into it (``split_units`` says which, and
exactly which images can move when a folder grows: only promoted ones). dataset.json lists the promoted
images and the near-duplicate sets.

Records carry slim's keys (``image/encoded``, ``image/format`` = ``b"jpg"``, ``image/class/label``,
``image/height``, ``image/width``) plus ``image/filename``, the path relative to IMAGE_DIR, so slim-based
tools read them as they are.

``load_dataset`` and ``read_dataset`` turn a built folder back into a ``tf.data`` pipeline. TensorFlow is
imported only by the functions that need it: the worker processes and ``finetune --help`` never load it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import random
import secrets
import shutil
import signal
import statistics
import time
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterable, Iterator

from finetune import __version__
from finetune.config import BuildDatasetConfig
from finetune.errors import DataError, EmptySplitError
from finetune.network import EXIF_ORIENTATION, JPEG_QUALITY
from finetune.progress import Progress
from finetune.paths import NotReadable, printable, read_regular_file, walk_files

if TYPE_CHECKING:
    from PIL import Image as PILImage

log = logging.getLogger("finetune")

SPLITS = ("train", "validation", "test")
DATASET_JSON = "dataset.json"
LABELS_TXT = "labels.txt"
FORMAT = "finetune-dataset"
# 2: near-duplicate groups (near_duplicates) and the split's promoted images (split); 1 is still read.
FORMAT_VERSION = 2
# TensorFlow's input-pipeline guide: shards of 100 MB or more read at full speed; fewer, larger files also
# keep a small dataset in one file per split.
SHARD_TARGET_BYTES = 100 * 2**20
# The training shuffle buffer holds encoded images; cap its memory rather than its length.
SHUFFLE_BUFFER_BYTES = 256 * 2**20
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
# Pillow's names for files TensorFlow's JPEG decoder reads as they are. MPO (phones, stereo cameras) is a
# JPEG followed by more frames; decode_jpeg reads the first, as Pillow does.
_JPEG_FORMATS = ("JPEG", "MPO")
_REBUILD = "rebuild it with `finetune build-dataset IMAGE_DIR --out {root} --overwrite`"


# ------------------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class DatasetInfo:
    """A built dataset, as its dataset.json describes it."""

    root: Path  # the dataset folder
    classes: tuple[str, ...]  # label id i -> classes[i]
    split_counts: dict[str, int]  # split -> examples, only for splits that exist
    class_counts: dict[str, list[int]]  # split -> examples per class id
    fingerprint: str  # SHA-256 over every stored image, its label, path and split
    image_size_stats: dict  # sizes of the source images and of what was stored
    shard_names: dict[str, tuple[str, ...]] = field(default_factory=dict)  # split -> shard file names
    split_bytes: dict[str, int] = field(default_factory=dict)  # split -> bytes of encoded images
    metadata: dict = field(default_factory=dict, compare=False, repr=False)  # all of dataset.json

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def files(self, split: str) -> list[Path]:
        """The split's TFRecord shards, in order.

        Raises:
            DataError: the split is not one of SPLITS or this dataset has no examples in it.
        """
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")
        if not self.split_counts.get(split):
            held = ", ".join(name for name in SPLITS if self.split_counts.get(name))
            fix = f" (rebuild with --{split}-fraction above 0)" if split != "train" else ""
            raise DataError(f"dataset {self.root} has no {split} split{fix}; it has: {held}")
        return [self.root / name for name in self.shard_names[split]]


@dataclass(frozen=True)
class BuildResult:
    """What build_dataset wrote and what it left out."""

    out: Path
    classes: tuple[str, ...]
    split_counts: dict[str, int]
    class_counts: dict[str, list[int]]  # split -> examples per class id
    shards: dict[str, int]  # split -> shard files
    files_seen: int  # files below the class folders (hidden ones aside) and beside them
    converted: int  # images re-encoded as RGB JPEG
    duplicate_groups: int  # sets of byte-identical images
    duplicate_files: int  # images in those sets
    near_duplicate_groups: int  # sets of near-duplicates (resized, re-encoded, cropped copies): one split each
    near_duplicate_files: int  # images in those sets
    promoted: int  # images moved off their hash split so that every class has an image in every split
    skipped: int  # files left out; dataset.json lists them with reasons
    fingerprint: str
    seconds: float
    images_per_second: float  # files seen per second of the whole build


# ------------------------------------------------------------------------------------------------ scanning


@dataclass(frozen=True)
class _Scan:
    classes: tuple[str, ...]
    files: list[tuple[str, int]]  # (path relative to IMAGE_DIR, label), class by class, names sorted
    skipped: list[tuple[str, str]]  # (path, reason) for files that are not inside a class folder


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _check_image_dir(image_dir: Path) -> None:
    if not image_dir.exists():
        raise DataError(f"IMAGE_DIR {image_dir} does not exist; pass a folder with one subfolder per class")
    if not image_dir.is_dir():
        raise DataError(f"IMAGE_DIR {image_dir} is not a folder; pass a folder with one subfolder per class")


def _scan(image_dir: Path) -> _Scan:
    """Lists the classes (sorted subfolder names) and every non-hidden file below each."""
    with os.scandir(image_dir) as scan:
        entries = sorted((entry for entry in scan if not _hidden(entry.name)), key=lambda entry: entry.name)
    classes = tuple(entry.name for entry in entries if entry.is_dir())
    if len(classes) < 2:
        found = f" ({classes[0]})" if classes else ""
        raise DataError(
            f"IMAGE_DIR {image_dir} has {len(classes)} class folder{found}; a classifier needs at least 2: "
            f"put each class's images in its own subfolder"
        )
    for name in classes:
        if printable(name) != name:
            raise DataError(
                f"IMAGE_DIR {image_dir} has a class folder named \"{printable(name)}\" (a newline or bytes that "
                f"are not UTF-8); rename it, since the class name is stored as text"
            )
    skipped = [(entry.name, "not inside a class folder") for entry in entries if not entry.is_dir()]
    files: list[tuple[str, int]] = []
    seen: set[tuple[int, int]] = set()
    for label, name in enumerate(classes):
        for path, problem in walk_files(image_dir / name, seen):
            relative = Path(path).relative_to(image_dir).as_posix()
            if problem is None:
                files.append((relative, label))
            else:
                skipped.append((relative, problem))
    return _Scan(classes=classes, files=files, skipped=skipped)


# ------------------------------------------------------------------------------------------------ checking


@dataclass(frozen=True)
class _Image:
    """A usable image, as a worker found it."""

    path: str  # relative to IMAGE_DIR
    label: int
    sha256: str  # of the file's bytes: decides the split and finds duplicates
    stored_sha256: str  # of the bytes written to the record
    stored_bytes: int
    width: int  # as stored
    height: int
    original_width: int  # upright, before --max-side
    original_height: int
    format: str  # what Pillow found, e.g. "JPEG", "PNG"
    conversions: tuple[str, ...]  # why it was re-encoded: "format", "colour", "orientation", "max_side"
    data: bytes | None = None  # the re-encoded JPEG from the worker; None when the file's bytes are stored
    staged_at: int | None = None  # offset of the re-encoded JPEG in the build's staging file
    phash: Any = None  # phash.Signature: perceptual hashes and colour; None when not computed


@dataclass(frozen=True)
class _Skip:
    path: str
    reason: str


def _orientation(image: PILImage.Image) -> int:
    """The EXIF orientation (1 = upright; 2-8 need a flip or turn); 1 when absent or unreadable."""
    try:
        value = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block does not make the picture unusable
        return 1
    return value if value in range(2, 9) else 1


def _to_rgb(image: PILImage.Image) -> PILImage.Image:
    """Any Pillow mode to 8-bit RGB: 16-bit scaled down, transparency composed onto white, CMYK converted."""
    import numpy as np
    from PIL import Image

    if image.mode in _SIXTEEN_BIT_MODES:
        pixels = np.asarray(image, dtype=np.float64) / 257.0  # 65535 -> 255
        return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _bomb_reason(detail: str) -> str:
    return f"decompression bomb: Pillow's limit is {_pixel_limit():,} pixels and this has {detail}; not decoded"


def _pixel_limit() -> int:
    from PIL import Image

    return int(Image.MAX_IMAGE_PIXELS or 0)


def _perceptual_hashes(image: PILImage.Image, orientation: int) -> Any:
    """The image's phash.Signature, upright; None when the picture is flat or cannot be hashed."""
    from PIL import ImageOps

    from finetune import phash

    try:
        upright = ImageOps.exif_transpose(image) if orientation != 1 else image
        return phash.signature(upright if upright.mode in ("L", "RGB") else _to_rgb(upright))
    except Exception:  # an odd mode or palette: the image is still usable, only not compared
        return None


def _check_file(
    root: str, max_side: int | None, item: tuple[str, int], near_duplicates: bool = False
) -> _Image | _Skip:
    """Reads, identifies by content, decodes and if needed converts one file. Runs in a worker.

    A JPEG stored as it is decodes at a reduced scale (phash.draft): every byte is still read and entropy-
    decoded, so truncated and corrupt files fail as in a full decode, at about half its cost. With
    ``near_duplicates`` it also computes the image's perceptual hashes, on the picture already decoded.
    """
    from PIL import Image, ImageOps

    from finetune import phash

    path, label = item
    try:
        data = read_regular_file(os.path.join(root, path))  # never blocks on a FIFO swapped in since the scan
    except NotReadable as exc:
        return _Skip(path, str(exc))
    if not data:
        return _Skip(path, "empty file (0 bytes)")
    sha256 = hashlib.sha256(data).hexdigest()
    with warnings.catch_warnings():
        # Pillow warns about big images and odd palettes; both are decided on below.
        warnings.simplefilter("ignore")
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:  # over twice the limit: Pillow refuses to open it at all
            return _Skip(path, _bomb_reason("more than twice that many pixels"))
        except Exception:  # UnidentifiedImageError, or a parser giving up on the header
            return _Skip(path, "not an image: no format Pillow reads matches its content")
        with image:
            width, height = image.size
            if _pixel_limit() and width * height > _pixel_limit():
                return _Skip(path, _bomb_reason(f"{width}x{height} = {width * height:,} pixels"))
            too_big = max_side is not None and max(width, height) > max_side
            if image.format in _JPEG_FORMATS and image.mode == "RGB" and not too_big and _orientation(image) == 1:
                # Stored as its own bytes: its pixels are only checked and hashed, so a smaller decode will do
                phash.draft(image)
            try:
                image.load()  # decodes every pixel: truncated and corrupt files fail here
            except Exception as exc:
                return _Skip(path, f"truncated or corrupt {image.format or 'image'}: {exc}")
            source_format = image.format or "unknown"
            orientation = _orientation(image)
            hashes = _perceptual_hashes(image, orientation) if near_duplicates else None
            conversions = tuple(
                reason
                for reason, applies in (
                    ("format", source_format not in _JPEG_FORMATS),
                    ("colour", image.mode != "RGB"),
                    ("orientation", orientation != 1),
                    ("max_side", too_big),
                )
                if applies
            )
            if not conversions:  # a clean 3-channel JPEG: its own bytes, no re-encode
                size = (width, height, width, height)
                return _Image(path, label, sha256, sha256, len(data), *size, source_format, (), phash=hashes)
            try:
                upright = ImageOps.exif_transpose(image) if orientation != 1 else image
                original_width, original_height = upright.size
                rgb = _to_rgb(upright)
                if too_big:
                    rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
                buffer = io.BytesIO()
                rgb.save(buffer, format="JPEG", quality=JPEG_QUALITY)
            except Exception as exc:
                return _Skip(path, f"undecodable {source_format} ({image.mode}): {exc}")
    stored = buffer.getvalue()
    return _Image(
        path, label, sha256, hashlib.sha256(stored).hexdigest(), len(stored), rgb.width, rgb.height,
        original_width, original_height, source_format, conversions, stored, phash=hashes,
    )  # fmt: skip


def _ignore_interrupts() -> None:
    """Workers leave Ctrl-C to the parent, which stops them; otherwise each prints its own traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _map_unordered(function: Callable, items: list, workers: int) -> Iterator:
    """``function`` over ``items`` in ``workers`` processes (in this one when 1), results as they finish."""
    if workers <= 1:
        yield from map(function, items)
        return
    # spawn, not fork: the caller may already hold TensorFlow's threads, which fork does not copy safely.
    context = multiprocessing.get_context("spawn")
    chunksize = max(1, min(64, len(items) // (workers * 8)))
    with context.Pool(workers, initializer=_ignore_interrupts) as pool:
        yield from pool.imap_unordered(function, items, chunksize=chunksize)


def default_workers() -> int:
    """Every core this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------------------------- splitting


def _position(sha256: str, seed: int) -> float:
    """Where an image's content puts it on [0, 1) for this seed; the split is read off this position."""
    digest = hashlib.sha256(f"finetune-split:{seed}:{sha256}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _split_of(position: float, validation_fraction: float, test_fraction: float) -> str:
    if position < validation_fraction:
        return "validation"
    if position < validation_fraction + test_fraction:
        return "test"
    return "train"


def _names(classes: Iterable[str]) -> str:
    names = [repr(name) for name in classes]
    return f"class {names[0]}" if len(names) == 1 else f"classes {', '.join(names)}"


@dataclass(frozen=True)
class _Units:
    """The images that must share a split: identical files and near-duplicates, each set one unit."""

    members: list[list[_Image]]  # unit -> its images, sorted by path
    near_groups: list[dict]  # dataset.json's near_duplicates.groups: paths and the close pairs found


def _units(images: list[_Image], near_duplicates: bool) -> _Units:
    """Joins identical files, and (with ``near_duplicates``) images within phash.NEAR_DUPLICATE_DISTANCE."""
    from finetune import phash

    parent = list(range(len(images)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(i: int, j: int) -> None:
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)

    first_of: dict[str, int] = {}
    for index, image in enumerate(images):
        join(index, first_of.setdefault(image.sha256, index))
    close: list[tuple[int, int, int]] = []
    if near_duplicates:
        # One hash per content: identical files are already joined and would only pair at distance 0.
        hashed = [index for content, index in sorted(first_of.items()) if images[index].phash is not None]
        for a, b, distance in phash.close_pairs([images[index].phash for index in hashed]):
            close.append((hashed[a], hashed[b], distance))
            join(hashed[a], hashed[b])
    by_root: dict[int, list[int]] = defaultdict(list)
    for index in range(len(images)):
        by_root[root(index)].append(index)
    members = [sorted((images[i] for i in group), key=lambda image: image.path) for group in by_root.values()]
    pairs_of: dict[int, list[list]] = defaultdict(list)
    for a, b, distance in close:
        first, second = sorted((images[a].path, images[b].path))
        pairs_of[root(a)].append([first, second, distance])
    near_groups = [
        {"paths": sorted(images[i].path for i in by_root[key]), "pairs": sorted(pairs)}
        for key, pairs in pairs_of.items()
    ]
    return _Units(members=members, near_groups=sorted(near_groups, key=lambda group: group["paths"]))


def _required_splits(config: BuildDatasetConfig) -> tuple[str, ...]:
    """The splits every class must have an image in, in the order they are filled."""
    held = (("validation", config.validation_fraction), ("test", config.test_fraction))
    return tuple(split for split, fraction in held if fraction > 0) + ("train",)


def _refuse_small_classes(
    classes: tuple[str, ...], unit_counts: list[int], image_counts: list[int], config: BuildDatasetConfig
) -> None:
    """Refuses a class with fewer images (sets of copies counted once) than there are splits to fill."""
    required = _required_splits(config)
    small = [label for label, units in enumerate(unit_counts) if units < len(required)]
    if not small:
        return
    details = []
    for label in small:
        images, units = image_counts[label], unit_counts[label]
        copies = f" ({units} once copies are counted once: identical or near-duplicate images share a split)"
        details.append(f"{classes[label]!r} has {images} image{'s' if images != 1 else ''}"
                       + (copies if units != images else ""))  # fmt: skip
    flags = " and ".join(f"--{split}-fraction 0" for split in required[:-1] if split != "train")
    raise EmptySplitError(
        f"{'; '.join(details)}: each class needs at least {len(required)} to have an image in each of "
        f"{', '.join(('train',) + required[:-1])}; add images to {'it' if len(small) == 1 else 'them'}, "
        f"or pass {flags} "
        f"to build without {'that split' if len(required) == 2 else 'those splits'}"
    )


def _assign_splits(
    classes: tuple[str, ...], by_class: list[list[_Image]], config: BuildDatasetConfig
) -> tuple[dict[str, list[_Image]], _Units, list[dict]]:
    """Each image's split (see :func:`split_units`); each split ordered by position, which mixes the classes.

    Returns the splits, the units, and the promoted images as dataset.json lists them.
    """
    images = [image for group in by_class for image in group]
    units = _units(images, config.near_duplicates == "on")
    positions = [min(_position(image.sha256, config.seed) for image in unit) for unit in units.members]
    labels = [sorted({image.label for image in unit}) for unit in units.members]
    split_of, promotions = split_units(positions, labels, len(classes), config, classes,
                                       [len(group) for group in by_class])  # fmt: skip
    assigned: dict[str, list[tuple[float, str, _Image]]] = defaultdict(list)
    promoted = []
    for unit, (members, position) in enumerate(zip(units.members, positions)):
        for image in members:
            assigned[split_of[unit]].append((position, image.path, image))
        if unit in promotions:
            before, label = promotions[unit]
            promoted += [{"path": image.path, "class": classes[label], "from": before, "to": split_of[unit]}
                         for image in members]  # fmt: skip
    ordered = {split: [image for *_, image in sorted(assigned[split])] for split in SPLITS if assigned[split]}
    return ordered, units, sorted(promoted, key=lambda row: row["path"])


def split_units(
    positions: list[float],
    labels: list[list[int]],
    num_classes: int,
    config: BuildDatasetConfig,
    classes: tuple[str, ...] | None = None,
    image_counts: list[int] | None = None,
) -> tuple[list[str], dict[int, tuple[str, int]]]:
    """The split of each unit (a set of images that must stay together), from its position and the minimums.

    Every unit first takes the split its position gives (``_split_of``): the hash split, which adding or
    removing other images never changes. Then each class, in label order, that has no unit in a split it
    needs (validation when its fraction is above 0, test likewise, train always), in that order, is given one
    by *promoting* a single unit of its own:

    - into validation or test: its train unit of lowest position (the one nearest the held-out range), or,
      when train cannot spare one, the nearest unit of the other held-out split;
    - into train: its held-out unit of highest position.

    A unit is taken only from a split in which its class keeps another unit, and a unit shared with other
    classes (the same picture under two labels) only if those classes keep one too. So a class with at least
    as many units as splits always gets one unit in each.

    Which images can move when a folder grows: new images only ever add to a split's natural members, so
    a split a class lacks afterwards it lacked before. An image already in the dataset therefore changes
    split only if it was promoted before the images were added or is promoted after (dataset.json lists both
    under ``split.promoted``); at most one unit per class and split is promoted. (A new image that is a
    near-duplicate of old ones joins their unit, whose position is its lowest member's: that can move the
    unit, as it should, since copies must share a split.)

    Args:
        positions: each unit's position in [0, 1).
        labels: each unit's class ids (usually one).
        num_classes: how many classes.
        config: the fractions.
        classes, image_counts: class names and images per class, for the error message.

    Returns:
        Each unit's split, and for each promoted unit its split before promotion and the class it was
        promoted for.

    Raises:
        EmptySplitError: a class has fewer units than splits to fill.
    """
    required = _required_splits(config)
    split_of = [_split_of(p, config.validation_fraction, config.test_fraction) for p in positions]
    of_class = _units_of_class(labels, num_classes)
    classes = classes or tuple(str(label) for label in range(num_classes))
    counts = image_counts or [len(units) for units in of_class]
    _refuse_small_classes(classes, [len(units) for units in of_class], counts, config)
    # How many units each class has in each split, kept current as units move.
    held: list[Counter] = [Counter(split_of[unit] for unit in units) for units in of_class]
    promotions: dict[int, tuple[str, int]] = {}

    def can_spare(unit: int) -> bool:
        return all(held[label][split_of[unit]] > 1 for label in labels[unit])

    for label in range(num_classes):
        for split in required:
            if held[label][split]:
                continue
            candidates = _promotion_candidates(of_class[label], split, positions, split_of)
            chosen = next((unit for unit in candidates if split_of[unit] != split and can_spare(unit)), None)
            if chosen is None:
                raise _no_unit_to_promote(classes[label], split)
            for member_label in labels[chosen]:
                held[member_label][split_of[chosen]] -= 1
                held[member_label][split] += 1
            promotions.setdefault(chosen, (split_of[chosen], label))
            split_of[chosen] = split
    return split_of, promotions


def _units_of_class(labels: list[list[int]], num_classes: int) -> list[list[int]]:
    """For each class id, the units that hold it (a unit shared by two classes is in both lists)."""
    of_class: list[list[int]] = [[] for _ in range(num_classes)]
    for unit, unit_labels in enumerate(labels):
        for label in unit_labels:
            of_class[label].append(unit)
    return of_class


def _promotion_candidates(units: list[int], split: str, positions: list[float], split_of: list[str]) -> list[int]:
    """A class's units in the order :func:`split_units` tries them when the class has none in ``split``."""
    units = sorted(units, key=lambda unit: (positions[unit], unit))
    if split == "train":  # the held-out unit of highest position
        return units[::-1]
    from_train = [unit for unit in units if split_of[unit] == "train"]
    other = [unit for unit in units if split_of[unit] not in ("train", split)]
    if split == "validation":  # the test units nearest validation's range come first
        return from_train + other
    return from_train + other[::-1]  # test lies above validation: the highest validation units are the nearest


def _no_unit_to_promote(class_name: str, split: str) -> EmptySplitError:
    return EmptySplitError(
        f"class {class_name!r} cannot be given a {split} image: each of its images is the only "
        f"one of its class in its split, or shared with another class (see near_duplicates); add "
        f"images to it"
    )


# ------------------------------------------------------------------------------------------------- writing


def _shard_count(split_bytes: int, examples: int, requested: int | None) -> int:
    wanted = requested or math.ceil(split_bytes / SHARD_TARGET_BYTES)
    return max(1, min(wanted, examples))


def shard_name(split: str, index: int, count: int) -> str:
    """slim's naming: ``train-00000-of-00004.tfrecord``."""
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def _example(tf: Any, encoded: bytes, image: _Image) -> bytes:
    """One serialized tf.train.Example with slim's keys and the relative path."""

    def as_bytes(value: bytes) -> Any:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    def as_int(value: int) -> Any:
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))

    features = {
        "image/encoded": as_bytes(encoded),
        "image/format": as_bytes(b"jpg"),
        "image/class/label": as_int(image.label),
        "image/height": as_int(image.height),
        "image/width": as_int(image.width),
        "image/filename": as_bytes(image.path.encode("utf-8", "surrogateescape")),  # any file name
    }
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def _size_stats(values: list[int]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _fingerprint(classes: tuple[str, ...], assigned: dict[str, list[_Image]]) -> str:
    digest = hashlib.sha256(json.dumps(list(classes)).encode())
    rows = sorted((split, image.path, image.label, image.stored_sha256) for split, images in assigned.items()
                  for image in images)  # fmt: skip
    for split, path, label, stored_sha256 in rows:
        # surrogateescape: a file name that is not UTF-8 digests as its own bytes; UTF-8 names are unchanged.
        digest.update(f"{split}\t{label}\t{path}\t{stored_sha256}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


@contextlib.contextmanager
def _partial_folder(out: Path) -> Iterator[Path]:
    """A new hidden folder beside ``out``; on failure it goes, with any parent folders made for it."""
    out = out.absolute()
    made = [parent for parent in out.parents if not parent.exists()]  # deepest first
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)
    # Not tempfile.mkdtemp: its 0700 mode would stay on the published folder; mkdir honours the umask.
    partial = out.parent / f".{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    partial.mkdir()
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        for parent in made:
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise


def _remove_stale_partials(out: Path) -> None:
    """Removes what killed builds of ``out`` left behind (their process is gone)."""
    for partial in out.parent.glob(f".{out.name}.partial-*"):
        try:
            pid = int(partial.name.rsplit(".partial-", 1)[1].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(partial, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue  # not ours, or another user's build still running


def _publish(partial: Path, out: Path) -> None:
    """Renames the finished folder into place, replacing an empty folder or (--overwrite) a dataset."""
    previous = None
    if out.exists():
        previous = out.with_name(f".{out.name}.replaced-{os.getpid()}")
        os.rename(out, previous)
    os.rename(partial, out)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def _check_out(out: Path, image_dir: Path, overwrite: bool) -> None:
    """Refuses an --out that would overwrite something, or that overlaps IMAGE_DIR."""
    out_path, image_path = out.resolve(), image_dir.resolve()
    if out_path == image_path or image_path in out_path.parents:
        raise DataError(
            f"--out {out} is inside IMAGE_DIR {image_dir}, where it would become a class; write it elsewhere"
        )
    if out_path in image_path.parents:
        raise DataError(f"IMAGE_DIR {image_dir} is inside --out {out}; write the dataset elsewhere")
    if out.exists():
        if not out.is_dir():
            raise DataError(f"--out {out} is a file; choose a folder name for the dataset")
        if (out / DATASET_JSON).exists():
            if not overwrite:
                raise DataError(f"--out {out} already holds a dataset; pass --overwrite to replace it")
        elif any(out.iterdir()):
            raise DataError(f"--out {out} is a folder with other files in it; choose a new or empty folder")


# ----------------------------------------------------------------------------------------------- building


def build_dataset(config: BuildDatasetConfig) -> BuildResult:
    """Builds a dataset folder from a class-per-folder tree of images (see the module docstring).

    Raises:
        DataError: IMAGE_DIR missing or with fewer than 2 classes; a class with no usable image; a split
            that some class would have no image in; --out already holding a dataset (without overwrite).
            Nothing is left at --out when it raises.
    """
    started = time.monotonic()
    image_dir, out = Path(config.image_dir), Path(config.out)
    _check_image_dir(image_dir)
    _check_out(out, image_dir, config.overwrite)
    scan = _scan(image_dir)
    workers = min(config.workers or default_workers(), max(1, len(scan.files)))
    where = f"{workers} worker processes" if workers > 1 else "this process"
    log.info(f"{len(scan.files)} files in {len(scan.classes)} class folders; checking them in {where}")

    with _partial_folder(out) as partial:
        staging_path = partial / "staging.bin"
        with open(staging_path, "w+b") as staging:
            images, skips = _check_images(image_dir, scan, config, workers, staging)
            skipped = [_Skip(path, reason) for path, reason in scan.skipped] + skips
            skipped.sort(key=lambda skip: skip.path)
            by_class = _group_by_class(scan.classes, images, skipped, image_dir)
            ordered, units, promoted = _assign_splits(scan.classes, by_class, config)
            shards = _write_shards(partial, ordered, config.shards, image_dir, staging)
        staging_path.unlink()
        metadata = _metadata(config, image_dir, scan.classes, ordered, shards, skipped, images, units, promoted)
        labels = "".join(f"{label}:{name}\n" for label, name in enumerate(scan.classes))
        (partial / LABELS_TXT).write_text(labels, encoding="utf-8")
        (partial / DATASET_JSON).write_text(json.dumps(metadata, indent=1) + "\n")  # last: marks it complete
        _publish(partial, out)

    seen = len(scan.files) + len(scan.skipped)
    if skipped:
        log.warning(
            f"skipped {len(skipped)} of {seen} files that are not usable images; each is listed with its "
            f"reason under \"skipped\" in {out / DATASET_JSON}"
        )
    groups = metadata["duplicates"]["groups"]
    spanning = [group for group in groups if len({path.split("/")[0] for path in group}) > 1]
    if spanning:
        log.warning(
            f"{len(spanning)} sets of identical images span more than one class folder (mislabelled?); "
            f"they are listed under \"duplicates\" in {out / DATASET_JSON}"
        )
    near = metadata["near_duplicates"]["groups"]
    near_spanning = [group for group in near if len({path.split("/")[0] for path in group["paths"]}) > 1]
    if near_spanning:
        log.warning(
            f"{len(near_spanning)} sets of near-duplicate images span more than one class folder (mislabelled?); "
            f"they are listed under \"near_duplicates\" in {out / DATASET_JSON}, and `finetune audit` shows them"
        )
    seconds = time.monotonic() - started
    return BuildResult(
        out=out,
        classes=scan.classes,
        split_counts=metadata["split_counts"],
        class_counts=metadata["class_counts"],
        shards={split: len(names) for split, names in shards.items()},
        files_seen=seen,
        converted=metadata["images"]["converted"],
        duplicate_groups=len(metadata["duplicates"]["groups"]),
        duplicate_files=metadata["duplicates"]["files"],
        near_duplicate_groups=len(near),
        near_duplicate_files=sum(len(group["paths"]) for group in near),
        promoted=len(promoted),
        skipped=len(skipped),
        fingerprint=metadata["fingerprint"],
        seconds=round(seconds, 3),
        images_per_second=round(seen / seconds, 1) if seconds > 0 else 0.0,
    )


def _check_images(
    image_dir: Path, scan: _Scan, config: BuildDatasetConfig, workers: int, staging: BinaryIO
) -> tuple[list[_Image], list[_Skip]]:
    """Checks every file in worker processes; re-encoded images go to ``staging`` as they arrive."""
    images: list[_Image] = []
    skips: list[_Skip] = []
    near_duplicates = config.near_duplicates == "on"
    check = functools.partial(_check_file, str(image_dir), config.max_side, near_duplicates=near_duplicates)
    # closing(): on an error or Ctrl-C the worker pool stops at once, not when the traceback is freed.
    results = contextlib.closing(_map_unordered(check, scan.files, workers))
    with Progress("Checking images", total=len(scan.files), unit="images") as progress, results as checked:
        for result in checked:
            if isinstance(result, _Skip):
                skips.append(result)
            elif result.data is not None:
                offset = staging.tell()
                staging.write(result.data)
                images.append(dataclasses.replace(result, data=None, staged_at=offset))
            else:
                images.append(result)
            progress.advance(1)
    return images, skips


def _group_by_class(
    classes: tuple[str, ...], images: list[_Image], skipped: list[_Skip], image_dir: Path
) -> list[list[_Image]]:
    """Images per class id, sorted by path; refuses a class with no usable image."""
    by_class: list[list[_Image]] = [[] for _ in classes]
    for image in images:
        by_class[image.label].append(image)
    for label, group in enumerate(by_class):
        if not group:
            name = classes[label]
            reasons = [f"{s.path}: {s.reason}" for s in skipped if s.path.startswith(f"{name}/")]
            detail = f"{len(reasons)} files skipped, e.g. {reasons[0]}" if reasons else "it holds no files"
            raise DataError(
                f"class {name!r} ({image_dir / name}) has no usable image ({detail}); add images to it or "
                f"remove the folder"
            )
        group.sort(key=lambda image: image.path)
    return by_class


def _write_shards(
    partial: Path, ordered: dict[str, list[_Image]], requested: int | None, image_dir: Path, staging: BinaryIO
) -> dict[str, list[str]]:
    """Writes each split's records into its shards, in the given order; returns the shard names per split."""
    from finetune.compat import tf

    def encoded(image: _Image) -> bytes:
        if image.staged_at is not None:
            staging.seek(image.staged_at)
            return staging.read(image.stored_bytes)
        data = (image_dir / image.path).read_bytes()
        if hashlib.sha256(data).hexdigest() != image.sha256:
            raise DataError(f"{image_dir / image.path} changed while the dataset was built; build it again")
        return data

    shards: dict[str, list[str]] = {}
    total = sum(len(images) for images in ordered.values())
    with Progress("Writing records", total=total, unit="images") as progress:
        for split, images in ordered.items():
            count = _shard_count(sum(image.stored_bytes for image in images), len(images), requested)
            shards[split] = [shard_name(split, index, count) for index in range(count)]
            for index, name in enumerate(shards[split]):
                chunk = images[index * len(images) // count : (index + 1) * len(images) // count]
                with tf.io.TFRecordWriter(str(partial / name)) as writer:
                    for image in chunk:
                        writer.write(_example(tf, encoded(image), image))
                        progress.advance(1)
    return shards


def _metadata(
    config: BuildDatasetConfig,
    image_dir: Path,
    classes: tuple[str, ...],
    ordered: dict[str, list[_Image]],
    shards: dict[str, list[str]],
    skipped: list[_Skip],
    images: list[_Image],
    units: _Units,
    promoted: list[dict],
) -> dict[str, Any]:
    """The contents of dataset.json."""
    class_counts = {split: [0] * len(classes) for split in ordered}
    for split, group in ordered.items():
        for image in group:
            class_counts[split][image.label] += 1
    by_content: dict[str, list[str]] = defaultdict(list)
    for image in images:
        by_content[image.sha256].append(image.path)
    groups = sorted(sorted(paths) for paths in by_content.values() if len(paths) > 1)
    because = Counter(reason for image in images for reason in image.conversions)
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "classes": list(classes),
        "split_counts": {split: len(group) for split, group in ordered.items()},
        "class_counts": class_counts,
        "shards": shards,
        "split_bytes": {split: sum(i.stored_bytes for i in group) for split, group in ordered.items()},
        "fingerprint": _fingerprint(classes, ordered),
        "seed": config.seed,
        "validation_fraction": config.validation_fraction,
        "test_fraction": config.test_fraction,
        "max_side": config.max_side,
        "image_size_stats": {
            "images": len(images),
            "original_width": _size_stats([image.original_width for image in images]),
            "original_height": _size_stats([image.original_height for image in images]),
            "stored_width": _size_stats([image.width for image in images]),
            "stored_height": _size_stats([image.height for image in images]),
        },
        "images": {
            "formats": dict(sorted(Counter(image.format for image in images).items())),
            "stored_as_is": sum(1 for image in images if not image.conversions),
            "converted": sum(1 for image in images if image.conversions),
            "converted_because": dict(sorted(because.items())),
        },
        "duplicates": {"groups": groups, "files": sum(len(group) for group in groups)},
        "near_duplicates": _near_duplicates_metadata(config, images, units),
        "split": {
            "rule": "hash position; each class at least one image in each split, by promoting its nearest one",
            "promoted": promoted,
        },
        "skipped": [{"path": skip.path, "reason": skip.reason} for skip in skipped],
        "source": str(image_dir.resolve()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "finetune_version": __version__,
    }


def _near_duplicates_metadata(config: BuildDatasetConfig, images: list[_Image], units: _Units) -> dict:
    from finetune import phash

    if config.near_duplicates != "on":
        return {"checked": False, "groups": [], "files": 0}
    return {
        "checked": True,
        "hash": "DCT 63 bits, with 5 crops; 4x4 chroma grid",
        "threshold_bits": phash.NEAR_DUPLICATE_DISTANCE,
        "threshold_colour": phash.COLOUR_DISTANCE,
        "not_compared": sorted(image.path for image in images if image.phash is None),  # flat or unhashable
        "groups": units.near_groups,
        "files": sum(len(group["paths"]) for group in units.near_groups),
    }


# ------------------------------------------------------------------------------------------------ reading


def load_dataset(path: str | os.PathLike, flag: str = "--dataset") -> DatasetInfo:
    """Loads a dataset folder's description and checks that its shards are there.

    Args:
        path: the folder build-dataset wrote.
        flag: the flag the path came from, for error messages.

    Raises:
        DataError: the folder is missing, is not a dataset, or has a corrupt dataset.json or missing shards;
            the message names the path and the command that fixes it.
    """
    root = Path(path)
    build = f"build one with `finetune build-dataset IMAGE_DIR --out {root}`"
    if not root.exists():
        raise DataError(f"{flag} {root} does not exist; {build}")
    if not root.is_dir():
        raise DataError(f"{flag} {root} is a file, not a dataset folder; {build}")
    meta_path = root / DATASET_JSON
    if not meta_path.is_file():
        raise DataError(f"{flag} {root} is not a dataset (no {DATASET_JSON}); {build}")
    rebuild = _REBUILD.format(root=root)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{meta_path} is unreadable ({exc}); {rebuild}") from None
    try:
        if meta["format"] != FORMAT or meta["version"] > FORMAT_VERSION:
            raise DataError(
                f"{meta_path} is {meta['format']} version {meta['version']}, not one this finetune "
                f"({__version__}) reads; {rebuild}"
            )
        classes = tuple(str(name) for name in meta["classes"])
        counts = meta["split_counts"]
        split_counts = {split: int(counts[split]) for split in SPLITS if split in counts}
        info = DatasetInfo(
            root=root,
            classes=classes,
            split_counts=split_counts,
            class_counts={split: [int(n) for n in meta["class_counts"][split]] for split in split_counts},
            fingerprint=str(meta["fingerprint"]),
            image_size_stats=dict(meta["image_size_stats"]),
            shard_names={split: tuple(meta["shards"][split]) for split in split_counts},
            split_bytes={split: int(meta["split_bytes"][split]) for split in split_counts},
            metadata=meta,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DataError(f"{meta_path} is incomplete or corrupt (bad or missing {exc}); {rebuild}") from None
    for split in split_counts:
        for name in info.shard_names[split]:
            if not (root / name).is_file():
                raise DataError(f"{root / name} is missing from dataset {root}; {rebuild}")
    return info


def record_features() -> dict[str, Any]:
    """The parse spec of a record: slim's keys and ``image/filename``."""
    from finetune.compat import tf

    return {
        "image/encoded": tf.io.FixedLenFeature([], tf.string),
        "image/format": tf.io.FixedLenFeature([], tf.string, default_value="jpg"),
        "image/class/label": tf.io.FixedLenFeature([], tf.int64),
        "image/height": tf.io.FixedLenFeature([], tf.int64),
        "image/width": tf.io.FixedLenFeature([], tf.int64),
        "image/filename": tf.io.FixedLenFeature([], tf.string, default_value=""),
    }


def _shuffle_buffer(info: DatasetInfo, split: str) -> int:
    """Records held for shuffling: the whole split when it fits in SHUFFLE_BUFFER_BYTES."""
    count = info.split_counts[split]
    average = max(1, info.split_bytes.get(split, 0) // max(1, count))
    return max(1, min(count, SHUFFLE_BUFFER_BYTES // average))


SAMPLINGS = ("natural", "balanced")  # how training draws examples: as the split holds them, or classes equally


def record_stream(
    info: DatasetInfo,
    split: str,
    *,
    shuffle: bool,
    repeat: bool = False,
    seed: int | None = None,
    skip: int = 0,
    sampling: str = "natural",
) -> "tf.data.Dataset":
    """The split's serialized records paired with a stateless seed each, in the order training meets them.

    This is read_dataset before decoding. It is separate so that a path that never decodes (the feature
    cache, which maps each record to its cached features) meets the records in exactly the same order, with
    the same seeds, as the path that decodes them.

    Args:
        info: from :func:`load_dataset`.
        split: "train", "validation" or "test".
        shuffle: shuffle shard order and records (seeded); without it, file order, each record once a pass.
        repeat: repeat forever, reshuffled each pass.
        seed: makes the order and the seeds reproducible; None draws a fresh seed.
        skip: records to pass over (with their seeds) before the stream starts: a resumed run continues
            where an uninterrupted one would be, at the cost of reading records only.
        sampling: "balanced" draws every class equally often (within one) in each run of as many records
            as the split holds (see :func:`_balanced`); it holds the split's records in memory and implies
            shuffle. "natural": each record once a pass.
    """
    from finetune.compat import tf

    files = [str(path) for path in info.files(split)]
    if sampling == "balanced":
        features = {"image/class/label": tf.io.FixedLenFeature([], tf.int64)}
        in_file_order = tf.data.Dataset.from_tensor_slices(files).flat_map(tf.data.TFRecordDataset)

        def of_class(label: int):
            return in_file_order.filter(lambda r: tf.equal(tf.io.parse_single_example(r, features)
                                                           ["image/class/label"], label)).cache()  # fmt: skip

        return _balanced(of_class, info.class_counts[split], seed=seed, repeat=repeat, skip=skip)
    return _in_training_order(
        tf.data.Dataset.from_tensor_slices(files), tf.data.TFRecordDataset, len(files),
        _shuffle_buffer(info, split), shuffle=shuffle, repeat=repeat, seed=seed, skip=skip,
    )  # fmt: skip


def row_stream(
    info: DatasetInfo, split: str, records_per_file: list[int], *, repeat: bool, seed: int, skip: int = 0,
    sampling: str = "natural", labels=None,
) -> "tf.data.Dataset":  # fmt: skip
    """Like a shuffled :func:`record_stream`, but each record is its row: its index in file order.

    The shuffles only ever see element positions, so ``(row, seed pair)`` comes out in exactly the order
    and with exactly the pairs that record_stream gives the records, without reading a byte of the shards.
    The cached-features path trains from this: a step costs a table lookup instead of a record parse.

    Args:
        records_per_file: how many records each of the split's shards holds, in shard order.
        sampling: as in record_stream; "balanced" needs ``labels``, every row's class id in file order.
    """
    import numpy as np

    from finetune.compat import tf

    if len(records_per_file) != len(info.files(split)):
        raise ValueError(f"{len(records_per_file)} record counts for {len(info.files(split))} {split} shards")
    if sampling == "balanced":
        if labels is None or len(labels) != sum(records_per_file):
            raise ValueError("balanced sampling needs the label of every row, in file order")
        labels = np.asarray(labels, np.int64)
        counts = np.bincount(labels, minlength=len(info.classes)).tolist()
        return _balanced(lambda label: tf.data.Dataset.from_tensor_slices(np.flatnonzero(labels == label)),
                         counts, seed=seed, repeat=repeat, skip=skip)  # fmt: skip
    ends = np.cumsum(records_per_file)
    starts = tf.constant(ends - np.asarray(records_per_file), tf.int64)
    ends = tf.constant(ends, tf.int64)
    return _in_training_order(
        tf.data.Dataset.range(len(records_per_file)),
        lambda index: tf.data.Dataset.range(starts[index], ends[index]),
        len(records_per_file), _shuffle_buffer(info, split), shuffle=True, repeat=repeat, seed=seed, skip=skip,
    )  # fmt: skip


def _balanced(of_class, counts: list[int], *, seed: int | None, repeat: bool, skip: int):
    """Every class equally often: each run of ``sum(counts)`` elements (an epoch) holds each class present
    ``sum // classes`` or one more times, the classes in a seeded shuffle of that pattern.

    ``of_class(label)`` is the class's elements in file order (records or rows, so both paths meet the
    same sequence). Each class is drawn from its own seeded reshuffle, repeated as often as needed: a rare
    class's examples come back several times an epoch, a common class's take turns over epochs. The order
    depends on the seed alone, and ``skip`` passes over elements as in :func:`_in_training_order`.
    """
    import numpy as np

    from finetune.compat import tf

    if seed is None:
        seed = random.SystemRandom().randrange(2**31)
    present = [label for label, count in enumerate(counts) if count]
    total = sum(counts)
    pattern = np.arange(total, dtype=np.int64) % len(present)  # indices into ``present``
    choices = tf.data.Dataset.from_tensor_slices(pattern).shuffle(total, seed=seed, reshuffle_each_iteration=True)
    choices = choices.repeat() if repeat else choices
    streams = [of_class(label).shuffle(counts[label], seed=seed + 1 + label, reshuffle_each_iteration=True).repeat()
               for label in present]  # fmt: skip
    records = tf.data.Dataset.choose_from_datasets(streams, choices)
    seeds = tf.data.Dataset.random(seed=seed).batch(2)
    return tf.data.Dataset.zip(records, seeds).skip(skip)


def _in_training_order(files, open_file, file_count: int, buffer: int, *, shuffle, repeat, seed, skip):
    """The records of ``files`` (each opened by ``open_file``) in training order, each with a seed pair."""
    from finetune.compat import tf

    if seed is None:
        seed = random.SystemRandom().randrange(2**31)
    if shuffle:
        records = files.shuffle(file_count, seed=seed).interleave(
            open_file,
            cycle_length=min(file_count, 16),
            num_parallel_calls=min(file_count, 16),
            deterministic=True,
        )
        records = records.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    else:
        records = files.flat_map(open_file)  # one shard after the other: file order
    if repeat:
        records = records.repeat()
    # A stateless seed pair per record position, so augmentation is reproducible under a seed however many
    # calls run in parallel. Each pass reshuffles, so an image meets new pairs; with repeat=True the stream
    # runs on across passes. (rerandomize_each_iteration=True would break tf.compat.v1 one-shot iterators.)
    seeds = tf.data.Dataset.random(seed=seed).batch(2)
    # skip() is applied even for 0, so a resumed graph has the same ops (and op seeds) as a fresh one.
    return tf.data.Dataset.zip(records, seeds).skip(skip)


def transform_record(record, pair, *, image_size: int, augment: bool) -> dict:
    """One serialized example as the network takes it: ``{"image", "label", "path"}``.

    ``image`` is the decoded picture through slim's train transform, seeded by ``pair`` (two int64), when
    ``augment``, else through its eval transform; float32 [S, S, 3] in [-1, 1].
    """
    from finetune import preprocessing
    from finetune.compat import tf

    parsed = tf.io.parse_single_example(record, record_features())
    image = preprocessing.decode_image(parsed["image/encoded"])
    if augment:
        image = preprocessing.random_train_transform(image, image_size, pair)[0]
    else:
        image = preprocessing.preprocess_for_eval(image, image_size)
    return {"image": image, "label": parsed["image/class/label"], "path": parsed["image/filename"]}


def pipeline_options() -> "tf.data.Options":
    """Threads of its own for an input pipeline that feeds a tf.compat.v1 session, and no autotuning.

    Without a pool of its own the pipeline would run on the session's inter-op pool, the threads that
    dispatch the network's ops, and a step could wait behind JPEG decoding for a thread while its next batch
    sat ready in the prefetch buffer. One thread per image (max_intra_op_parallelism): the pool decodes
    several images at once, one call per core.

    Autotuning is off because on TF 2.21 it can hold up the end of a run: closing the session destroys the
    iterator, which waits for the autotuning thread, and that thread sometimes sleeps out the rest of its
    optimisation period first (which doubles each round, up to a minute). Measured on the benchmark's
    ``train_all_bf16`` graph (the trainer's own): 12, 15 and 23 s at the close in 3 runs of 8 with
    autotuning, under 0.1 s in 8 runs without. Nor did its tuning buy speed: the input pipeline alone made
    567 to 858 images/s with the training transform in three full-size benchmark runs without it, 563 and 725
    in two with it.
    """
    from finetune.compat import tf

    options = tf.data.Options()
    options.threading.private_threadpool_size = default_workers()
    options.threading.max_intra_op_parallelism = 1
    options.autotune.enabled = False
    return options


def read_dataset(
    info: DatasetInfo,
    split: str,
    *,
    batch_size: int,
    image_size: int,
    training: bool,
    augment: bool = True,
    shuffle: bool | None = None,
    repeat: bool = False,
    seed: int | None = None,
    drop_remainder: bool = False,
    num_parallel_calls: int | None = None,
    skip: int = 0,
    sampling: str = "natural",
) -> "tf.data.Dataset":
    """A tf.data pipeline over one split: batches of ``{"image", "label", "path"}``.

    ``image`` is float32 [B, S, S, 3] in [-1, 1], ``label`` int64 [B], ``path`` the source file's path
    relative to IMAGE_DIR (tf.string [B]).

    Args:
        info: from :func:`load_dataset`.
        split: "train", "validation" or "test".
        batch_size: examples per batch.
        image_size: S, the network's input size.
        training: slim's train transform (random crop, flip, colour) when True, its eval transform
            (central crop 0.875, bilinear resize) when False.
        augment: with ``training``, False gives the eval transform instead: deterministic, and what
            evaluation will show the model.
        shuffle: shuffle shard order and records (seeded); defaults to ``training``. Without shuffle the
            records come in file order, every one exactly once per pass.
        repeat: repeat forever (each pass reshuffled and re-augmented).
        seed: makes shuffling and augmentation reproducible; None draws a fresh seed.
        drop_remainder: drop a last, smaller batch (gives a static batch dimension).
        num_parallel_calls: parallel decode/preprocess calls; None: one per core.
        skip: examples of the stream to pass over before anything is decoded, with their augmentation
            seeds, so a resumed run continues exactly where an uninterrupted one would be, at the cost of
            reading records only.
        sampling: "natural" or "balanced" (every class equally often per epoch; see :func:`record_stream`).

    Raises:
        DataError: the split is unknown or this dataset has no examples in it.
    """
    from finetune.compat import tf

    if batch_size < 1 or image_size < 1:
        raise ValueError(f"batch_size and image_size must be positive, got {batch_size} and {image_size}")
    shuffle = training if shuffle is None else shuffle
    augment = training and augment
    parallel = num_parallel_calls or default_workers()
    stream = record_stream(info, split, shuffle=shuffle, repeat=repeat, seed=seed, skip=skip, sampling=sampling)

    def prepare(record: tf.Tensor, pair: tf.Tensor) -> dict[str, tf.Tensor]:
        return transform_record(record, pair, image_size=image_size, augment=augment)

    examples = stream.map(prepare, num_parallel_calls=parallel, deterministic=True)
    # Two batches ready: the next step's, and one being made while it runs.
    batches = examples.batch(batch_size, drop_remainder=drop_remainder).prefetch(2)
    return batches.with_options(pipeline_options())


def damaged_shards(root: str | os.PathLike) -> list[tuple[Path, str]]:
    """Every shard of the dataset at ``root`` that does not read back whole: (shard, TensorFlow's reason).

    Reads each record and checks its CRCs, so it is only run once a read has already failed, to name the
    file to the user. A shard named in dataset.json but missing counts as damaged.
    """
    from finetune.compat import tf

    info = load_dataset(root)
    damaged = []
    for names in info.shard_names.values():
        for name in names:
            shard = info.root / name
            try:
                for _ in tf.compat.v1.io.tf_record_iterator(str(shard)):
                    pass
            except (tf.errors.OpError, OSError) as exc:
                damaged.append((shard, getattr(exc, "message", None) or str(exc)))
    return damaged
