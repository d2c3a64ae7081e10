"""What the HTML report costs: `finetune evaluate` on a 500-image validation split at 299, with and without it.

Builds generated photos, a stand-in checkpoint (same graph and cost as the real one) and a one-step run, then
evaluates twice (--no-html, then with the report) and times Grad-CAM per image on its own. Prints one JSON
object. Public API only. Takes a few minutes on 2 cores.

    python scripts/bench_report.py [--workdir DIR] [--validation 500] [--image-size 299]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from finetune import gradcam
from finetune.config import BuildDatasetConfig, EvaluateConfig, TrainConfig
from finetune.dataset import build_dataset, load_dataset, read_dataset
from finetune.evaluate import evaluate
from finetune.synthetic import make_image_folder, write_standin_checkpoint
from finetune.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="keep the data here (default: a temporary folder)")
    parser.add_argument("--validation", type=int, default=500, help="validation images")
    parser.add_argument("--image-size", type=int, default=299)
    parser.add_argument("--mistakes", type=int, default=10)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-report-"))
    classes, fraction = 5, 0.9
    per_class = int(np.ceil(args.validation / fraction / classes)) + 1
    photos, dataset, run = work / "photos", work / "dataset", work / "run"
    checkpoint = work / "inception_v3.ckpt"
    if not checkpoint.exists():
        write_standin_checkpoint(checkpoint, seed=1)
    if not dataset.exists():
        make_image_folder(photos, num_classes=classes, images_per_class=per_class, seed=2, min_side=200,
                          max_side=400)  # fmt: skip
        build_dataset(BuildDatasetConfig(image_dir=str(photos), out=str(dataset), validation_fraction=fraction))
    if not run.exists():
        train(TrainConfig(dataset=str(dataset), train_dir=str(run), checkpoint=str(checkpoint),
                          image_size=args.image_size, steps=1, eval_every=0, lr_search="off"))  # fmt: skip

    def timed(html: bool):
        started = time.monotonic()
        result = evaluate(EvaluateConfig(train_dir=str(run), mistakes=args.mistakes, html=html))
        return result, time.monotonic() - started

    plain, plain_seconds = timed(False)
    reported, reported_seconds = timed(True)

    # Grad-CAM alone, per image, once the graph is loaded and warm.
    info = load_dataset(str(dataset))
    from finetune.compat import tf

    with tf.Graph().as_default():
        batch = tf.compat.v1.data.make_one_shot_iterator(
            read_dataset(info, "validation", batch_size=16, image_size=args.image_size, training=False)
        ).get_next()
        with tf.compat.v1.Session() as session:
            images = session.run(batch["image"])
    cam = gradcam.from_checkpoint(reported.source, reported.classes, args.image_size)
    try:
        cam.run(images[:2])
        started = time.monotonic()
        cam.run(images)
        per_image = (time.monotonic() - started) / len(images)
    finally:
        cam.close()
    print(json.dumps({
        "examples": reported.examples,
        "image_size": args.image_size,
        "mistakes_drawn": len(reported.most_confident_mistakes),
        "evaluate_seconds_without_html": round(plain_seconds, 2),
        "evaluate_seconds_with_html": round(reported_seconds, 2),
        "html_seconds": round(reported.html_seconds, 2),
        "html_share_of_evaluate_without": round(reported.html_seconds / plain_seconds, 3),
        "html_bytes": reported.html_bytes,
        "gradcam_seconds_per_image": round(per_image, 3),
        "images_per_second": round(plain.images_per_second, 2),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
