"""Size, speed and agreement of every deployment format against the float32 .pb, per trained run. Prints JSON.

    python scripts/bench_deploy.py --train-dir runs/standin --train-dir runs/trained --work bench-deploy

For each run (``--train-dir``, repeatable), exports the .pb, SavedModel, float .tflite and .onnx, then the
.tflite at ``--quantize float16``, ``dynamic`` and ``int8`` (calibrated as `finetune export` does), each
with `finetune export`'s own function, into ``--work``/<run name>/ (reused when already there). Then, in this
one process:

- size: bytes of each file (a SavedModel: its folder);
- images/s: predicting one fixed batch of ``--batch`` validation images (preprocessed, in memory) through
  each runtime, after one warm-up batch; ``--rounds`` rounds, each timing every format once in turn, so
  drift on a shared machine falls on all alike; the median round;
- agreement: the share of the validation split on which each format's top-1 class is the fp32 .pb's
  (and each one's own top-1 accuracy), every example once, in batches of ``--batch``.

Uses finetune's public functions only: export, open_runner, load_dataset and read_dataset.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from finetune.config import ExportConfig
from finetune.dataset import load_dataset, read_dataset
from finetune.export import export
from finetune.runtimes import cores, open_runner

# (name, export --format, --quantize, which of its files to run)
VARIANTS = (
    ("pb", ("pb", "saved_model", "tflite", "onnx"), "none", "pb"),
    ("saved_model", None, "none", "saved_model"),
    ("tflite", None, "none", "tflite"),
    ("onnx", None, "none", "onnx"),
    ("tflite-float16", ("tflite",), "float16", "tflite"),
    ("tflite-dynamic", ("tflite",), "dynamic", "tflite"),
    ("tflite-int8", ("tflite",), "int8", "tflite"),
)
# The goals of issue 19, in bytes (MB = 10^6) and ratios.
INT8_SPEEDUP, INT8_AGREEMENT, INT8_BYTES, FLOAT16_BYTES = 2.0, 0.99, 25_000_000, 50_000_000


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def export_variants(train_dir: Path, work: Path, calibration_images: int) -> dict[str, dict]:
    """Every variant's file, exported once into ``work`` (an existing export there is reused)."""
    files: dict[str, dict] = {}
    for name, formats, quantize, kind in VARIANTS:
        folder = work / (quantize if formats and quantize != "none" else "float")
        out = folder / "model.pb"
        path = out.with_suffix({"pb": ".pb", "saved_model": ".saved_model", "tflite": ".tflite", "onnx": ".onnx"}[kind])
        seconds = None
        if formats and not path.exists():
            started = time.monotonic()
            export(ExportConfig(train_dir=str(train_dir), out=str(out), format=formats, quantize=quantize,
                                calibration_images=calibration_images))  # fmt: skip
            seconds = time.monotonic() - started
        files[name] = {"path": str(path), "quantize": quantize, "export_seconds": seconds}
    return files


def validation_images(run_config: dict, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The run's validation split under eval preprocessing, in memory: images and labels."""
    from finetune.compat import tf

    info = load_dataset(run_config["dataset"])
    with tf.Graph().as_default():
        batches = read_dataset(info, "validation", batch_size=info.split_counts["validation"],
                               image_size=image_size, training=False)  # fmt: skip
        batch = tf.compat.v1.data.make_one_shot_iterator(batches).get_next()
        with tf.compat.v1.Session() as session:
            values = session.run(batch)
    return values["image"], values["label"]


def measure_run(train_dir: Path, work: Path, batch: int, rounds: int, calibration_images: int) -> dict:
    run_config = json.loads((train_dir / "config.json").read_text())
    image_size = run_config["image_size"]
    files = export_variants(train_dir, work, calibration_images)
    images, labels = validation_images(run_config, image_size)
    timing_batch = images[:batch]
    runners = {name: open_runner(entry["path"]) for name, entry in files.items()}
    try:
        for runner in runners.values():
            runner.run(timing_batch)  # warm-up: allocation, XNNPACK packing, graph optimisation
        per_round: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(rounds):
            for name, runner in runners.items():
                started = time.perf_counter()
                runner.run(timing_batch)
                per_round[name].append(time.perf_counter() - started)
        predictions = {}
        for name, runner in runners.items():
            chunks = [runner.run(images[i:i + batch]) for i in range(0, len(images), batch)]
            predictions[name] = np.concatenate(chunks).argmax(axis=1)
        runtime = {name: runner.runtime for name, runner in runners.items()}
    finally:
        for runner in runners.values():
            runner.close()
    pb_speed = len(timing_batch) / statistics.median(per_round["pb"])
    rows = []
    for name, entry in files.items():
        speed = len(timing_batch) / statistics.median(per_round[name])
        size = _size(Path(entry["path"]))
        rows.append({
            "variant": name,
            "file": entry["path"],
            "quantize": entry["quantize"],
            "runtime": runtime[name],
            "size_bytes": size,
            "size_mb": round(size / 1e6, 1),
            "images_per_second": round(speed, 2),
            "speedup_vs_pb": round(speed / pb_speed, 2),
            "batch_seconds": [round(s, 3) for s in per_round[name]],
            "top1_agreement_with_pb": float((predictions[name] == predictions["pb"]).mean()),
            "top1_accuracy": float((predictions[name] == labels).mean()),
            "export_seconds": entry["export_seconds"] and round(entry["export_seconds"], 1),
        })  # fmt: skip
    int8 = next(r for r in rows if r["variant"] == "tflite-int8")
    half = next(r for r in rows if r["variant"] == "tflite-float16")
    return {
        "train_dir": str(train_dir),
        "checkpoint": run_config.get("checkpoint"),
        "dataset": run_config["dataset"],
        "image_size": image_size,
        "validation_examples": int(len(labels)),
        "batch": len(timing_batch),
        "rounds": rounds,
        "variants": rows,
        "goals": {
            "int8_speedup_at_least_2x": int8["speedup_vs_pb"] >= INT8_SPEEDUP,
            "int8_agreement_at_least_99_percent": int8["top1_agreement_with_pb"] >= INT8_AGREEMENT,
            "int8_at_most_25_mb": int8["size_bytes"] <= INT8_BYTES,
            "float16_at_most_50_mb": half["size_bytes"] <= FLOAT16_BYTES,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-dir", action="append", required=True, help="a trained run (repeatable)")
    parser.add_argument("--work", required=True, help="folder for the exported files (reused when there)")
    parser.add_argument("--batch", type=int, default=32, help="images per batch (default: 32)")
    parser.add_argument("--rounds", type=int, default=5, help="timed batches per format (default: 5)")
    parser.add_argument("--calibration-images", type=int, default=100, help="int8 calibration (default: 100)")
    args = parser.parse_args()
    results = {
        "machine": {"cores": cores(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "load_average_at_start": os.getloadavg()},  # fmt: skip
        "runs": {},
    }
    for train_dir in map(Path, args.train_dir):
        print(f"measuring {train_dir}", file=sys.stderr)
        results["runs"][train_dir.name] = measure_run(
            train_dir, Path(args.work) / train_dir.name, args.batch, args.rounds, args.calibration_images
        )
    results["machine"]["load_average_at_end"] = os.getloadavg()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
