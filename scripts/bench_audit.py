"""Plants label errors in a generated 3-class folder, audits it, and prints precision, recall and times as JSON.

    python scripts/bench_audit.py --checkpoint /work/trained/inception_v3.ckpt    # trained weights
    python scripts/bench_audit.py                                                 # the stand-in
    python scripts/bench_audit.py --images 2000 --image-size 299 --checkpoint ...  # the timing at 2,000

A share of each class's images (--planted, 5% by default) is moved into another class's folder, the folder
is built into a dataset and `audit` runs on it. Recall: planted errors among the first 2x(planted) entries of
the audit's ranked list; precision: the share of those entries that are planted. The feature cache is a
fresh folder, so extraction is timed in full; extraction and the k-fold heads are reported apart.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from finetune.audit import audit
from finetune.config import AuditConfig, BuildDatasetConfig
from finetune.dataset import build_dataset
from finetune.synthetic import make_image_folder, write_standin_checkpoint


def plant_label_errors(folder, share: float, seed: int) -> set[str]:
    """Moves ``share`` of each class's files into another (random) class's folder; returns their new paths."""
    rng = np.random.default_rng(seed)
    classes = list(folder.files)
    planted = set()
    for name, paths in folder.files.items():
        count = max(1, round(share * len(paths)))
        for index in rng.choice(len(paths), size=count, replace=False):
            other = classes[(classes.index(name) + int(rng.integers(1, len(classes)))) % len(classes)]
            source = paths[index]
            target = folder.root / other / f"moved_{source.name}"
            source.rename(target)
            planted.add(f"{other}/{target.name}")
    return planted


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="checkpoint to audit with (default: a stand-in with random weights)")
    parser.add_argument("--images", type=int, default=300, help="images over 3 classes (default: 300)")
    parser.add_argument("--planted", type=float, default=0.05, help="share of each class moved (default: 0.05)")
    parser.add_argument("--image-size", type=int, default=149, help="network input size (default: 149)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", help="folder for everything (default: a temporary folder, removed after)")
    args = parser.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-audit-"))
    try:
        checkpoint = args.checkpoint or str(write_standin_checkpoint(work / "standin" / "inception_v3.ckpt", seed=1))
        folder = make_image_folder(work / "photos", num_classes=3, images_per_class=args.images // 3,
                                   seed=args.seed, min_side=100, max_side=240)  # fmt: skip
        planted = plant_label_errors(folder, args.planted, args.seed)
        build_dataset(BuildDatasetConfig(image_dir=str(folder.root), out=str(work / "dataset")))
        result = audit(AuditConfig(dataset=str(work / "dataset"), checkpoint=checkpoint, out=str(work / "audit"),
                                   image_size=args.image_size, cache_dir=str(work / "cache"), seed=args.seed))  # fmt: skip
        listed = [issue.path for issue in result.label_issues[: 2 * len(planted)]]
        found = planted & set(listed)
        print(json.dumps({
            "checkpoint": args.checkpoint or "stand-in (random weights)",
            "images": result.images, "planted": len(planted), "image_size": args.image_size,
            "listed_top_2x": len(listed), "label_issues": len(result.label_issues),
            "recall_top_2x": round(len(found) / len(planted), 3),
            "precision_top_2x": round(len(found) / len(listed), 3) if listed else None,
            "out_of_fold_accuracy": result.out_of_fold_accuracy,
            "extraction_seconds": result.extraction_seconds, "kfold_seconds": result.kfold_seconds,
            "audit_seconds": result.seconds,
        }, indent=1))  # fmt: skip
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
