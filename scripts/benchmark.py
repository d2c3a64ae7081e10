"""Measures every stage of finetune on generated data against this machine's compute ceiling.

    python scripts/benchmark.py                # the full run
    python scripts/benchmark.py --quick        # the same fields from fewer images and steps, smaller batches
    python scripts/benchmark.py --table        # the Markdown tables on stdout instead of the JSON
    python scripts/benchmark.py --work DIR     # keep the generated photos, dataset, models and results in DIR
    python scripts/benchmark.py --checkpoint checkpoints/inception_v3.ckpt   # the real weights, not a stand-in
    python scripts/benchmark.py --stage ceiling --work DIR   # one stage in this process: its JSON on stdout

Offline, on generated photos and (unless --checkpoint) a stand-in checkpoint, through finetune's public API
only; each stage in ``STAGES`` runs in a process of its own (this script with ``--stage NAME``), so its peak
memory is a fresh process's. docs/benchmarks.md describes the stages, the FLOP accounting and how to read
the figures.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

IMAGE_SIZE = 299
BATCH = 32
CLASSES = 5
VALIDATION_FRACTION = 0.15
MATMUL_SIZE = 4096
ISSUE_FORWARD_GFLOP = 11.4  # per image at 299, as the issue counts it
# The issue's goals: the least each figure should be, and where the summary has it.
GOALS = {
    "forward_vs_ceiling": (0.85, lambda s: s["forward"]["vs_ceiling"]),
    "train_all_vs_ceiling": (0.60, lambda s: s["train_all"]["vs_ceiling"]),
    "bf16_speedup": (1.6, lambda s: min(s["bf16_speedup"][name] for name in ("forward", "train_all"))),
    "bf16_top1_agreement": (0.99, lambda s: s["bf16_top1_agreement"]),
    "build_dataset_images_per_second": (300.0, lambda s: s["build_dataset_images_per_second"]),
    "tfrecords_vs_memory": (0.90, lambda s: min(s[name]["tfrecords_vs_memory"]
                                                for name in ("forward", "train_logits", "train_mixed_7", "train_all"))),
}  # fmt: skip


@dataclass(frozen=True)
class Settings:
    """How much each stage does; --quick scales everything down but the image size."""

    photos: int  # generated photos, in CLASSES class folders
    matmuls: int  # timed matmuls per type
    pipeline_batches: int  # timed batches of the input pipeline per transform
    forward_steps: int  # timed batches of the eval graph per input
    forward_batch: int  # the forward stages' batch
    train_steps: dict  # timed training steps per preset and input
    blocks: int  # the forward and training stages' timed steps per input, in this many alternating blocks
    train_batch: int  # the training stages' batch (every stage but these and the forward runs at BATCH)
    warmup: int  # untimed steps before each timed run (and TFRecord block): graph optimisation, buffers
    finetune_steps: int  # steps of the head-only run that the export, predict and agreement stages use
    predict_images: int  # files labelled per .pb; the first batch is untimed


FULL = Settings(photos=2000, matmuls=10, pipeline_batches=30, forward_steps=10, forward_batch=BATCH,
                train_steps={"logits": 10, "mixed_7": 8, "all": 6}, train_batch=BATCH, blocks=3, warmup=2,
                finetune_steps=60, predict_images=320)  # fmt: skip
QUICK = Settings(photos=200, matmuls=3, pipeline_batches=6, forward_steps=2, forward_batch=16,
                 train_steps={"logits": 2, "mixed_7": 2, "all": 2}, train_batch=8, blocks=1, warmup=1,
                 finetune_steps=10, predict_images=64)  # fmt: skip


@dataclass(frozen=True)
class Work:
    """Where a run keeps what it generates; what depends on the weights is named apart for --checkpoint."""

    root: Path
    settings: Settings
    pretrained: Path | None = None  # --checkpoint; None: the stand-in

    photos = property(lambda self: self.root / f"photos_{self.settings.photos}")
    dataset = property(lambda self: self.root / f"dataset_{self.settings.photos}")
    checkpoint = property(lambda self: self.pretrained or self.root / "pretrained" / "inception_v3.ckpt")
    # The head-only run, and its exports, that the export, predict and agreement stages use.
    run = property(lambda self: self.root / ("run_logits" + self._weights))
    _weights = property(lambda self: "" if self.pretrained is None else "_pretrained")

    def model(self, precision: str) -> Path:
        return self.root / f"model_{precision}{self._weights}.pb"


# ------------------------------------------------------------------------------------------- measuring


def _peak_memory_mb(who: int = resource.RUSAGE_SELF) -> float:
    """This process's peak resident memory (RUSAGE_CHILDREN: its largest finished child's), in MiB."""
    return round(resource.getrusage(who).ru_maxrss / 1024, 1)  # Linux reports KiB


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _Clock:
    """Wall and process CPU time of a block; ``utilisation`` is CPU time over wall time times the cores.

    ``steps`` holds each step's wall seconds when the block ran steps (:func:`_steps`).
    """

    def __enter__(self) -> "_Clock":
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc_info) -> None:
        self.seconds = time.perf_counter() - self._wall
        self.utilisation = (time.process_time() - self._cpu) / (self.seconds * _cores())


def _rate(images: int, clock: _Clock) -> dict:
    return {"images_per_second": round(images / clock.seconds, 2), "cpu_utilisation": round(clock.utilisation, 2)}


def _steps(session, fetches, steps: int, feed: dict | None = None) -> _Clock:
    """Runs the steps on the clock, each one's wall seconds kept."""
    with _Clock() as clock:
        clock.steps = []
        for _ in range(steps):
            started = time.perf_counter()
            session.run(fetches, feed)
            clock.steps.append(round(time.perf_counter() - started, 3))
    return clock


def _timed(fetch, settings: Settings, steps: int, start: Callable = lambda session: None) -> _Clock:
    """In a session on the current graph: ``start(session)``, untimed warm-up steps, then ``steps`` on the clock."""
    from finetune.compat import tf
    from finetune.runtime import session_config

    with tf.compat.v1.Session(config=session_config()) as session:
        start(session)
        _steps(session, fetch, settings.warmup)
        return _steps(session, fetch, steps)


def _records_and_memory(graph, config, start: Callable, fetches, settings: Settings, steps: int) -> dict:
    """Steps a graph from its TFRecord reader and from one batch fed in place of the reader's output, in turns.

    ``settings.blocks`` pairs of blocks, each TFRecord block after ``settings.warmup`` untimed steps; each rate
    is the median of its blocks', so a slow stretch of the machine is outvoted (docs/benchmarks.md). Closing
    the session is timed too: with tf.data's autotuning on, it once waited 12 to 23 s.
    """
    from finetune.compat import tf

    reader = list(next(op for op in graph.get_operations() if op.type == "IteratorGetNext").outputs)
    blocks = min(settings.blocks, steps)  # never an empty block
    sizes = [steps // blocks + (i < steps % blocks) for i in range(blocks)]
    clocks: dict[str, list[_Clock]] = {"tfrecords": [], "memory": []}
    records_warmup = []
    with graph.as_default(), tf.compat.v1.Session(config=config) as session:
        start(session)
        feed = dict(zip(reader, session.run(reader)))  # one batch of images, labels (and paths)
        batch = len(next(value for value in feed.values() if value.ndim == 4))
        memory_warmup = _steps(session, fetches, settings.warmup, feed)
        for size in sizes:
            records_warmup.append(_steps(session, fetches, settings.warmup).seconds)
            for phase, phase_feed in (("tfrecords", None), ("memory", feed)):
                clocks[phase].append(_steps(session, fetches, size, phase_feed))
        closing = time.perf_counter()

    def rate(phase: str) -> dict:
        rates = [size * batch / clock.seconds for size, clock in zip(sizes, clocks[phase])]
        busy = sum(clock.utilisation * clock.seconds for clock in clocks[phase])
        return {"images_per_second": round(statistics.median(rates), 2),
                "cpu_utilisation": round(busy / sum(clock.seconds for clock in clocks[phase]), 2),
                "blocks_images_per_second": [round(r, 2) for r in rates]}  # fmt: skip

    ratios = [memory.seconds / records.seconds for records, memory in zip(clocks["tfrecords"], clocks["memory"])]
    return {
        "batch_size": batch,
        "tfrecords": rate("tfrecords"),
        "memory": rate("memory"),
        "tfrecords_vs_memory": round(statistics.median(ratios), 3),
        "blocks_tfrecords_vs_memory": [round(r, 3) for r in ratios],
        # The first steps from memory and the first block's from TFRecords optimise the graph, the start-up a
        # run pays once per input; the later TFRecord blocks' take up what the reader buffered.
        "warmup_seconds": {"tfrecords": round(records_warmup[0], 1), "memory": round(memory_warmup.seconds, 1)},
        "drain_seconds": round(sum(records_warmup[1:]), 1),
        # Each step's seconds: whether a slow block was slow throughout or held up by a few steps.
        "step_seconds": {phase: [clock.steps for clock in phase_clocks] for phase, phase_clocks in clocks.items()},
        "close_seconds": round(time.perf_counter() - closing, 2),
    }


# ------------------------------------------------------------------------------------------------ stages


def stage_prepare(work: Work) -> dict:
    """Generates the photos and the stand-in checkpoint (reused when --work has them), counts the FLOPs."""
    from finetune.synthetic import make_image_folder, write_standin_checkpoint

    if not (work.photos / ".complete").exists():
        shutil.rmtree(work.photos, ignore_errors=True)
        # Photo-sized clean JPEGs (no PNG to convert), 240 to 500 pixels a side like the flowers photos.
        make_image_folder(work.photos, num_classes=CLASSES, images_per_class=work.settings.photos // CLASSES,
                          seed=0, min_side=240, max_side=500, png_fraction=0.0, jpeg_quality=90)  # fmt: skip
        (work.photos / ".complete").write_text("")
    if work.pretrained is None and not work.checkpoint.exists():
        write_standin_checkpoint(work.checkpoint, seed=0)
    files = list(work.photos.rglob("*.jpg"))
    return {"photos": len(files), "mean_jpeg_kb": round(sum(p.stat().st_size for p in files) / len(files) / 1024, 1),
            "gflop_per_image_by_block": _count_flops()}  # fmt: skip


def _count_flops() -> dict:
    """2 x multiply-adds of every convolution at 299, per image, by block (the aux head built too)."""
    from finetune import model
    from finetune.compat import tf

    by_block: dict[str, float] = {}
    with tf.Graph().as_default() as graph:
        model.build(tf.zeros([1, IMAGE_SIZE, IMAGE_SIZE, 3]), CLASSES, train_scopes=model.PRESETS["all"])
        for op in graph.get_operations():
            if op.type != "Conv2D":
                continue
            _, height, width, _ = op.outputs[0].shape.as_list()
            kernel_height, kernel_width, inputs, outputs = op.inputs[1].shape.as_list()
            block = model.scope_of(op.name.replace(f"{model.ROOT}/{model.ROOT}/", f"{model.ROOT}/"))
            flops = 2.0 * height * width * kernel_height * kernel_width * inputs * outputs
            by_block[block] = by_block.get(block, 0.0) + flops
    return {block: round(flops / 1e9, 4) for block, flops in by_block.items()}


def stage_ceiling(work: Work) -> dict:
    """GFLOP/s of 4096x4096 matmuls, float32 and bfloat16, operands held in variables."""
    from finetune.compat import tf

    results = {}
    n = MATMUL_SIZE
    for dtype in (tf.float32, tf.bfloat16):
        with tf.Graph().as_default():
            a = tf.Variable(tf.cast(tf.random.uniform([n, n], -1.0, 1.0), dtype))
            b = tf.Variable(tf.cast(tf.random.uniform([n, n], -1.0, 1.0), dtype))
            # One element of the product is fetched: the whole product is computed, almost nothing copied.
            product = tf.matmul(a, b)[0, 0]
            initialize = tf.compat.v1.global_variables_initializer()
            clock = _timed(product, work.settings, work.settings.matmuls, lambda session: session.run(initialize))
        flops = 2 * n**3 * work.settings.matmuls
        results[dtype.name] = {"gflops": round(flops / clock.seconds / 1e9, 1),
                               "cpu_utilisation": round(clock.utilisation, 2), "step_seconds": clock.steps}  # fmt: skip
    return results


def stage_build_dataset(work: Work) -> dict:
    from finetune.config import BuildDatasetConfig
    from finetune.dataset import build_dataset

    config = BuildDatasetConfig(image_dir=str(work.photos), out=str(work.dataset),
                                validation_fraction=VALIDATION_FRACTION, overwrite=True)  # fmt: skip
    with _Clock() as clock:
        result = build_dataset(config)
    return {**_rate(result.files_seen, clock), "workers": _cores(), "split_counts": result.split_counts,
            "peak_memory_workers_mb": _peak_memory_mb(resource.RUSAGE_CHILDREN)}  # fmt: skip


def _train_split_batch(work: Work, batch_size: int, **options) -> dict:
    """The next batch of the train split, read as training and evaluation read it (``dataset.read_dataset``)."""
    from finetune.compat import tf
    from finetune.dataset import load_dataset, read_dataset

    batches = read_dataset(load_dataset(work.dataset), "train", batch_size=batch_size, image_size=IMAGE_SIZE,
                           repeat=True, **options)  # fmt: skip
    return tf.compat.v1.data.make_one_shot_iterator(batches).get_next()


def stage_input_pipeline(work: Work) -> dict:
    """The training reader alone: records read, decoded and preprocessed into batches, no model."""
    from finetune.compat import tf

    results = {}
    for name, augment in (("train_transform", True), ("eval_transform", False)):
        with tf.Graph().as_default():
            images = _train_split_batch(work, BATCH, training=True, augment=augment, seed=0)["image"]
            # Fetching a batch copies 34 MB into Python; fetch one number of it so the figure is the reader's.
            clock = _timed(images[0, 0, 0, 0], work.settings, work.settings.pipeline_batches)
        results[name] = _rate(work.settings.pipeline_batches * BATCH, clock)
    return results


def stage_forward(work: Work, precision: str) -> dict:
    """The eval graph (eval preprocessing, batch norm on moving statistics) on the pretrained weights."""
    from finetune import model
    from finetune import precision as precisions
    from finetune.compat import tf
    from finetune.runtime import session_config

    with tf.Graph().as_default() as graph:
        batch = _train_split_batch(work, work.settings.forward_batch, training=False, shuffle=False,
                                   drop_remainder=True)  # fmt: skip
        net = model.build(batch["image"], CLASSES, compute_dtype=precisions.resolve(precision).dtype)
        variables = model.variables_to_restore(model.HEAD_SCOPES)

    def start(session) -> None:
        model.initialise_all_but(session, variables)
        model.restore(session, variables, model.open_checkpoint(work.checkpoint))

    return _records_and_memory(graph, session_config(), start, net.probabilities, work.settings,
                               work.settings.forward_steps)  # fmt: skip


def stage_train(work: Work, preset: str, precision: str) -> dict:
    """The training graph `finetune train` builds for the preset, stepped from TFRecords and from memory."""
    from finetune import graph, model
    from finetune.config import TrainConfig
    from finetune.plan import plan_training

    config = TrainConfig(dataset=str(work.dataset), train_dir=str(work.root / f"bench_{preset}_{precision}"),
                         checkpoint=str(work.checkpoint), trainable=preset, batch_size=work.settings.train_batch,
                         image_size=IMAGE_SIZE, steps=10**6, eval_every=0, precision=precision,
                         feature_cache="off")  # the network path: what a training step costs  # fmt: skip
    plan = plan_training(config)
    built = graph.build_training_graph(plan, start_step=0)
    checkpoint = model.open_checkpoint(work.checkpoint)
    result = _records_and_memory(
        built.graph, graph.session_config(plan), lambda session: graph.start_fresh(session, built, checkpoint),
        [built.train_op, built.loss, built.accuracy, built.learning_rate],  # what the trainer fetches
        work.settings, work.settings.train_steps[preset],
    )  # fmt: skip
    return {**result, "trainable_scopes": list(plan.trainable_scopes), "augment": plan.augment,
            "compute_dtype": plan.compute_dtype}  # fmt: skip


def stage_finetune(work: Work) -> dict:
    """`finetune train` on the head, then `finetune export` at fp32 and bf16: what the later stages use."""
    from finetune.config import ExportConfig, TrainConfig
    from finetune.export import export
    from finetune.train import train

    steps = work.settings.finetune_steps
    # The feature cache is kept in --work, beside what it was computed from, not in the user's own cache.
    config = TrainConfig(dataset=str(work.dataset), train_dir=str(work.run), checkpoint=str(work.checkpoint),
                         batch_size=BATCH, image_size=IMAGE_SIZE, steps=steps, eval_every=0, overwrite=True,
                         cache_dir=str(work.root / "features"))  # fmt: skip
    result = train(config)
    exports = {}
    for precision in ("fp32", "bf16"):
        with _Clock() as clock:
            exported = export(ExportConfig(train_dir=str(work.run), out=str(work.model(precision)),
                                           precision=precision))  # fmt: skip
        exports[precision] = {"seconds": round(clock.seconds, 2), "size_mb": round(exported.size_bytes / 2**20, 1)}
    # No speed here: the train stages measure training; this run only makes the model the next stages use.
    return {"steps": steps, "first_loss": result.first_loss, "final_loss": result.final_loss, "export": exports}


def stage_predict(work: Work, precision: str) -> dict:
    """Files through the .pb with `finetune predict`'s function, timed after its first batch (``first_batch_seconds``)."""
    from finetune.config import PredictConfig
    from finetune.predict import find_images, predict

    files = [str(path) for path, _ in find_images((str(work.photos),))][: work.settings.predict_images]
    predictions = predict(PredictConfig(paths=tuple(files), model=str(work.model(precision)), batch_size=BATCH))
    with _Clock() as first:
        labelled = list(itertools.islice(predictions, BATCH))
    with _Clock() as clock:
        timed = list(predictions)
    failed = [p.path for p in labelled + timed if p.error]
    if failed or not timed:
        raise RuntimeError(f"predict labelled {len(timed)} files after the first batch; failed: {failed[:3]}")
    return {**_rate(len(timed), clock), "first_batch_seconds": round(first.seconds, 1)}


def stage_agreement(work: Work) -> dict:
    """`finetune evaluate` at fp32 and at bf16 on the validation split: how often top-1 agrees; a control.

    The control runs fp32 on images rounded to bfloat16 (at most 0.4% of a pixel, the first of bf16's many
    roundings): how often that alone flips fp32's top-1, and how far it moves the features against how far
    bf16 does, say how much the network itself amplifies small changes. The features come from the graph
    evaluate runs (finetune.evaluate's ``checkpoint_source`` and ``predict_split``), fetched beside the
    probabilities.
    """
    import numpy as np

    from finetune import evaluate, model, rundir
    from finetune.compat import tf
    from finetune.config import EvaluateConfig
    from finetune.dataset import load_dataset

    runs = {p: evaluate.evaluate(EvaluateConfig(train_dir=str(work.run), batch_size=BATCH, precision=p))
            for p in ("fp32", "bf16")}  # fmt: skip
    fp32, bf16 = runs["fp32"].predictions, runs["bf16"].predictions
    same = [a.predicted == b.predicted for a, b in zip(fp32, bf16)]  # both in the split's file order
    # A flip between two classes the fp32 model all but ties on says little about bf16; show how close.
    flips = [{"path": a.path, "fp32": [a.predicted, round(a.confidence, 4)], "bf16": [b.predicted, round(b.confidence, 4)]}
             for a, b, agree in zip(fp32, bf16, same) if not agree]  # fmt: skip
    differences = [abs(a.confidence - b.confidence) for a, b, agree in zip(fp32, bf16, same) if agree]

    info = load_dataset(work.dataset)
    classes, newest = len(info.classes), rundir.newest_checkpoint(work.run)
    outputs = {}  # probabilities and features of each example, side by side
    for name, dtype, rounded in (("fp32", "float32", False), ("bf16", "bfloat16", False), ("control", "float32", True)):

        def build(images, dtype=dtype, rounded=rounded):
            images = tf.cast(tf.cast(images, tf.bfloat16), tf.float32) if rounded else images
            net = model.build(images, classes, compute_dtype=dtype)
            return tf.concat([net.probabilities, net.features], axis=1)

        _, restore = evaluate.checkpoint_source(newest, classes, dtype)
        outputs[name] = evaluate.predict_split(info, "validation", BATCH, IMAGE_SIZE, build, restore)[0]
    top1 = {name: values[:, :classes].argmax(axis=1) for name, values in outputs.items()}
    features = {name: values[:, classes:] for name, values in outputs.items()}

    def feature_change(name: str) -> float:
        return round(float(np.linalg.norm(features[name] - features["fp32"]) / np.linalg.norm(features["fp32"])), 4)

    return {
        "examples": len(same),
        "top1_agreement": round(sum(same) / len(same), 4),
        "control_top1_agreement": round(float((top1["control"] == top1["fp32"]).mean()), 4),
        "feature_change_bf16": feature_change("bf16"),
        "feature_change_control": feature_change("control"),
        "max_confidence_difference_where_agreeing": round(max(differences, default=0.0), 4),
        "disagreements": flips[:10],
        **{f"top1_{p}": round(run.top1, 4) for p, run in runs.items()},
        **{f"evaluate_images_per_second_{p}": round(run.images_per_second, 2) for p, run in runs.items()},
    }


# The forward and training stages, each with its row of the table: name -> (function, arguments, label).
RATE_STAGES = {
    "forward": (stage_forward, {"precision": "fp32"}, "forward (eval graph), fp32"),
    "forward_bf16": (stage_forward, {"precision": "bf16"}, "forward (eval graph), bf16"),
    **{f"train_{preset}": (stage_train, {"preset": preset, "precision": "fp32"}, f"train `{preset}`, fp32")
       for preset in ("logits", "mixed_7", "all")},
    "train_all_bf16": (stage_train, {"preset": "all", "precision": "bf16"}, "train `all`, bf16"),
}  # fmt: skip
STAGES: dict[str, Callable[[Work], dict]] = {
    "prepare": stage_prepare, "ceiling": stage_ceiling, "build_dataset": stage_build_dataset,
    "input_pipeline": stage_input_pipeline,
    **{name: functools.partial(function, **kwargs) for name, (function, kwargs, _) in RATE_STAGES.items()},
    "finetune": stage_finetune,
    "predict": functools.partial(stage_predict, precision="fp32"),
    "predict_bf16": functools.partial(stage_predict, precision="bf16"),
    "agreement": stage_agreement,
}  # fmt: skip


# ------------------------------------------------------------------------------------------------ summary


def _training_gflop(flops: dict, scopes: list[str]) -> float:
    """Per image: the forward, the aux head when trained, twice the forward of every trained block."""
    from finetune import network

    def trained(block: str) -> bool:
        return any(block == scope or block.startswith(scope + "/") for scope in scopes)

    forward = sum(f for block, f in flops.items() if block != network.AUX_SCOPE)
    aux = flops.get(network.AUX_SCOPE, 0.0) if trained(network.AUX_SCOPE) else 0.0
    return forward + aux + 2 * sum(f for block, f in flops.items() if trained(block))


def summarise(stages: dict) -> dict:
    """The figures the issue asks for, derived from the stages' raw results, with the goals they meet."""
    ceiling = {"fp32": stages["ceiling"]["float32"]["gflops"], "bf16": stages["ceiling"]["bfloat16"]["gflops"]}
    flops = stages["prepare"]["gflop_per_image_by_block"]
    forward_gflop = sum(f for block, f in flops.items() if not block.endswith("AuxLogits"))
    summary: dict = {
        "ceiling_gflops": ceiling,
        "forward_gflop_per_image_counted": round(forward_gflop, 2),
        "build_dataset_images_per_second": stages["build_dataset"]["images_per_second"],
        "input_pipeline_images_per_second": {k: stages["input_pipeline"][k]["images_per_second"]
                                             for k in ("train_transform", "eval_transform")},
        "predict_images_per_second": {"fp32": stages["predict"]["images_per_second"],
                                      "bf16": stages["predict_bf16"]["images_per_second"]},
    }  # fmt: skip
    # The forward's headline is from memory (what the network costs), training's from TFRecords (what a run gets).
    for name in RATE_STAGES:
        stage, training = stages[name], name.startswith("train")
        gflop = ISSUE_FORWARD_GFLOP
        if training:
            gflop *= _training_gflop(flops, stage["trainable_scopes"]) / forward_gflop
        rate = stage["tfrecords" if training else "memory"]["images_per_second"]
        summary[name] = {
            "images_per_second": rate,
            "gflop_per_image": round(gflop, 1),
            "vs_ceiling": round(rate * gflop / ceiling["bf16" if name.endswith("bf16") else "fp32"], 3),
            "tfrecords_vs_memory": stage["tfrecords_vs_memory"],
        }
    speedup = {name: round(summary[f"{name}_bf16"]["images_per_second"] / summary[name]["images_per_second"], 2)
               for name in ("forward", "train_all")}  # fmt: skip
    predict = summary["predict_images_per_second"]
    summary["bf16_speedup"] = {**speedup, "predict": round(predict["bf16"] / predict["fp32"], 2)}
    summary["bf16_top1_agreement"] = stages["agreement"]["top1_agreement"]
    summary["peak_memory_mb"] = {name: stage["peak_memory_mb"] for name, stage in stages.items() if name != "prepare"}
    summary["peak_memory_mb"]["build_dataset_each_worker"] = stages["build_dataset"]["peak_memory_workers_mb"]
    measured = {name: (goal, figure(summary)) for name, (goal, figure) in GOALS.items()}
    summary["goals"] = {name: {"measured": v, "goal": goal, "met": v >= goal} for name, (goal, v) in measured.items()}
    return summary


def table(report: dict) -> str:
    """The Markdown tables of docs/benchmarks.md: one row per figure, then the issue's goals."""
    s, stages = report["summary"], report["stages"]

    def row(label: str, result: str, names: tuple = (), share: str = "", ratio: str = "", memory: str = "") -> str:
        use = " / ".join(f"{part['cpu_utilisation']:.2f}" for part in names)  # the timed parts' CPU use
        return f"| {label} | {result} | {share} | {ratio} | {use} | {memory} |"

    def gb(*names: str) -> str:
        return " / ".join(f"{stages[name]['peak_memory_mb'] / 1024:.1f}" for name in names)

    def pct(value: float) -> str:
        return f"{100 * value:.0f}%"

    ceiling, pipeline, build = stages["ceiling"], stages["input_pipeline"], stages["build_dataset"]
    lines = [
        "| stage (299x299, batch 32) | result (from TFRecords / from memory) | of the ceiling | TFRecords ÷ memory "
        "| CPU use | peak RSS, GB |",
        "|---|---|---|---|---|---|",
        row("matmul 4096x4096, fp32 / bf16", f"{s['ceiling_gflops']['fp32']:.0f} / {s['ceiling_gflops']['bf16']:.0f}"
            " GFLOP/s", (ceiling["float32"], ceiling["bfloat16"]), "(the ceiling)", memory=gb("ceiling")),
        row(f"build-dataset, clean JPEGs, {build['workers']} workers", f"{build['images_per_second']:.0f} images/s",
            memory=f"{build['peak_memory_mb'] / 1024:.1f} + {build['peak_memory_workers_mb'] / 1024:.1f} per worker"),
        row("input pipeline alone, train / eval transform", f"{pipeline['train_transform']['images_per_second']:.0f}"
            f" / {pipeline['eval_transform']['images_per_second']:.0f} images/s",
            (pipeline["train_transform"], pipeline["eval_transform"]), memory=gb("input_pipeline")),
    ]  # fmt: skip
    for name, (*_, label) in RATE_STAGES.items():
        stage = stages[name]
        label += f", {s[name]['gflop_per_image']:.0f} GFLOP/image" if name.startswith("train") else ""
        label += f", batch {stage['batch_size']}" if stage["batch_size"] != BATCH else ""
        rates = f"{stage['tfrecords']['images_per_second']:.1f} / {stage['memory']['images_per_second']:.1f} images/s"
        lines.append(row(label, rates, (stage["tfrecords"], stage["memory"]), pct(s[name]["vs_ceiling"]),
                         pct(s[name]["tfrecords_vs_memory"]), gb(name)))  # fmt: skip
    predict, speedup, agreement = s["predict_images_per_second"], s["bf16_speedup"], stages["agreement"]
    lines += [
        row("predict from the .pb, fp32 / bf16", f"{predict['fp32']:.1f} / {predict['bf16']:.1f} images/s",
            (stages["predict"], stages["predict_bf16"]), memory=gb("predict", "predict_bf16")),
        row("bf16 over fp32: forward / train `all` / predict",
            f"{speedup['forward']:.2f}x / {speedup['train_all']:.2f}x / {speedup['predict']:.2f}x"),
        row("bf16 vs fp32, `finetune evaluate` on the validation split",
            f"top-1 agrees on {pct(agreement['top1_agreement'])} of {agreement['examples']}; control, fp32 on images "
            f"rounded to bf16: {pct(agreement['control_top1_agreement'])}; the features move "
            f"{pct(agreement['feature_change_bf16'])} under bf16, {pct(agreement['feature_change_control'])} under "
            "the control", memory=gb("agreement")),
        "", "| goal | measured | met |", "|---|---|---|",
    ]  # fmt: skip
    lines += [f"| {name} at least {goal['goal']:g} | {goal['measured']:g} | {'yes' if goal['met'] else 'no'} |"
              for name, goal in s["goals"].items()]  # fmt: skip
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- running


def run_one_stage(args: argparse.Namespace) -> int:
    """``--stage NAME``: runs the stage in this process and prints its JSON, with this process's peak memory."""
    from finetune.errors import FinetuneError

    logging.basicConfig(level=logging.INFO, format="%(message)s")  # finetune's progress and warnings, on stderr
    try:
        pretrained = None
        if args.checkpoint:  # the prefix TensorFlow reads, checked as `finetune train` checks it
            from finetune import model

            pretrained = Path(model.open_checkpoint(args.checkpoint).path).resolve()
        result = STAGES[args.stage](Work(Path(args.work), QUICK if args.quick else FULL, pretrained))
    except FinetuneError as error:
        sys.exit(f"error: {error}")
    print(json.dumps({**result, "peak_memory_mb": _peak_memory_mb()}))
    return 0


def _run_stage(name: str, args: argparse.Namespace, root: Path) -> dict:
    """Runs one stage in a new process (this script with --stage) and returns its JSON result.

    This process imports neither TensorFlow nor numpy and stays small: Linux carries a process's peak memory
    across the exec that starts a child, so a large parent would put a floor under every stage's figure.
    Without --verbose the child's stderr (TensorFlow's C++ log lines too) goes to a file, whose tail is shown
    if the stage fails.
    """
    command = [sys.executable, str(Path(__file__).resolve()), "--stage", name, "--work", str(root)]
    command += (["--quick"] if args.quick else []) + (["--checkpoint", args.checkpoint] if args.checkpoint else [])
    started = time.monotonic()
    with tempfile.TemporaryFile() as log:
        child = subprocess.run(command, stdout=subprocess.PIPE, stderr=None if args.verbose else log, text=True)
        if child.returncode != 0 or not child.stdout.strip():
            log.seek(0)
            tail = log.read().decode("utf-8", "replace").strip().splitlines()[-15:]
            raise SystemExit("\n".join([f"error: stage {name} failed (exit {child.returncode})"] + tail))
    result = json.loads(child.stdout.strip().splitlines()[-1])
    result["stage_seconds"] = round(time.monotonic() - started, 1)  # the process's start and imports included
    print(f"{name}: done in {result['stage_seconds']:.0f} s", file=sys.stderr)
    return result


def _report(args: argparse.Namespace, root: Path) -> dict:
    """Runs the stages asked for; the report takes every stage's newest result in --work."""
    from finetune.precision import cpu_has_bf16

    started = time.monotonic()
    # Each stage's result is kept, so that --stages can rerun some and summarise with the others.
    results = root / (("results-quick" if args.quick else "results-full") + ("-pretrained" if args.checkpoint else ""))
    results.mkdir(parents=True, exist_ok=True)
    for name in args.stages or STAGES:
        (results / f"{name}.json").write_text(json.dumps(_run_stage(name, args, root)))
    stages = {name: json.loads((results / f"{name}.json").read_text())
              for name in STAGES if (results / f"{name}.json").exists()}  # fmt: skip
    missing = [name for name in STAGES if name not in stages]
    return {
        "command": " ".join(["python", "scripts/benchmark.py"] + sys.argv[1:]),
        "quick": args.quick,
        "cores": _cores(),
        "cpu_has_bf16": cpu_has_bf16(),
        "checkpoint": args.checkpoint or "stand-in (finetune.synthetic, random weights)",
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "seconds": round(time.monotonic() - started, 1),
        "stages": stages,
        "summary": f"needs the results of {', '.join(missing)}" if missing else summarise(stages),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and steps, smaller batches, same fields")
    parser.add_argument("--table", action="store_true", help="print the Markdown tables on stdout, not the JSON")
    parser.add_argument("--work", help="folder for the photos, dataset and models (default: a temporary one)")
    parser.add_argument("--checkpoint", help="the pretrained checkpoint to use (default: a generated stand-in)")
    parser.add_argument("--stages", nargs="+", choices=list(STAGES),
                        help="run only these; the summary takes the others from an earlier run in --work")
    parser.add_argument("--stage", choices=list(STAGES), help="run this stage in this process, print its JSON")
    parser.add_argument("-v", "--verbose", action="store_true", help="show each stage's own log lines")
    args = parser.parse_args()
    if args.stage:
        if not args.work:
            parser.error("--stage needs --work: the folder the earlier stages wrote to")
        return run_one_stage(args)
    root = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="finetune-benchmark-"))
    try:
        report = _report(args, root)
    finally:
        if not args.work:
            shutil.rmtree(root, ignore_errors=True)
    text = table(report) if isinstance(report["summary"], dict) else None
    print(text if args.table and text else json.dumps(report, indent=1))
    if text and not args.table:
        print(text, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
