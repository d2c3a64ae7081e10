"""The plain `finetune train` against a fixed strong recipe on generated sets; prints JSON.

    python scripts/bench_strong_recipe.py --work /tmp/strong                    # 5x60, generator seeds 5, 6, 8
    python scripts/bench_strong_recipe.py --work /tmp/strong --checkpoint trained.ckpt --seeds 5

The recipe is adam at 0.01, no decay, 300 epochs (`--lr-search off --learning-rate 0.01 --schedule constant
--epochs 300`): what the issue asking for converging defaults found best by hand. Each set is 5 classes of
generated photos, 40% validation and 10% test, so one validation image is under a point. Both runs train the
head on the same cached features (the first fills the cache under --work), validate only at the end, and are
scored on their newest checkpoint by `evaluate`. Without --checkpoint the stand-in backbone is written first.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from finetune.config import BuildDatasetConfig, EvaluateConfig, TrainConfig
from finetune.dataset import build_dataset
from finetune.evaluate import evaluate
from finetune.synthetic import make_image_folder, write_standin_checkpoint
from finetune.train import train

RECIPES = {
    "default": {},
    "strong": {"lr_search": "off", "learning_rate": 0.01, "schedule": "constant", "epochs": 300},
}


def dataset_for(work: Path, per_class: int, seed: int) -> Path:
    root = work / f"t5x{per_class}-{seed}"
    if not (root / "ds").exists():
        make_image_folder(root / "photos", num_classes=5, images_per_class=per_class, seed=seed, min_side=80,
                          max_side=140, png_fraction=0.0)  # fmt: skip
        build_dataset(BuildDatasetConfig(image_dir=str(root / "photos"), out=str(root / "ds"),
                                         validation_fraction=0.4, test_fraction=0.1, workers=1))  # fmt: skip
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="photos, datasets, runs and the feature cache")
    parser.add_argument("--checkpoint", help="backbone (default: the stand-in, written under --work)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[5, 6, 8], help="generator seeds, one set each")
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--image-size", type=int, default=75)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint or str(args.work / "standin.ckpt")
    if not args.checkpoint and not Path(checkpoint).exists():
        write_standin_checkpoint(checkpoint, seed=1)
    rows = []
    for seed in args.seeds:
        root = dataset_for(args.work, args.per_class, seed)
        for name, recipe in RECIPES.items():
            train_dir = root / name
            started = time.monotonic()
            train(TrainConfig(dataset=str(root / "ds"), train_dir=str(train_dir), checkpoint=checkpoint,
                              image_size=args.image_size, cache_dir=str(args.work / "cache"), overwrite=True,
                              eval_every=0, **recipe))  # fmt: skip
            config = json.loads((train_dir / "config.json").read_text())
            scores = {split: evaluate(EvaluateConfig(train_dir=str(train_dir), checkpoint="newest", split=split,
                                                     html=False)).top1 for split in ("validation", "test")}  # fmt: skip
            rows.append({"set": root.name, "recipe": name, **scores, "learning_rate": config["learning_rate"],
                         "weight_decay": config["weight_decay"], "seconds": round(time.monotonic() - started, 1)})
            print(json.dumps(rows[-1]), flush=True)
    gaps = [d["validation"] - s["validation"] for d, s in zip(rows[::2], rows[1::2])]
    print(json.dumps({"checkpoint": checkpoint, "runs": rows, "validation_gap_default_minus_strong": gaps}))


if __name__ == "__main__":
    main()
