"""Writes a generated flower-style image folder (one subfolder per class), for trying finetune without photos.

    python scripts/make_image_folder.py photos/ --classes 5 --per-class 100 --seed 0
"""

from __future__ import annotations

import argparse
import json
import sys

from finetune.synthetic import make_image_folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="folder to write")
    parser.add_argument("--classes", type=int, default=5, help="class folders (default: 5)")
    parser.add_argument("--per-class", type=int, default=100, help="images per class (default: 100)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default: 0)")
    parser.add_argument("--min-side", type=int, default=96, help="smallest side in pixels (default: 96)")
    parser.add_argument("--max-side", type=int, default=320, help="largest side in pixels (default: 320)")
    args = parser.parse_args()
    folder = make_image_folder(
        args.root, args.classes, args.per_class, seed=args.seed, min_side=args.min_side, max_side=args.max_side
    )
    print(json.dumps({"root": str(folder.root), "classes": list(folder.classes), "images": folder.count}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
