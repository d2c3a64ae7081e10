"""Does the plain `finetune train` return a converged head? The old defaults, the new ones and a manual grid,
on the cached-feature path, with their wall time split into extraction, search and training. Prints JSON.

    python scripts/bench_defaults.py --work /tmp/defaults --checkpoint /tmp/trained/inception_v3.ckpt \\
        --checkpoint checkpoints/inception_v3_not_pretrained.ckpt

Datasets (generated, as quickstart's): ``quickstart`` (5 x 60, seed 0, 20% validation, as quickstart builds
it), ``5x60`` (seed 1, 25% validation) and ``20x100`` (seed 2, 15% validation and 15% test). Settings:

- ``old``: the defaults before the schedule was derived: 10 epochs, adam 0.001, slim's x0.94 every 2 epochs;
- ``new``: the plain command (derived schedule, learning-rate search);
- ``grid``: adam at 0.001, 0.003, 0.01, 0.03 and 0.1, each with a constant rate for 300 epochs (the issue's
  strong recipe) and with the derived cosine schedule; the best by validation accuracy is reported (an
  optimistic bound: it is chosen on the split it is scored on).

Extraction is measured once per dataset and checkpoint, on a cold cache; every run after it reuses the
features, and its ``wall_seconds`` counts that extraction once, as a user's first run pays it.

``--trainable mixed_7`` (or another deeper preset) compares the old and new defaults on the network path,
where every step runs the network: 10 epochs either way, slim's staircase against warm-up and cosine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from finetune.config import BuildDatasetConfig, EvaluateConfig, TrainConfig
from finetune.dataset import build_dataset, load_dataset
from finetune.evaluate import evaluate
from finetune.synthetic import make_image_folder
from finetune.train import train

DATASETS = {
    "quickstart": dict(classes=5, per_class=60, seed=0, validation=0.2, test=0.0),
    "5x60": dict(classes=5, per_class=60, seed=1, validation=0.25, test=0.0),
    "20x100": dict(classes=20, per_class=100, seed=2, validation=0.15, test=0.15),
}
OLD_DEFAULTS = dict(epochs=10, learning_rate=0.001, decay_rate=0.94, decay_epochs=2, warmup_epochs=0,
                    weight_decay=0.00004)  # fmt: skip
GRID_RATES = (0.001, 0.003, 0.01, 0.03, 0.1)


def _dataset(work: Path, name: str) -> Path:
    spec = DATASETS[name]
    out = work / f"ds-{name}"
    if not out.exists():
        photos = make_image_folder(work / f"photos-{name}", spec["classes"], spec["per_class"], seed=spec["seed"])
        build_dataset(BuildDatasetConfig(image_dir=str(photos.root), out=str(out), validation_fraction=spec["validation"],
                                         test_fraction=spec["test"]))  # fmt: skip
    return out


def _run(work: Path, dataset: Path, checkpoint: str, label: str, extraction: float | None, **settings) -> dict:
    train_dir = work / "runs" / f"{dataset.name}-{Path(checkpoint).stem}-{settings.get('trainable', 'logits')}-{label}"
    started = time.monotonic()
    result = train(TrainConfig(dataset=str(dataset), train_dir=str(train_dir), checkpoint=checkpoint,
                               cache_dir=str(work / "cache"), overwrite=True, **settings))  # fmt: skip
    seconds = time.monotonic() - started
    extracted = result.feature_cache["seconds"] if result.feature_cache else 0.0
    search = result.lr_search["seconds"] if result.lr_search else 0.0
    row = {
        "setting": label,
        "validation_accuracy": result.validation_accuracy,
        "steps": result.total_steps,
        "learning_rate": result.learning_rate,
        "weight_decay": result.weight_decay,
        "search_seconds": round(search, 2),
        "train_seconds": round(seconds - extracted - search, 2),
        "extraction_seconds": round(extraction if extraction is not None else extracted, 2),
    }
    row["wall_seconds"] = round(row["extraction_seconds"] + search + row["train_seconds"], 2)
    if load_dataset(dataset).split_counts.get("test"):
        row["test_accuracy"] = evaluate(EvaluateConfig(train_dir=str(train_dir), split="test")).top1
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="folder for photos, datasets, runs and the cache")
    parser.add_argument("--checkpoint", action="append", required=True, help="starting weights; repeat for more")
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated: " + ", ".join(DATASETS))
    parser.add_argument("--no-grid", action="store_true", help="old and new defaults only")
    parser.add_argument("--trainable", default="logits", help="a deeper preset compares old and new only, "
                        "on the network path (default: logits, on cached features)")
    parser.add_argument("--image-size", type=int, default=299, help="network input size (default: 299)")
    args = parser.parse_args()
    work = Path(args.work)
    common = dict(trainable=args.trainable, image_size=args.image_size)
    grid_rates = () if args.no_grid or args.trainable != "logits" else GRID_RATES
    results = []
    for name in args.datasets.split(","):
        dataset = _dataset(work, name)
        for checkpoint in args.checkpoint:
            # The first run fills the cache: its extraction time is the one every row counts.
            old_defaults = dict(OLD_DEFAULTS)
            if args.trainable != "logits":  # the old rate was the depth's default, as it still is
                del old_defaults["learning_rate"]
            old = _run(work, dataset, checkpoint, "old", None, **old_defaults, **common)
            extraction = old["extraction_seconds"]
            rows = [old, _run(work, dataset, checkpoint, "new", extraction, **common)]
            grid = []
            for rate in grid_rates:
                grid.append(_run(work, dataset, checkpoint, f"constant-{rate:g}", extraction, learning_rate=rate,
                                 schedule="constant", epochs=300, **common))  # fmt: skip
                grid.append(_run(work, dataset, checkpoint, f"cosine-{rate:g}", extraction, learning_rate=rate, **common))
            if grid:
                rows.append(dict(max(grid, key=lambda r: r["validation_accuracy"]), setting="grid best: "
                                 + max(grid, key=lambda r: r["validation_accuracy"])["setting"]))  # fmt: skip
            entry = {"dataset": name, "checkpoint": checkpoint, **common, "rows": rows, "grid": grid}
            results.append(entry)
            print(json.dumps(entry), file=sys.stderr, flush=True)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
