"""Perceptual hashes of images, and the pairs of images whose hashes are close: the same photo resized,
re-encoded, slightly cropped, saved as PNG or turned grey.

The hash is the classic DCT one (pHash): the picture's luminance shrunk to 32x32, its 2-D DCT, the 8x8 lowest
frequencies but the constant one compared with their median, one bit each (63 bits). Low frequencies describe
the layout of light and dark, which survives resizing, JPEG at any usual quality, a format change and dropping
the colour. A crop shifts that layout, so each image also gets the hashes of five crops of itself (each side
cut by 6 of 128, about 5%: the four corners and the centre), and two images are compared by the fewest
differing bits between one's plain hash and any of the other's hashes, either way round.

Layout alone cannot tell apart two different pictures that happen to share it (a gradient sky with one
flower in the same place), so a pair close in layout must also be close in colour: the mean chroma (YCbCr's
Cb and Cr) of a 4x4 grid over each picture may differ by at most ``COLOUR_DISTANCE`` on average. A grey
picture (no chroma anywhere) cannot be checked for colour, so a pair with a grey side must instead be
within ``GREY_DISTANCE`` bits: a grey copy keeps its original's luminance (0 to 4 bits apart in every
measurement: rounding), while distinct pictures that only share a layout came as close as 2.
A flat picture (one colour, or nearly) has no layout to hash; it gets no signature and is compared with
nothing.

The thresholds are measured, not guessed (scripts/bench_near_duplicates.py prints the figures), on 500
generated photos (finetune/synthetic.py, 75 to 320 pixels; each kind of copy made of every fourth photo, written
to a file and decoded as build-dataset decodes it, a JPEG at a reduced scale by ``draft``): the copies (half
size, JPEG quality 60, a 5% crop from a corner or the centre, PNG, grey) came within 0 to 6 bits of their
originals (95% within 4; PNG within 2, grey within 4) and within 5.8 in colour (crops; the rest within 0.8).
Distinct photos differ in 27 of the 63 bits on average, but these cartoon-like pictures often share a layout:
101 of the 124,750 distinct pairs came within 10 bits (19 within 6, the closest at 2). Their colour differed
by 8.4 or more (13.7 or more but for one pair). So 10 bits keeps every copy measured with room to spare (real
photos vary more than generated ones), 7 in colour sits between 5.8 and 8.4 and sends all 101 lookalikes
apart, and for a grey side 6 bits keeps the grey copies (4 at most) while letting through only the closest
19 pairs' worth of lookalikes. Pure numpy and Pillow, no TensorFlow: it runs in build-dataset's worker
processes, where it costs about a tenth of decoding the picture (see docs/dataset-quality.md).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from PIL import Image as PILImage

# Images whose hashes differ in at most this many of 63 bits are near-duplicates (see the module docstring)
NEAR_DUPLICATE_DISTANCE = 10
# ... if their colour also differs by at most this much (mean absolute Cb/Cr difference, 0-255 scale).
COLOUR_DISTANCE = 7.0
# ... or, when either picture is grey (no colour to compare), at most this many bits apart.
GREY_DISTANCE = 6
_GREY = 2  # a picture whose chroma stays this close to neutral (128) everywhere is grey
_FLAT = 2.0  # a picture whose shrunk luminance spans fewer grey levels than this is flat: no signature
_SMALL = 64  # the picture is first shrunk by a whole factor to about this many pixels on its short side
_CUT = 0.047  # share of the width and of the height cut off for the crop hashes (6 of 128: about 5%)
_SIDE = 32  # the DCT runs on this square
_LOW = 8  # the 8x8 lowest frequencies
VARIANTS = 6  # hashes per image: the plain one first, then the five crops


@functools.lru_cache(maxsize=1)
def _dct_low_rows() -> np.ndarray:
    """The first _LOW rows of the orthonormal DCT-II matrix of size _SIDE: ``D @ x`` is the DCT of a column x."""
    k = np.arange(_LOW)[:, None]
    n = np.arange(_SIDE)[None, :]
    matrix = np.cos(np.pi * (2 * n + 1) * k / (2 * _SIDE)) * np.sqrt(2.0 / _SIDE)
    matrix[0] /= np.sqrt(2.0)
    return matrix


def _box(length: int, start: float, stop: float, bins: int) -> np.ndarray:
    """[bins, length]: row k averages the pixels of [start, stop) falling in its k-th equal part (a box filter,
    pixels cut by a bin's edge counted by the share inside)."""
    edges = start + (stop - start) * np.arange(bins + 1) / bins
    pixel = np.arange(length)
    overlap = np.minimum(pixel[None, :] + 1, edges[1:, None]) - np.maximum(pixel[None, :], edges[:-1, None])
    return np.clip(overlap, 0, None) / ((stop - start) / bins)


@functools.lru_cache(maxsize=512)
def _projections(length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For one side of ``length`` pixels, three matrices that shrink and transform it from the left:

    [4 * _LOW + _SIDE, length]: first the four spans (whole, cut at the end, cut at the start, cut half at
    each end) shrunk to _SIDE and taken to their _LOW lowest DCT frequencies, _LOW rows each; then the whole
    side shrunk to _SIDE (for the flatness check). [4, length]: the whole side in 4 parts (the colour grid).
    """
    cut = length * _CUT
    spans = ((0, length), (0, length - cut), (cut, length), (cut / 2, length - cut / 2))
    rows = [_dct_low_rows() @ _box(length, a, b, _SIDE) for a, b in spans] + [_box(length, 0, length, _SIDE)]
    return np.concatenate(rows).astype(np.float32), _box(length, 0, length, 4).astype(np.float32)


# Each hash's span (index into _projections' spans) across and down: the plain picture, then the crops
# keeping the top-left, top-right, bottom-left and bottom-right corners, then the centre one.
_ACROSS = np.array([0, 1, 2, 1, 2, 3])
_DOWN = np.array([0, 1, 1, 2, 2, 3])
# RGB to Cb and Cr as Pillow converts (ITU-R BT.601, full range), and to luminance ("L": 299/587/114)
_TO_CHROMA = np.array([[-0.168736, 0.5], [-0.331264, -0.418688], [0.5, -0.081312]], np.float32)
_TO_LUMINANCE = np.array([0.299, 0.587, 0.114], np.float32)


def _bits_of(low: np.ndarray) -> tuple[int, ...]:
    """The 63-bit hash of each [_LOW, _LOW] block of frequencies in ``low`` [n, _LOW, _LOW]: the first bit
    the highest of 64, the last 0."""
    low = low.reshape(len(low), _LOW * _LOW)[:, 1:]
    median = np.partition(low, low.shape[1] // 2, axis=1)[:, low.shape[1] // 2 : low.shape[1] // 2 + 1]
    bits = (low > median).astype(np.uint64) << np.arange(63, 0, -1, dtype=np.uint64)
    return tuple(int(value) for value in np.bitwise_or.reduce(bits, axis=1))


class Signature(NamedTuple):
    """What an image is compared by."""

    hashes: tuple[int, ...]  # VARIANTS hashes: the plain one, then the five crops'
    chroma: bytes  # Cb, Cr of a 4x4 grid, row by row (32 bytes)


def draft(image: PILImage.Image) -> None:
    """Lets a JPEG that is opened but not yet loaded decode straight to a smaller size (libjpeg's scaled
    IDCT: 1/2, 1/4 or 1/8, keeping both sides at least _SMALL), which is all ``signature`` needs.

    Only for a picture whose pixels are wanted for nothing else (checked and hashed, its file stored as it
    is): every byte of the file is still read and entropy-decoded, so a truncated or corrupt file fails the
    same way, at about half the cost of a full decode. Other formats and modes are left alone.
    """
    if image.format in ("JPEG", "MPO") and image.mode == "RGB":
        image.draft("RGB", (_SMALL, _SMALL))


def signature(image: PILImage.Image) -> Signature | None:
    """The signature of a decoded Pillow image (any mode, any size); None for a flat picture.

    Cheap next to decoding the image: a big picture is first shrunk by a whole factor (Image.reduce, a box
    filter in C) to about _SMALL pixels a side, then one small array gives every hash and the colour grid:
    each hash is ``P_down @ luminance @ P_across.T`` with P a box shrink to _SIDE (of the whole side or a
    crop of it) already multiplied by the DCT's low rows.
    """
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    factor = max(1, min(image.size) // _SMALL)
    small = image.reduce(factor) if factor > 1 else image
    pixels = np.asarray(small, np.float32)
    luminance = pixels @ _TO_LUMINANCE if pixels.ndim == 3 else pixels
    down, grid_down = _projections(luminance.shape[0])
    across, grid_across = _projections(luminance.shape[1])
    shrunk_down = down @ luminance  # [4 * _LOW + _SIDE, width]: every span down at once
    if np.ptp(shrunk_down[4 * _LOW :] @ across[4 * _LOW :].T) < _FLAT:  # the whole picture at _SIDE x _SIDE
        return None
    spans_down = shrunk_down[: 4 * _LOW].reshape(4, _LOW, -1)
    spans_across = across[: 4 * _LOW].reshape(4, _LOW, -1)
    low = spans_down[_DOWN] @ spans_across[_ACROSS].transpose(0, 2, 1)  # [VARIANTS, _LOW, _LOW]
    if pixels.ndim == 3:
        rows = (grid_down @ pixels.reshape(len(pixels), -1)).reshape(4, -1, 3)  # [4 rows, width, RGB]
        grid = grid_across @ rows  # [4 rows, 4 columns, RGB]: the mean colour of each cell
        chroma = np.clip(np.rint(grid @ _TO_CHROMA + 128), 0, 255)
    else:
        chroma = np.full((4, 4, 2), 128)
    return Signature(_bits_of(low), chroma.astype(np.uint8).tobytes())


def distance(a: Signature, b: Signature) -> int:
    """Bits apart: the fewest differing bits between one's plain hash and any hash of the other."""
    one_way = min((a.hashes[0] ^ h).bit_count() for h in b.hashes)
    return min(one_way, min((b.hashes[0] ^ h).bit_count() for h in a.hashes))


def colour_distance(a: bytes, b: bytes) -> float | None:
    """Mean absolute chroma difference of two signatures; None when either picture is grey."""
    first, second = (np.frombuffer(x, np.uint8).astype(np.float64) for x in (a, b))
    if np.abs(first - 128).max() <= _GREY or np.abs(second - 128).max() <= _GREY:
        return None
    return float(np.abs(first - second).mean())


def close_pairs(
    signatures: list[Signature], threshold: int = NEAR_DUPLICATE_DISTANCE, colour: float = COLOUR_DISTANCE
) -> list[tuple[int, int, int]]:
    """Every pair (i, j, distance) with i < j: at most ``threshold`` bits apart and close in colour (or, with
    a grey side, at most GREY_DISTANCE bits apart).

    The distance of two images is the fewest differing bits between one's plain hash and any hash of the
    other, either way round. Every pair is compared once, a band of rows against the columns to their right
    at a time, one variant after another with numpy's popcount: 2,000 images take about 0.1 s here.
    """
    if not signatures:
        return []
    every = np.array([s.hashes for s in signatures], dtype=np.uint64)  # [images, VARIANTS]
    plain = every[:, 0]
    count = len(plain)
    band = max(1, min(count, 2**20 // count))  # rows per band: a few MB of temporaries
    pairs: list[tuple[int, int, int]] = []
    for start in range(0, count, band):
        stop = min(start + band, count)
        distances = np.full((stop - start, count - start), 64, np.uint8)  # rows start..stop, columns start..
        for variant in range(VARIANTS):
            np.minimum(distances, np.bitwise_count(plain[start:stop, None] ^ every[None, start:, variant]),
                       out=distances)  # fmt: skip
            np.minimum(distances, np.bitwise_count(every[start:stop, variant, None] ^ plain[None, start:]),
                       out=distances)  # fmt: skip
        for row, column in zip(*np.nonzero(distances <= threshold)):
            i, j = start + int(row), start + int(column)
            if i < j:
                bits = int(distances[row, column])
                apart = colour_distance(signatures[i].chroma, signatures[j].chroma)
                if (apart is None and bits <= GREY_DISTANCE) or (apart is not None and apart <= colour):
                    pairs.append((i, j, bits))
    return pairs
