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
generated photos (finetune/synthetic.py, 75 to 320 pixels; each kind of copy made of every fourth photo):
the copies (half size, JPEG quality 60, a 5% crop from a corner or the centre, PNG, grey) came within 0 to 10
bits of their originals (95% within 6; PNG at 0, grey at 0 to 4) and within 5.9 in colour (crops; the rest
within 1.0). Distinct photos differ in 27 of the 63 bits on average, but these cartoon-like pictures often
share a layout: 108 of the 124,750 distinct pairs came within 10 bits (16 within 6, the closest at 2). Their
colour differed by 8.6 or more (13.7 or more but for one pair). So 10 bits keeps every copy measured, 7 in
colour, between 5.9 and 8.6, sends all 108 lookalikes apart, and for a grey side 6 bits keeps the grey
copies (4 at most) while letting through only the closest 16 pairs' worth of lookalikes. Pure numpy and Pillow, no
TensorFlow: it runs in build-dataset's worker processes.
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
def _dct_matrix() -> np.ndarray:
    """The orthonormal DCT-II matrix of size _SIDE: ``D @ x`` is the DCT of a column x."""
    k = np.arange(_SIDE)[:, None]
    n = np.arange(_SIDE)[None, :]
    matrix = np.cos(np.pi * (2 * n + 1) * k / (2 * _SIDE)) * np.sqrt(2.0 / _SIDE)
    matrix[0] /= np.sqrt(2.0)
    return matrix


def _hashes_of(squares: np.ndarray) -> tuple[int, ...]:
    """The 63-bit hash of each _SIDE x _SIDE luminance array in ``squares`` [n, _SIDE, _SIDE]."""
    low_rows = _dct_matrix()[:_LOW]  # only the lowest frequencies are needed
    low = (low_rows @ squares @ low_rows.T).reshape(len(squares), _LOW * _LOW)[:, 1:]
    median = np.sort(low, axis=1)[:, low.shape[1] // 2 : low.shape[1] // 2 + 1]
    bits = np.packbits(np.pad(low > median, ((0, 0), (0, 1))), axis=1)  # 63 bits and a 0: 8 bytes a row
    return tuple(int.from_bytes(row.tobytes(), "big") for row in bits)


class Signature(NamedTuple):
    """What an image is compared by."""

    hashes: tuple[int, ...]  # VARIANTS hashes: the plain one, then the five crops'
    chroma: bytes  # Cb, Cr of a 4x4 grid, row by row (32 bytes)


def signature(image: PILImage.Image) -> Signature | None:
    """The signature of a decoded Pillow image (any mode); None for a flat picture.

    Cheap next to decoding the image: one integer shrink (Image.reduce, a box filter in C) to about _SMALL
    pixels a side reads the picture once; every hash and the colour grid come from that small copy.
    """
    from PIL import Image

    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    factor = max(1, min(image.size) // _SMALL)
    small = image.reduce(factor) if factor > 1 else image
    luminance = small.convert("L") if small.mode != "L" else small
    width, height = small.size
    cut_x, cut_y = width * _CUT, height * _CUT
    corners = ((0, 0), (cut_x, 0), (0, cut_y), (cut_x, cut_y), (cut_x / 2, cut_y / 2))
    boxes = [(0, 0, width, height)] + [(x, y, x + width - cut_x, y + height - cut_y) for x, y in corners]
    squares = [np.asarray(luminance.resize((_SIDE, _SIDE), Image.Resampling.BOX, box=box), np.float64)
               for box in boxes]  # fmt: skip
    if np.ptp(squares[0]) < _FLAT:
        return None
    if small.mode == "RGB":
        chroma = np.asarray(small.resize((4, 4), Image.Resampling.BOX).convert("YCbCr"))[:, :, 1:]
    else:
        chroma = np.full((4, 4, 2), 128, np.uint8)
    return Signature(_hashes_of(np.stack(squares)), chroma.astype(np.uint8).tobytes())


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
    other, either way round. All pairs are compared, a block of rows at a time with numpy's popcount:
    2,000 images take well under a second.
    """
    if not signatures:
        return []
    every = np.array([s.hashes for s in signatures], dtype=np.uint64)  # [images, VARIANTS]
    plain = every[:, 0]
    count = len(plain)
    block = max(1, min(1024, 2**22 // (count * VARIANTS)))
    pairs: list[tuple[int, int, int]] = []
    for start in range(0, count, block):
        rows = slice(start, start + block)
        one_way = np.bitwise_count(plain[rows, None, None] ^ every[None, :, :]).min(axis=2)
        other_way = np.bitwise_count(every[rows, None, :] ^ plain[None, :, None]).min(axis=2)
        distances = np.minimum(one_way, other_way)
        for row, column in zip(*np.nonzero(distances <= threshold)):
            i = start + int(row)
            j = int(column)
            if i < j:
                bits = int(distances[row, column])
                apart = colour_distance(signatures[i].chroma, signatures[j].chroma)
                if (apart is None and bits <= GREY_DISTANCE) or (apart is not None and apart <= colour):
                    pairs.append((i, j, int(distances[row, column])))
    return pairs
