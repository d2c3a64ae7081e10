"""Times `build_dataset` on a generated folder of 500x375 JPEGs with 1 and 2 worker processes; prints JSON.

    python scripts/bench_build_dataset.py                # 2,000 images in 5 classes, workers 1 and 2
    python scripts/bench_build_dataset.py --images 500 --workers 1 2 4 --repeats 3
    python scripts/bench_build_dataset.py --workers 2 --near-duplicates on off --repeats 3   # hashing's cost
    PYTHONPATH=OLD_CHECKOUT python scripts/bench_build_dataset.py --workers 2 --near-duplicates default

"default" passes no near-duplicate setting at all, so the same command also times a checkout from before the
setting existed (the build as it was before near-duplicate hashing: docs/benchmarks.md has the figures).

The folder is generated once under --work (default: a temporary folder) and reused by every run. TensorFlow
is imported before the clock starts, so the figures are the build's own throughput (scan, check and decode
in the workers, write the records); a fresh `finetune build-dataset` also pays TensorFlow's import, about
3 s here. Each run writes a new dataset and deletes it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

WIDTH, HEIGHT = 500, 375


def write_photos(root: Path, images: int, classes: int, seed: int = 0) -> int:
    """Writes ``images`` JPEGs of exactly 500x375 (quality 90) over ``classes`` folders; returns total bytes."""
    rng = np.random.default_rng(seed)
    total = 0
    ramp = np.linspace(0.0, 1.0, HEIGHT)[:, None, None]
    for index in range(images):
        folder = root / f"class_{index % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        top, bottom = rng.uniform(0, 255, size=(2, 3))
        gradient = np.broadcast_to(top * (1 - ramp) + bottom * ramp, (HEIGHT, WIDTH, 3))
        image = Image.fromarray(np.ascontiguousarray(gradient, dtype=np.uint8), "RGB")
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(2, 6))):
            x, y, r = rng.uniform(0, WIDTH), rng.uniform(0, HEIGHT), rng.uniform(20, 120)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.uniform(0, 255, 3)))
        # Fine grain on top of soft shapes: JPEGs of a photo's size (about 60 KB at this size, quality 90).
        pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(1.5)), np.float64)
        pixels += rng.normal(0, 8, size=pixels.shape)
        path = folder / f"photo_{index:05d}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, format="JPEG", quality=90)
        total += path.stat().st_size
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="images to generate (default: 2000)")
    parser.add_argument("--classes", type=int, default=5, help="class folders (default: 5)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default: 1 2)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per worker count (default: 2)")
    parser.add_argument("--near-duplicates", nargs="+", default=["on"], choices=("on", "off", "default"),
                        help="near-duplicate settings to time, alternating run by run; default: the build's own "
                             "default, passing none (default: on)")
    parser.add_argument("--work", help="folder for the images and datasets (default: a temporary folder)")
    args = parser.parse_args()

    from finetune.compat import tf  # noqa: F401  (imported now so that no run pays for it)
    from finetune.config import BuildDatasetConfig
    from finetune.dataset import build_dataset

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_build_dataset-"))
    photos = work / f"photos_{args.images}"
    if not photos.is_dir():
        started = time.monotonic()
        size = write_photos(photos, args.images, args.classes)
        print(f"generated {args.images} images ({size / 2**20:.1f} MiB) in {time.monotonic() - started:.0f} s",
              file=sys.stderr)  # fmt: skip
    runs = []
    for workers in args.workers:
        for _ in range(args.repeats):
            for near in args.near_duplicates:  # alternating, so a busy spell of the machine hits both alike
                out = work / f"dataset_w{workers}"
                shutil.rmtree(out, ignore_errors=True)
                setting = {} if near == "default" else {"near_duplicates": near}
                config = BuildDatasetConfig(image_dir=str(photos), out=str(out), workers=workers, **setting)
                started = time.monotonic()
                result = build_dataset(config)
                seconds = time.monotonic() - started
                runs.append({"workers": workers, "near_duplicates": near, "seconds": round(seconds, 2),
                             "images_per_second": round(result.files_seen / seconds, 1)})  # fmt: skip
                shutil.rmtree(out)
    best = {f"{w} {near}": max(r["images_per_second"] for r in runs if r["workers"] == w and r["near_duplicates"] == near)
            for w in args.workers for near in args.near_duplicates}  # fmt: skip
    report = {
        "images": args.images,
        "image_size": [WIDTH, HEIGHT],
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "runs": runs,
        "best_images_per_second": best,
    }
    print(json.dumps(report))
    if not args.work:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
