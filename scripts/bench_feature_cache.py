"""Head-only training with and without the feature cache, on generated data, at 299x299. Prints JSON.

    python scripts/bench_feature_cache.py            # 2,000 images, 10 epochs (27 minutes here)
    python scripts/bench_feature_cache.py --quick    # 250 images, 3 epochs

Measures the wall time of each `finetune train` run (planning, extraction or the whole network per step,
validation each epoch, checkpoints), the validation accuracy of each, the extraction throughput, and, in the
same run, the frozen graph's forward throughput at batch 32 from preprocessed in-memory images, which is
the ceiling extraction is compared against. The backbone is the stand-in checkpoint (random weights,
calibrated batch-norm statistics), since this machine cannot download the real one.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from finetune.config import BuildDatasetConfig, ExportConfig, TrainConfig
from finetune.dataset import build_dataset
from finetune.export import export
from finetune.synthetic import make_image_folder, write_standin_checkpoint
from finetune.train import train


def frozen_forward_images_per_second(model_path: str, image_size: int, batch: int = 32, batches: int = 6) -> float:
    """Images/s through the .pb's `input`, fed preprocessed batches from memory (one warm-up batch)."""
    from finetune.compat import tf
    from finetune.modelfile import load_graph_def

    graph_def = load_graph_def(Path(model_path))
    images = np.random.default_rng(0).uniform(-1, 1, (batch, image_size, image_size, 3)).astype(np.float32)
    with tf.Graph().as_default() as graph:
        tf.compat.v1.import_graph_def(graph_def, name="")
        with tf.compat.v1.Session(graph=graph) as session:
            session.run("probabilities:0", {"input:0": images})
            started = time.monotonic()
            for _ in range(batches):
                session.run("probabilities:0", {"input:0": images})
            return batches * batch / (time.monotonic() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="generated images in all (default: 2000)")
    parser.add_argument("--epochs", type=float, default=10, help="epochs of head training (default: 10)")
    parser.add_argument("--image-size", type=int, default=299, help="network input size (default: 299)")
    parser.add_argument("--quick", action="store_true", help="250 images, 3 epochs")
    parser.add_argument("--workdir", help="keep data and runs here (default: a temporary folder, removed)")
    args = parser.parse_args()
    if args.quick:
        args.images, args.epochs = 250, 3
    logging.basicConfig(level=logging.WARNING)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="finetune-bench-"))
    try:
        classes = 5
        make_image_folder(workdir / "photos", num_classes=classes, images_per_class=args.images // classes,
                          seed=0, min_side=300, max_side=500)  # fmt: skip
        build_dataset(BuildDatasetConfig(image_dir=str(workdir / "photos"), out=str(workdir / "dataset")))
        checkpoint = write_standin_checkpoint(workdir / "checkpoints" / "inception_v3.ckpt")
        results = {}
        for name, cache in (("cached", "on"), ("full", "off")):
            started = time.monotonic()
            result = train(TrainConfig(
                dataset=str(workdir / "dataset"), train_dir=str(workdir / f"run-{name}"),
                checkpoint=str(checkpoint), image_size=args.image_size, epochs=args.epochs,
                feature_cache=cache, cache_dir=str(workdir / "cache"),
            ))  # fmt: skip
            results[name] = {
                "seconds": round(time.monotonic() - started, 1),
                "validation_accuracy": result.validation_accuracy,
                "steps": result.global_step,
            }
            if result.feature_cache:
                results[name]["extraction_images_per_second"] = round(result.feature_cache["images_per_second"], 1)
                results[name]["extraction_seconds"] = round(result.feature_cache["seconds"], 1)
        exported = export(ExportConfig(train_dir=str(workdir / "run-cached"), out=str(workdir / "model.pb")))
        forward = frozen_forward_images_per_second(exported.model, args.image_size)
        report = {
            "images": args.images,
            "epochs": args.epochs,
            "image_size": args.image_size,
            **results,
            "speedup": round(results["full"]["seconds"] / results["cached"]["seconds"], 2),
            "accuracy_difference_points": round(
                100 * (results["cached"]["validation_accuracy"] - results["full"]["validation_accuracy"]), 2
            ),
            "frozen_forward_images_per_second": round(forward, 1),
            "extraction_to_forward_ratio": round(results["cached"]["extraction_images_per_second"] / forward, 3),
        }
        print(json.dumps(report, indent=2))
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
