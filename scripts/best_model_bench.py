"""Does keeping the best checkpoint help? Last vs best on a generated imbalanced, noisy dataset. Prints JSON.

    python scripts/best_model_bench.py --work /tmp/best-bench \\
        --checkpoint /work/trained/inception_v3.ckpt --checkpoint /work/bench/standin.ckpt

The dataset: 4 generated classes of 150, 60, 30 and 15 photos (10:1 between the largest and the smallest),
5% of all files moved into another class's folder (flipped labels, in every split alike), split 60/20/20 into
train, validation and test. For each checkpoint and seed, the plain ``finetune train`` (cached features,
derived schedule, learning-rate search) with the default ``--select-by accuracy``; then ``finetune evaluate``
of the newest and of the best checkpoint on the validation and the test split: top-1 and expected
calibration error (15 equal-width bins of the top-class confidence), as trained and with the temperature
fitted on the validation split (evaluate on validation fits it; on test it applies it). Only the public API
is used. ``--reuse`` evaluates the runs already in --work instead of training them again.

``--features`` measures the options instead, on the test split of the same data and runs: the plain run
(``natural``: its best checkpoint as is, with ``--tta flip`` and with ``--tta crops``), ``--ema 0.995`` (the
decay docs/best-model.md suggests for the derived 2,000 steps; newest and best checkpoint) and ``--sampling
balanced`` (best checkpoint). Besides top-1 and ECE it gives the mean per-class recall (balanced accuracy),
which is what balanced sampling is for. The plain runs are the ones the first mode trained (``--reuse``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from finetune import cli, rundir
from finetune.config import EvaluateConfig, TrainConfig
from finetune.evaluate import evaluate
from finetune.synthetic import make_image_folder
from finetune.train import train

COUNTS = (150, 60, 30, 15)
FLIPPED = 0.05


def expected_calibration_error(confidences: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by the bin's share."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidences, edges[1:-1], right=True), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        chosen = which == b
        if chosen.any():
            error += chosen.mean() * abs(correct[chosen].mean() - confidences[chosen].mean())
    return float(error)


def make_dataset(work: Path, image_size: int) -> Path:
    photos, dataset = work / "photos", work / "dataset"
    if dataset.exists():
        return dataset
    shutil.rmtree(photos, ignore_errors=True)
    make_image_folder(photos, num_classes=len(COUNTS), images_per_class=max(COUNTS), seed=3, min_side=image_size,
                      max_side=int(image_size * 1.6), png_fraction=0.0)  # fmt: skip
    rng = np.random.default_rng(3)
    classes = sorted(p.name for p in photos.iterdir())
    for name, count in zip(classes, COUNTS):
        for extra in sorted((photos / name).iterdir())[count:]:
            extra.unlink()
    files = sorted(p for p in photos.rglob("*.jpg"))
    for path in rng.choice(files, size=round(FLIPPED * len(files)), replace=False):
        others = [c for c in classes if c != path.parent.name]
        path.rename(photos / others[rng.integers(len(others))] / path.name)
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON alone
        code = cli.main(["build-dataset", str(photos), "--out", str(dataset), "--validation-fraction", "0.2",
                         "--test-fraction", "0.2", "--workers", "1"])  # fmt: skip
    if code:
        sys.exit(code)
    return dataset


def scores(train_dir: Path, split: str, which: str) -> dict:
    result = evaluate(EvaluateConfig(train_dir=str(train_dir), split=split, checkpoint=which, mistakes=0))
    if split == "validation":  # evaluate fits T on validation; record it so that the test split applies it
        rundir.write_calibration(train_dir, result.global_step, {"temperature": result.temperature})
    confidences = np.array([p.confidence for p in result.predictions])
    correct = np.array([p.label == p.predicted for p in result.predictions], float)
    return {"step": result.global_step, "top1": result.top1, "ece": expected_calibration_error(confidences, correct),
            "temperature": result.temperature, "ece_calibrated": result.ece_calibrated}  # fmt: skip


VARIANTS = {"natural": {}, "ema": {"ema": 0.995}, "balanced": {"sampling": "balanced"}}
# (variant, checkpoint, --tta) evaluated on the test split in --features mode
FEATURE_EVALUATIONS = (("natural", "best", "none"), ("natural", "best", "flip"), ("natural", "best", "crops"),
                       ("ema", "newest", "none"), ("ema", "best", "none"), ("balanced", "best", "none"))  # fmt: skip


def test_scores(train_dir: Path, which: str, tta: str) -> dict:
    result = evaluate(EvaluateConfig(train_dir=str(train_dir), split="test", checkpoint=which, mistakes=0, tta=tta,
                                     html=False))  # fmt: skip
    return {"step": result.global_step, "top1": result.top1, "ece": result.ece,
            "balanced_accuracy": float(np.mean([c.recall for c in result.per_class])),
            "top1_without_tta": result.top1_without_tta}  # fmt: skip


def summarise(runs: list[dict], checkpoints: list[str], fields: list[tuple[str, str]]) -> dict:
    """Per checkpoint, each (run field, metric)'s mean and spread over the seeds, where it was measured."""
    summary = {}
    for checkpoint in checkpoints:
        mine = [r for r in runs if r["checkpoint"] == checkpoint]
        summary[checkpoint] = {
            f"{field}_{metric}": {"mean": float(np.mean(v)), "std": float(np.std(v))}
            for field, metric in fields
            for v in [[r[field][metric] for r in mine if r[field].get(metric) is not None]]
            if v
        }  # fmt: skip
    return summary


def features_bench(args: argparse.Namespace, dataset: Path) -> None:
    runs = []
    for checkpoint in args.checkpoint:
        for seed in args.seeds:
            run = {"checkpoint": checkpoint, "seed": seed}
            for variant, options in VARIANTS.items():
                suffix = "" if variant == "natural" else f"-{variant}"
                train_dir = args.work / f"run-{Path(checkpoint).stem}-{seed}{suffix}"
                started = time.monotonic()
                result = train(TrainConfig(dataset=str(dataset), train_dir=str(train_dir), checkpoint=checkpoint,
                                           image_size=args.image_size, seed=seed, cache_dir=str(args.work / "cache"),
                                           overwrite=not (args.reuse and train_dir.exists()), **options))  # fmt: skip
                run[f"{variant}_train_seconds"] = round(time.monotonic() - started, 1)
                run[f"{variant}_best_step"] = result.best_step
                for name, which, tta in FEATURE_EVALUATIONS:
                    if name == variant:
                        run[f"{variant}_{which}_{tta}"] = test_scores(train_dir, which, tta)
            runs.append(run)
            print(json.dumps(run), file=sys.stderr)
    summary = summarise(runs, args.checkpoint, [(f"{variant}_{which}_{tta}", metric)
                                                for variant, which, tta in FEATURE_EVALUATIONS
                                                for metric in ("top1", "ece", "balanced_accuracy")])  # fmt: skip
    print(json.dumps({"image_size": args.image_size, "counts": COUNTS, "flipped": FLIPPED, "split": "test",
                      "runs": runs, "summary": summary}, indent=2))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--checkpoint", action="append", required=True)
    parser.add_argument("--image-size", type=int, default=149)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--reuse", action="store_true", help="evaluate the runs already trained in --work")
    parser.add_argument("--features", action="store_true", help="measure --ema, --tta and --sampling instead")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    dataset = make_dataset(args.work, args.image_size)
    if args.features:
        features_bench(args, dataset)
        return
    runs = []
    for checkpoint in args.checkpoint:
        for seed in args.seeds:
            train_dir = args.work / f"run-{Path(checkpoint).stem}-{seed}"
            started = time.monotonic()
            config = TrainConfig(dataset=str(dataset), train_dir=str(train_dir), checkpoint=checkpoint,
                                 image_size=args.image_size, seed=seed, overwrite=not args.reuse,
                                 cache_dir=str(args.work / "cache"))  # fmt: skip
            result = train(config)  # with --reuse: "already complete", nothing trained
            run = {"checkpoint": checkpoint, "seed": seed, "steps": result.global_step,
                   "best_step": result.best_step, "train_seconds": round(time.monotonic() - started, 1)}  # fmt: skip
            for which in ("newest", "best"):
                for split in ("validation", "test"):
                    run[f"{which}_{split}"] = scores(train_dir, split, which)
            runs.append(run)
            print(json.dumps(run), file=sys.stderr)
    summary = summarise(runs, args.checkpoint, [(f"{which}_{split}", metric)
                                                for which in ("newest", "best") for split in ("validation", "test")
                                                for metric in ("top1", "ece", "ece_calibrated", "temperature")])  # fmt: skip
    print(json.dumps({"image_size": args.image_size, "counts": COUNTS, "flipped": FLIPPED, "runs": runs,
                      "summary": summary}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
