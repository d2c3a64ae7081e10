"""Measures what the near-duplicate thresholds rest on: how far copies and distinct photos are; prints JSON.

    python scripts/bench_near_duplicates.py                 # 500 generated photos, copies of every 4th
    python scripts/bench_near_duplicates.py --photos 1000

For generated photos (finetune/synthetic.py, 75 to 320 pixels) it makes five kinds of copy of every fourth one
(half size, JPEG quality 60, a 5% crop from a corner or the centre, PNG, grey), each written to a file's bytes
and decoded as build-dataset decodes it (an RGB JPEG at a reduced scale), and reports, per kind of copy, the largest
and 95th-percentile distance in bits and in colour to its original; then, over every pair of distinct photos,
the mean distance, how many pairs fall within the bit threshold, and the smallest colour distance among
those. finetune/phash.py's thresholds must sit between the two.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from finetune import phash
from finetune.synthetic import make_image_folder


def as_built(data: bytes) -> Image.Image:
    """A file decoded as build-dataset's workers decode it: an RGB JPEG at a reduced scale (phash.draft)."""
    image = Image.open(io.BytesIO(data))
    phash.draft(image)
    image.load()
    return image


def encoded(image: Image.Image, format: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def copies(image: Image.Image) -> dict[str, Image.Image]:
    """Each kind of copy of ``image`` as a file would hold it (JPEG quality 90 unless said), decoded as built."""
    width, height = image.size
    cut_w, cut_h = round(width * 0.05), round(height * 0.05)
    made = {
        "half": encoded(image.resize((max(1, width // 2), max(1, height // 2)), Image.Resampling.BILINEAR),
                        quality=90),  # fmt: skip
        "jpeg60": encoded(image, quality=60),
        "crop5_top_left": encoded(image.crop((cut_w, cut_h, width, height)), quality=90),
        "crop5_bottom_right": encoded(image.crop((0, 0, width - cut_w, height - cut_h)), quality=90),
        "crop5_centre": encoded(image.crop((cut_w // 2, cut_h // 2, width - cut_w // 2, height - cut_h // 2)),
                                quality=90),  # fmt: skip
        "png": encoded(image, "PNG"),
        "grey": encoded(image.convert("L"), quality=90),
    }
    return {kind: as_built(data) for kind, data in made.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=500, help="generated photos (default: 500)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        first = make_image_folder(Path(work) / "a", num_classes=8, images_per_class=args.photos * 2 // 5 // 8,
                                  seed=3, min_side=75, max_side=320)  # fmt: skip
        second = make_image_folder(Path(work) / "b", num_classes=3, images_per_class=args.photos * 3 // 5 // 3,
                                   seed=11, min_side=100, max_side=240)  # fmt: skip
        paths = [p for folder in (first, second) for files in folder.files.values() for p in files]
        files = [path.read_bytes() for path in paths]
    images = [as_built(data) for data in files]  # what the signatures are computed from
    pictures = [Image.open(io.BytesIO(data)).convert("RGB") for data in files]  # what the copies are made of
    signatures = [phash.signature(image) for image in images]
    bits: dict[str, list[int]] = {}
    colour: dict[str, list[float]] = {}
    for picture, mine in list(zip(pictures, signatures))[::4]:
        for kind, copy in copies(picture).items():
            theirs = phash.signature(copy)
            bits.setdefault(kind, []).append(phash.distance(mine, theirs))
            apart = phash.colour_distance(mine.chroma, theirs.chroma)
            if apart is not None:
                colour.setdefault(kind, []).append(apart)
    distinct = [(phash.distance(signatures[i], signatures[j]), i, j)
                for i in range(len(signatures)) for j in range(i + 1, len(signatures))]  # fmt: skip
    close = [(d, i, j) for d, i, j in distinct if d <= phash.NEAR_DUPLICATE_DISTANCE]
    close_colour = sorted(phash.colour_distance(signatures[i].chroma, signatures[j].chroma) or 0.0 for _, i, j in close)
    print(json.dumps({
        "photos": len(images),
        "thresholds": {"bits": phash.NEAR_DUPLICATE_DISTANCE, "colour": phash.COLOUR_DISTANCE,
                       "grey_bits": phash.GREY_DISTANCE},
        "copies": {kind: {"max_bits": max(values), "p95_bits": float(np.percentile(values, 95)),
                          "max_colour": round(max(colour.get(kind, [0.0])), 2)} for kind, values in bits.items()},
        "distinct_pairs": len(distinct),
        "distinct_mean_bits": round(float(np.mean([d for d, _, _ in distinct])), 1),
        "distinct_min_bits": min(d for d, _, _ in distinct),
        "distinct_within_bit_threshold": len(close),
        "distinct_within_grey_threshold": sum(1 for d, _, _ in close if d <= phash.GREY_DISTANCE),
        "their_smallest_colour_distances": [round(x, 1) for x in close_colour[:5]],
        "false_pairs_after_both_checks": len(phash.close_pairs(signatures)),
    }, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
