"""Measures every stage of finetune on generated data against this machine's compute ceiling.

    python scripts/benchmark.py                # the full run
    python scripts/benchmark.py --quick        # the same fields from fewer images and steps, smaller batches
    python scripts/benchmark.py --table        # the Markdown tables on stdout instead of the JSON
    python scripts/benchmark.py --work DIR     # keep the generated photos, dataset, models and results in DIR
    python scripts/benchmark.py --checkpoint checkpoints/inception_v3.ckpt   # the real weights, not a stand-in

On this machine's 2 quiet cores the full run takes 11 1/2 minutes in a fresh --work (9 1/2 when the photos and
features are already there) and --quick about 2 (2 min 3 s to 2 min 6 s in three fresh runs). --quick times 2
steps a phase instead of 6 to 10, on 200 photos instead of 2000, runs the forward at batch 16 and trains at
batch 8 instead of 32: per image the forward at 16 ran within 1% of 32 here and training at 8 2 to 7% below,
and those stages' peak memory is their batch's. Each stage's ``stage_seconds`` says where the time goes. In
a 2 min 4 s run the six network stages took 20 s of timed steps, 20 s of untimed first steps (TensorFlow
optimises the graph anew for each input) and 25 s of graph building and restoring; the head-only ``finetune
train`` with its feature extraction and two exports took 22 s, the agreement passes 11, predict 10, the
photos, stand-in and FLOP count 6 and the ceiling 4.

Prints one JSON object on stdout and the tables on stderr. Everything runs on generated data, offline: a
folder of clean JPEG photos from ``finetune.synthetic.make_image_folder`` and, unless --checkpoint names the
real one, a stand-in for the pretrained checkpoint (slim's names and shapes, calibrated random values). Speed
does not depend on the weights; the bf16 agreement does (see ``stage_agreement``). TensorFlow and finetune
are imported once; each stage then runs in a process forked from that one, so its peak resident memory is
its own (the same figure a fresh process shows, see ``_run_stage``). Graph building and the first
(graph-optimising) steps are kept off the clock; the JSON gives those first steps as ``warmup_seconds``.
Stages, all at 299x299 and batch 32 (under --quick the forward at 16, training at 8):

- ``ceiling``: 4096x4096 matmuls in TensorFlow, float32 and bfloat16, GFLOP/s;
- ``build_dataset``: the photos to TFRecords with every core, images/s;
- ``input_pipeline``: TFRecords read, decoded and preprocessed (train and eval transforms), no model;
- ``forward``, ``forward_bf16``: the eval graph, stepped from TFRecords and from one batch held in memory, in
  alternating blocks (three pairs in the full run; see ``_records_and_memory``);
- ``train_logits``, ``train_mixed_7``, ``train_all``, ``train_all_bf16``: the graph ``finetune train`` builds
  for that preset, stepped in the same way from TFRecords and from one batch in memory fed in place of the
  reader's output (same graph, same session), so the two figures differ by what the input pipeline costs and
  nothing else (``finetune.graph.build_training_graph``: exactly the graph the trainer runs);
- ``finetune``: ``finetune train`` itself on the head, then ``finetune export`` of it at fp32 and bf16;
- ``predict``, ``predict_bf16``: image files through each ``.pb``, as ``finetune predict`` runs them;
- ``agreement``: the eval graph ``finetune evaluate`` builds, at fp32 and at bf16 on the validation split,
  top-1 agreement, and a control: fp32 on images rounded to bfloat16, with how far each moves the features.

FLOP accounting. ``prepare`` counts the forward pass from the graph (2 x multiply-adds of every convolution;
batch norm, ReLU, pooling and concatenation are a few percent more and not counted): about 11.4 GFLOP per
image at 299, the figure the issue gives. Training a block costs its forward again twice over:
once for the gradient of its weights, once for the gradient of its input. So a step costs
``forward + aux head (when trained) + 2 x forward of the trained blocks`` per image: about 1x the forward
for ``logits``, 1.35x for ``mixed_7`` and 3x for ``all``. It is an upper bound by the input gradient of each
trained branch's first layer, which nothing needs. A figure's share of the ceiling is
``images/s x FLOPs per image / matmul GFLOP/s``, against the fp32 ceiling for fp32 and the bf16 one for bf16;
forward from the in-memory rate (what the network costs), training from the TFRecord rate (what a run gets).

Every timed figure comes with its CPU use: process CPU time over wall time times the cores. A compute-bound
stage on quiet cores runs near 1.0; about 0.5 on this 2-core machine means other processes held a core,
and the figure is depressed accordingly (the ceiling too, if it was measured under the same load).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

IMAGE_SIZE = 299
BATCH = 32
CLASSES = 5
VALIDATION_FRACTION = 0.15
MATMUL_SIZE = 4096
ISSUE_FORWARD_GFLOP = 11.4  # per image at 299, as the issue counts it
# The issue's goals.
GOALS = {
    "forward_vs_ceiling": 0.85,
    "train_all_vs_ceiling": 0.60,
    "bf16_speedup": 1.6,
    "bf16_top1_agreement": 0.99,
    "build_dataset_images_per_second": 300.0,
    "tfrecords_vs_memory": 0.90,
}


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
    predict_images: int  # files labelled per .pb


FULL = Settings(photos=2000, matmuls=10, pipeline_batches=30, forward_steps=10, forward_batch=BATCH,
                train_steps={"logits": 10, "mixed_7": 8, "all": 6}, train_batch=BATCH, blocks=3, warmup=2,
                finetune_steps=60, predict_images=320)  # fmt: skip
QUICK = Settings(photos=200, matmuls=3, pipeline_batches=6, forward_steps=2, forward_batch=16,
                 train_steps={"logits": 2, "mixed_7": 2, "all": 2}, train_batch=8, blocks=1, warmup=1,
                 finetune_steps=10, predict_images=32)  # fmt: skip


@dataclass(frozen=True)
class Work:
    """Where a run keeps what it generates."""

    root: Path
    settings: Settings
    pretrained: Path | None = None  # --checkpoint; None: the stand-in

    @property
    def tag(self) -> str:
        """Marks what depends on the weights, so that stand-in and real results never mix in one --work."""
        return "" if self.pretrained is None else "_pretrained"

    @property
    def photos(self) -> Path:
        return self.root / f"photos_{self.settings.photos}"

    @property
    def dataset(self) -> Path:
        return self.root / f"dataset_{self.settings.photos}"

    @property
    def checkpoint(self) -> Path:
        return self.pretrained or self.root / "pretrained" / "inception_v3.ckpt"

    @property
    def run(self) -> Path:
        return self.root / f"run_logits{self.tag}"

    def model(self, precision: str) -> Path:
        return self.root / f"model_{precision}{self.tag}.pb"


# ------------------------------------------------------------------------------------------- measuring


def _peak_memory_mb(children: bool = False) -> float:
    """This process's peak resident memory (or its largest child's), in MiB; Linux reports KiB."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return round(resource.getrusage(who).ru_maxrss / 1024, 1)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _Clock:
    """Wall and process CPU time of a block; ``utilisation`` is CPU time over wall time times the cores.

    On a quiet machine a compute-bound stage runs near 1.0; well below it means waiting (for input, for a
    lock) or, on a busy machine, other processes holding the cores.
    """

    def __enter__(self) -> "_Clock":
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc_info) -> None:
        self.seconds = time.perf_counter() - self._wall
        self.utilisation = (time.process_time() - self._cpu) / (self.seconds * _cores())


def _rate(images: int, clock: _Clock) -> dict:
    return {"images_per_second": round(images / clock.seconds, 2), "cpu_utilisation": round(clock.utilisation, 2)}


def _run_steps(session, fetches, steps: int, feed: dict | None = None) -> list[float]:
    """Runs the steps; returns each one's wall seconds."""
    seconds = []
    for _ in range(steps):
        started = time.perf_counter()
        session.run(fetches, feed)
        seconds.append(round(time.perf_counter() - started, 3))
    return seconds


def _records_and_memory(session, fetches, image_tensor, label_tensor, settings: Settings, steps: int) -> dict:
    """Steps a graph from its TFRecord reader and from one batch fed in place of the reader's output, in turns.

    Feeding the reader's output tensors cuts the reader out of the step: the same graph and session run,
    with the input pipeline idle (the feed copies the batch each step, 34 MB at 32 images, about 1% of a
    step). After untimed steps from memory (TensorFlow optimises the graph anew for each input), the two
    alternate in ``settings.blocks`` pairs of blocks of about ``steps / blocks`` timed steps, TFRecords
    first. Every TFRecord block opens with ``settings.warmup`` untimed steps: the first block's optimise the
    graph, the others' use up what the reader buffered while the memory block ran, so that every timed step
    from TFRecords waits on the reader as a long run does.

    This machine has slow stretches, one step to half a minute long, that leave CPU use as it was (see the
    README). Each rate is therefore the median of its blocks' rates, and TFRecords ÷ memory the median of the
    ratios within each pair: a stretch that spans a whole pair slows both of its blocks alike, and one that
    slows a single block is outvoted. With one pair (--quick) they are the plain figures.
    """
    inputs = [t for t in (image_tensor, label_tensor) if t is not None]
    feed = dict(zip(inputs, session.run(inputs)))
    batch = len(feed[image_tensor])
    with _Clock() as memory_warmup:
        _run_steps(session, fetches, settings.warmup, feed)
    blocks = min(settings.blocks, steps)  # never an empty block
    sizes = [steps // blocks + (i < steps % blocks) for i in range(blocks)]
    clocks: dict[str, list[_Clock]] = {"tfrecords": [], "memory": []}
    step_seconds: dict[str, list[list[float]]] = {"tfrecords": [], "memory": []}
    records_warmup = []
    for size in sizes:
        with _Clock() as untimed:
            _run_steps(session, fetches, settings.warmup)
        records_warmup.append(untimed.seconds)
        for phase, phase_feed in (("tfrecords", None), ("memory", feed)):
            with _Clock() as clock:
                step_seconds[phase].append(_run_steps(session, fetches, size, phase_feed))
            clocks[phase].append(clock)

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
        # Untimed steps: the first from memory and the first block's from TFRecords optimise the graph, the
        # start-up a run pays once per input; the later TFRecord blocks' take up what the reader buffered.
        "warmup_seconds": {"tfrecords": round(records_warmup[0], 1), "memory": round(memory_warmup.seconds, 1)},
        "drain_seconds": round(sum(records_warmup[1:]), 1),
        # Each timed step, block by block: whether a slow block was slow throughout or held up by a few steps.
        "step_seconds": step_seconds,
    }


class _closing:
    """Closes a session on leaving the block and times it (``seconds``), the end a run pays for.

    Closing destroys the input pipeline's iterator; with tf.data's autotuning on, that waited 12 to 23 s for the
    autotuning thread in 3 runs of 8 (see ``finetune.dataset.pipeline_options``), so the figure is kept.
    """

    def __init__(self, session) -> None:
        self._session, self.seconds = session, 0.0

    def __enter__(self) -> "_closing":
        return self

    def __exit__(self, *exc_info) -> None:
        started = time.perf_counter()
        self._session.close()
        self.seconds = round(time.perf_counter() - started, 2)


def _reader_outputs(graph):
    """The image and label tensors of a graph's first tf.data iterator (the training or eval reader)."""
    get_next = next(op for op in graph.get_operations() if op.type == "IteratorGetNext")
    image = next(t for t in get_next.outputs if t.shape.rank == 4)
    label = next((t for t in get_next.outputs if t.dtype.name == "int64"), None)
    return image, label


# ------------------------------------------------------------------------------------------------ stages


def stage_prepare(work: Work) -> dict:
    """Generates the photos and the stand-in checkpoint (reused when --work already has them), counts FLOPs.

    Untimed. The stand-in's calibration runs in a forked child while this process makes the photos and then
    counts the network's FLOPs, which takes less time than the stand-in does.
    """
    import multiprocessing

    from finetune.synthetic import make_image_folder, write_standin_checkpoint

    standin = None
    if work.pretrained is None and not work.checkpoint.exists():
        standin = multiprocessing.get_context("fork").Process(target=write_standin_checkpoint,
                                                               args=(work.checkpoint,), kwargs={"seed": 0})  # fmt: skip
        standin.start()
    if not (work.photos / ".complete").exists():
        shutil.rmtree(work.photos, ignore_errors=True)
        # Photo-sized clean JPEGs (no PNG to convert), 240 to 500 pixels a side like the flowers photos.
        make_image_folder(work.photos, num_classes=CLASSES, images_per_class=work.settings.photos // CLASSES,
                          seed=0, min_side=240, max_side=500, png_fraction=0.0, jpeg_quality=90)  # fmt: skip
        (work.photos / ".complete").write_text("")
    flops = _count_flops()
    if standin is not None:
        standin.join()
        if standin.exitcode != 0:
            raise RuntimeError(f"writing the stand-in checkpoint failed (exit {standin.exitcode})")
    files = [p for p in work.photos.rglob("*.jpg")]
    return {"photos": len(files), "mean_jpeg_kb": round(sum(p.stat().st_size for p in files) / len(files) / 1024, 1),
            "gflop_per_image_by_block": flops}  # fmt: skip


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
            with tf.compat.v1.Session(config=_session_config()) as session:
                session.run(tf.compat.v1.global_variables_initializer())
                _run_steps(session, product, work.settings.warmup)
                with _Clock() as clock:
                    steps = _run_steps(session, product, work.settings.matmuls)
        flops = 2 * n**3 * work.settings.matmuls
        results[dtype.name] = {"gflops": round(flops / clock.seconds / 1e9, 1),
                               "cpu_utilisation": round(clock.utilisation, 2), "step_seconds": steps}  # fmt: skip
    return results


def stage_build_dataset(work: Work) -> dict:
    from finetune.config import BuildDatasetConfig
    from finetune.dataset import build_dataset

    config = BuildDatasetConfig(image_dir=str(work.photos), out=str(work.dataset),
                                validation_fraction=VALIDATION_FRACTION, overwrite=True)  # fmt: skip
    with _Clock() as clock:
        result = build_dataset(config)
    return {
        **_rate(result.files_seen, clock),
        "workers": _cores(),
        "split_counts": result.split_counts,
        "peak_memory_workers_mb": _peak_memory_mb(children=True),
    }


def stage_input_pipeline(work: Work) -> dict:
    """The training reader alone: records read, decoded and preprocessed into batches, no model."""
    from finetune.compat import tf
    from finetune.dataset import load_dataset, read_dataset

    info = load_dataset(work.dataset)
    results = {}
    for name, augment in (("train_transform", True), ("eval_transform", False)):
        with tf.Graph().as_default():
            batches = read_dataset(info, "train", batch_size=BATCH, image_size=IMAGE_SIZE, training=True,
                                   augment=augment, repeat=True, seed=0)  # fmt: skip
            images = tf.compat.v1.data.make_one_shot_iterator(batches).get_next()["image"]
            # Fetching a batch copies 34 MB into Python; fetch one number of it so the figure is the reader's.
            fetch = images[0, 0, 0, 0]
            with tf.compat.v1.Session(config=_session_config()) as session:
                _run_steps(session, fetch, work.settings.warmup)
                with _Clock() as clock:
                    _run_steps(session, fetch, work.settings.pipeline_batches)
        results[name] = _rate(work.settings.pipeline_batches * BATCH, clock)
    return results


def _forward(work: Work, precision: str) -> dict:
    from finetune import model
    from finetune import precision as precisions
    from finetune.compat import tf
    from finetune.dataset import load_dataset, read_dataset

    info = load_dataset(work.dataset)
    compute = precisions.resolve(precision)
    with tf.Graph().as_default() as graph:
        batches = read_dataset(info, "train", batch_size=work.settings.forward_batch, image_size=IMAGE_SIZE,
                               training=False, shuffle=False, repeat=True, drop_remainder=True)  # fmt: skip
        batch = tf.compat.v1.data.make_one_shot_iterator(batches).get_next()
        net = model.build(batch["image"], CLASSES, compute_dtype=compute.dtype)
        variables = model.variables_to_restore(model.HEAD_SCOPES)
        session = tf.compat.v1.Session(config=_session_config())
        with _closing(session) as closed:
            model.initialise_all_but(session, variables)
            model.restore(session, variables, model.open_checkpoint(work.checkpoint))
            image, _ = _reader_outputs(graph)
            result = _records_and_memory(session, net.probabilities, image, None, work.settings,
                                          work.settings.forward_steps)  # fmt: skip
    return {**result, "close_seconds": closed.seconds}


def stage_forward(work: Work) -> dict:
    return _forward(work, "fp32")


def stage_forward_bf16(work: Work) -> dict:
    return _forward(work, "bf16")


def _count_flops() -> dict:
    """2 x multiply-adds of every convolution at 299, per image, by block (the aux head built too)."""
    from finetune import model
    from finetune.compat import tf

    by_block: dict[str, float] = {}
    with tf.Graph().as_default() as graph:
        images = tf.zeros([1, IMAGE_SIZE, IMAGE_SIZE, 3])
        model.build(images, CLASSES, train_scopes=model.PRESETS["all"])
        for op in graph.get_operations():
            if op.type != "Conv2D":
                continue
            _, height, width, _ = op.outputs[0].shape.as_list()
            kernel_height, kernel_width, inputs, outputs = op.inputs[1].shape.as_list()
            block = model.scope_of(op.name.replace(f"{model.ROOT}/{model.ROOT}/", f"{model.ROOT}/"))
            flops = 2.0 * height * width * kernel_height * kernel_width * inputs * outputs
            by_block[block] = by_block.get(block, 0.0) + flops
    return {block: round(flops / 1e9, 4) for block, flops in by_block.items()}


def _train(work: Work, preset: str, precision: str) -> dict:
    """The training graph `finetune train` builds, stepped from TFRecords and then from memory."""
    from finetune import graph, model
    from finetune.compat import tf
    from finetune.config import TrainConfig
    from finetune.plan import plan_training

    config = TrainConfig(dataset=str(work.dataset), train_dir=str(work.root / f"bench_{preset}_{precision}"),
                         checkpoint=str(work.checkpoint), trainable=preset, batch_size=work.settings.train_batch,
                         image_size=IMAGE_SIZE, steps=10**6, eval_every=0, precision=precision,
                         feature_cache="off")  # the network path: what a training step costs  # fmt: skip
    plan = plan_training(config)
    built = graph.build_training_graph(plan, start_step=0)
    fetches = [built.train_op, built.loss, built.accuracy, built.learning_rate]  # what the trainer fetches
    with built.graph.as_default():
        session = tf.compat.v1.Session(config=graph.session_config(plan))
        with _closing(session) as closed:
            graph.start_fresh(session, built, model.open_checkpoint(work.checkpoint))
            image, label = _reader_outputs(built.graph)
            steps = work.settings.train_steps[preset]
            result = _records_and_memory(session, fetches, image, label, work.settings, steps)
    result.update(close_seconds=closed.seconds, trainable_scopes=list(plan.trainable_scopes),
                  augment=plan.augment, compute_dtype=plan.compute_dtype)  # fmt: skip
    return result


def stage_train_logits(work: Work) -> dict:
    return _train(work, "logits", "fp32")


def stage_train_mixed_7(work: Work) -> dict:
    return _train(work, "mixed_7", "fp32")


def stage_train_all(work: Work) -> dict:
    return _train(work, "all", "fp32")


def stage_train_all_bf16(work: Work) -> dict:
    return _train(work, "all", "bf16")


def stage_finetune(work: Work) -> dict:
    """`finetune train` on the head, then `finetune export` at fp32 and bf16, as a user runs them.

    The run and the two .pb files are what the predict and agreement stages use.
    """
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


def _predict(work: Work, precision: str) -> dict:
    """Files through the .pb in batches of 32, as `finetune predict` reads and runs them."""
    from finetune.predict import Predictor, find_images

    files = [path for path, _ in find_images((str(work.photos),))][: work.settings.predict_images]
    predictor = Predictor(work.model(precision))
    try:
        first = [path.read_bytes() for path in files[:BATCH]]
        for _ in range(work.settings.warmup):
            predictor.run(first)
        with _Clock() as clock:
            for start in range(0, len(files), BATCH):
                predictor.run([path.read_bytes() for path in files[start:start + BATCH]])
    finally:
        predictor.close()
    return _rate(len(files), clock)


def stage_predict(work: Work) -> dict:
    return _predict(work, "fp32")


def stage_predict_bf16(work: Work) -> dict:
    return _predict(work, "bf16")


def _validation_outputs(work: Work, info, compute_dtype: str, rounded: bool) -> dict:
    """The run's newest checkpoint through the eval graph `finetune evaluate` builds, on the validation split.

    Returns paths, labels, probabilities, features (the final pool) and images/s. ``rounded`` rounds the
    images to bfloat16 before an otherwise unchanged graph: the agreement stage's control.
    """
    from finetune import evaluate, model
    from finetune.compat import tf

    classes = len(info.classes)
    _, restore = evaluate.checkpoint_source(tf.train.latest_checkpoint(str(work.run)), classes, compute_dtype)

    def outputs(images):
        # predict_split fetches one tensor a batch: the probabilities and the features side by side.
        images = tf.cast(tf.cast(images, tf.bfloat16), tf.float32) if rounded else images
        net = model.build(images, classes, compute_dtype=compute_dtype)
        return tf.concat([net.probabilities, net.features], axis=1)

    values, labels, paths, seconds = evaluate.predict_split(info, "validation", BATCH, IMAGE_SIZE, outputs, restore)
    return {"paths": paths, "labels": labels, "probabilities": values[:, :classes],
            "features": values[:, classes:], "images_per_second": len(labels) / seconds}  # fmt: skip


def stage_agreement(work: Work) -> dict:
    """The eval graph at fp32 and at bf16 on the validation split: how often top-1 agrees, and a control.

    The control runs fp32 throughout on images rounded to bfloat16 first: a change of at most 0.4% of a
    pixel, less than one step of an 8-bit JPEG, and the first of the thousands of roundings bf16 makes. How
    often it alone flips fp32's top-1, and how far it moves the features against how far bf16 moves them,
    say how much the network itself amplifies small changes of its input. The stand-in checkpoint's random
    weights amplify them block by block.
    """
    from finetune.dataset import load_dataset

    info = load_dataset(work.dataset)
    runs = {name: _validation_outputs(work, info, dtype, rounded)
            for name, dtype, rounded in (("fp32", "float32", False), ("bf16", "bfloat16", False),
                                         ("control", "float32", True))}  # fmt: skip
    fp32 = runs["fp32"]
    assert all(run["paths"] == fp32["paths"] for run in runs.values()), "the reader's order changed between runs"
    predicted = {name: run["probabilities"].argmax(axis=1) for name, run in runs.items()}
    same = predicted["bf16"] == predicted["fp32"]
    rows = np.arange(len(same))

    def confidence(name: str):
        return runs[name]["probabilities"][rows, predicted[name]]

    def agreement(name: str) -> float:
        return round(float((predicted[name] == predicted["fp32"]).mean()), 4)

    def feature_change(name: str) -> float:
        change = np.linalg.norm(runs[name]["features"] - fp32["features"]) / np.linalg.norm(fp32["features"])
        return round(float(change), 4)

    # A flip between two classes the fp32 model all but ties on says little about bf16; show how close.
    flips = [{"path": fp32["paths"][i],
              "fp32": [info.classes[predicted["fp32"][i]], round(float(confidence("fp32")[i]), 4)],
              "bf16": [info.classes[predicted["bf16"][i]], round(float(confidence("bf16")[i]), 4)]}
             for i in np.flatnonzero(~same)]  # fmt: skip
    differences = np.abs(confidence("fp32") - confidence("bf16"))[same]
    return {
        "examples": len(same),
        "top1_agreement": agreement("bf16"),
        "control_top1_agreement": agreement("control"),
        "feature_change_bf16": feature_change("bf16"),
        "feature_change_control": feature_change("control"),
        "max_confidence_difference_where_agreeing": round(float(differences.max(initial=0.0)), 4),
        "disagreements": flips[:10],
        **{f"top1_{p}": round(float((predicted[p] == fp32["labels"]).mean()), 4) for p in ("fp32", "bf16")},
        **{f"evaluate_images_per_second_{p}": round(runs[p]["images_per_second"], 2) for p in ("fp32", "bf16")},
    }


STAGES: dict[str, Callable[[Work], dict]] = {
    "prepare": stage_prepare,
    "ceiling": stage_ceiling,
    "build_dataset": stage_build_dataset,
    "input_pipeline": stage_input_pipeline,
    "forward": stage_forward,
    "forward_bf16": stage_forward_bf16,
    "train_logits": stage_train_logits,
    "train_mixed_7": stage_train_mixed_7,
    "train_all": stage_train_all,
    "train_all_bf16": stage_train_all_bf16,
    "finetune": stage_finetune,
    "predict": stage_predict,
    "predict_bf16": stage_predict_bf16,
    "agreement": stage_agreement,
}


def _session_config():
    """The session settings `finetune evaluate` and `predict` use, so that the figures are theirs."""
    from finetune.runtime import session_config

    return session_config()


# ------------------------------------------------------------------------------------------------ summary


def _training_gflop(flops: dict, scopes: list[str]) -> float:
    """Per image: the forward, the aux head when trained, twice the forward of every trained block."""
    from finetune import model

    forward = sum(f for block, f in flops.items() if block != model.AUX_SCOPE)
    trained = sum(f for block, f in flops.items() if model.in_scopes(block, scopes))
    aux = flops.get(model.AUX_SCOPE, 0.0) if model.in_scopes(model.AUX_SCOPE, scopes) else 0.0
    return forward + aux + 2 * trained


def summarise(stages: dict) -> dict:
    """The figures the issue asks for, derived from the stages' raw results, with the goals they meet."""
    ceiling = {"fp32": stages["ceiling"]["float32"]["gflops"], "bf16": stages["ceiling"]["bfloat16"]["gflops"]}
    flops = stages["prepare"]["gflop_per_image_by_block"]
    forward_gflop = sum(f for block, f in flops.items() if not block.endswith("AuxLogits"))

    def share(images_per_second: float, gflop: float, precision: str) -> float:
        return round(images_per_second * gflop / ceiling[precision], 3)

    summary: dict = {
        "ceiling_gflops": ceiling,
        "forward_gflop_per_image_counted": round(forward_gflop, 2),
        "build_dataset_images_per_second": stages["build_dataset"]["images_per_second"],
        "input_pipeline_images_per_second": {k: stages["input_pipeline"][k]["images_per_second"]
                                             for k in ("train_transform", "eval_transform")},
    }
    for name, precision in (("forward", "fp32"), ("forward_bf16", "bf16")):
        stage = stages[name]
        summary[name] = {
            "images_per_second": stage["memory"]["images_per_second"],
            "images_per_second_from_tfrecords": stage["tfrecords"]["images_per_second"],
            "vs_ceiling": share(stage["memory"]["images_per_second"], ISSUE_FORWARD_GFLOP, precision),
            "tfrecords_vs_memory": stage["tfrecords_vs_memory"],
        }
    for name in ("train_logits", "train_mixed_7", "train_all", "train_all_bf16"):
        stage = stages[name]
        precision = "bf16" if name.endswith("bf16") else "fp32"
        gflop = _training_gflop(flops, stage["trainable_scopes"]) * ISSUE_FORWARD_GFLOP / forward_gflop
        summary[name] = {
            "images_per_second": stage["tfrecords"]["images_per_second"],
            "images_per_second_from_memory": stage["memory"]["images_per_second"],
            "gflop_per_image": round(gflop, 1),
            "vs_ceiling": share(stage["tfrecords"]["images_per_second"], gflop, precision),
            "tfrecords_vs_memory": stage["tfrecords_vs_memory"],
        }
    summary["predict_images_per_second"] = {"fp32": stages["predict"]["images_per_second"],
                                            "bf16": stages["predict_bf16"]["images_per_second"]}  # fmt: skip
    summary["bf16_speedup"] = {
        name: round(summary[f"{name}_bf16"]["images_per_second"] / summary[name]["images_per_second"], 2)
        for name in ("forward", "train_all")
    }
    summary["bf16_speedup"]["predict"] = round(
        stages["predict_bf16"]["images_per_second"] / stages["predict"]["images_per_second"], 2
    )
    summary["bf16_top1_agreement"] = stages["agreement"]["top1_agreement"]
    summary["peak_memory_mb"] = {name: stage["peak_memory_mb"] for name, stage in stages.items() if name != "prepare"}
    summary["peak_memory_mb"]["build_dataset_each_worker"] = stages["build_dataset"]["peak_memory_workers_mb"]
    fed = ("forward", "train_logits", "train_mixed_7", "train_all")
    worst_input = min(summary[name]["tfrecords_vs_memory"] for name in fed)
    measured = {
        "forward_vs_ceiling": summary["forward"]["vs_ceiling"],
        "train_all_vs_ceiling": summary["train_all"]["vs_ceiling"],
        "bf16_speedup": min(summary["bf16_speedup"]["forward"], summary["bf16_speedup"]["train_all"]),
        "bf16_top1_agreement": summary["bf16_top1_agreement"],
        "build_dataset_images_per_second": summary["build_dataset_images_per_second"],
        "tfrecords_vs_memory": worst_input,
    }
    summary["goals"] = {k: {"measured": v, "goal": GOALS[k], "met": v >= GOALS[k]} for k, v in measured.items()}
    return summary


def table(report: dict) -> str:
    """The Markdown tables of the README: one row per figure, then the issue's goals."""
    s, stages = report["summary"], report["stages"]

    def gb(*names: str) -> str:
        return " / ".join(f"{stages[name]['peak_memory_mb'] / 1024:.1f}" for name in names)

    def pct(value: float) -> str:
        return f"{100 * value:.0f}%"

    def use(*parts: dict) -> str:
        return " / ".join(f"{part['cpu_utilisation']:.2f}" for part in parts)

    ceiling, pipeline, build = stages["ceiling"], stages["input_pipeline"], stages["build_dataset"]
    rows = [
        ("matmul 4096x4096, fp32 / bf16", f"{s['ceiling_gflops']['fp32']:.0f} / {s['ceiling_gflops']['bf16']:.0f} "
         "GFLOP/s", "(the ceiling)", "", use(ceiling["float32"], ceiling["bfloat16"]), gb("ceiling")),
        (f"build-dataset, clean JPEGs, {build['workers']} workers", f"{build['images_per_second']:.0f} images/s", "",
         "", "", f"{build['peak_memory_mb'] / 1024:.1f} + {build['peak_memory_workers_mb'] / 1024:.1f} per worker"),
        ("input pipeline alone, train / eval transform", f"{pipeline['train_transform']['images_per_second']:.0f} / "
         f"{pipeline['eval_transform']['images_per_second']:.0f} images/s", "", "",
         use(pipeline["train_transform"], pipeline["eval_transform"]), gb("input_pipeline")),
    ]
    labels = {
        "forward": "forward (eval graph), fp32", "forward_bf16": "forward (eval graph), bf16",
        "train_logits": "train `logits`, fp32", "train_mixed_7": "train `mixed_7`, fp32",
        "train_all": "train `all`, fp32", "train_all_bf16": "train `all`, bf16",
    }  # fmt: skip
    for name, label in labels.items():
        row, stage = s[name], stages[name]
        if name.startswith("train"):
            label += f", {row['gflop_per_image']:.0f} GFLOP/image"
        batch = stage.get("batch_size", BATCH)  # results from before the field were all at BATCH
        label += f", batch {batch}" if batch != BATCH else ""
        rates = f"{stage['tfrecords']['images_per_second']:.1f} / {stage['memory']['images_per_second']:.1f}"
        rows.append((label, f"{rates} images/s", pct(row["vs_ceiling"]), pct(row["tfrecords_vs_memory"]),
                     use(stage["tfrecords"], stage["memory"]), gb(name)))  # fmt: skip
    rows.append(("predict from the .pb, fp32 / bf16", f"{stages['predict']['images_per_second']:.1f} / "
                 f"{stages['predict_bf16']['images_per_second']:.1f} images/s", "", "",
                 use(stages["predict"], stages["predict_bf16"]), gb("predict", "predict_bf16")))  # fmt: skip
    speedup, agreement = s["bf16_speedup"], stages["agreement"]
    rows.append(("bf16 over fp32: forward / train `all` / predict",
                 f"{speedup['forward']:.2f}x / {speedup['train_all']:.2f}x / {speedup['predict']:.2f}x", "", "", "",
                 ""))  # fmt: skip
    agrees = (f"top-1 agrees on {pct(agreement['top1_agreement'])} of {agreement['examples']}; control, fp32 on "
              f"images rounded to bf16: {pct(agreement['control_top1_agreement'])}; the features move "
              f"{pct(agreement['feature_change_bf16'])} under bf16, {pct(agreement['feature_change_control'])} "
              "under the control")
    rows.append(("bf16 vs fp32, the eval graph on the validation split", agrees, "", "", "", gb("agreement")))
    header = ("stage (299x299, batch 32)", "result (from TFRecords / from memory)", "of the ceiling",
              "TFRecords ÷ memory", "CPU use", "peak RSS, GB")  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "| goal | measured | met |", "|---|---|---|"]
    lines += [f"| {name} at least {goal['goal']:g} | {goal['measured']:g} | {'yes' if goal['met'] else 'no'} |"
              for name, goal in s["goals"].items()]  # fmt: skip
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- running


def _import_everything() -> np.ndarray:
    """Imports TensorFlow and finetune once, in the parent, so that no stage's process spends 4 s on it.

    Importing creates no TensorFlow thread pool, session or device (those come with the first session), so
    forking after it is safe. The one extra thread at this point is OpenBLAS's (numpy's), which re-creates
    its threads in a forked child. Returns the addresses of the file-backed pages now resident (see
    ``_run_stage``).
    """
    import importlib

    from finetune.cli import configure_logging

    for module in ("compat", "dataset", "evaluate", "export", "predict", "synthetic", "train"):
        importlib.import_module(f"finetune.{module}")

    configure_logging(0)  # finetune's progress and warnings on stderr, as the CLI shows them
    return _resident_file_pages()


def _resident_file_pages() -> np.ndarray:
    """The address of every readable file-backed page (libraries, mostly) in this process's page tables.

    Empty where /proc cannot tell (not Linux): the stages' peaks then leave out the libraries' pages.
    """
    size = os.sysconf("SC_PAGE_SIZE")
    pages = [np.zeros(0, np.uint64)]
    try:
        with open("/proc/self/maps") as maps, open("/proc/self/pagemap", "rb") as pagemap:
            for line in maps:
                fields = line.split()
                if len(fields) < 6 or not fields[5].startswith("/") or not fields[1].startswith("r"):
                    continue
                start, end = (int(address, 16) for address in fields[0].split("-"))
                pagemap.seek(start // size * 8)
                entries = np.frombuffer(pagemap.read((end - start) // size * 8), dtype="<u8")
                present = np.flatnonzero(entries >> np.uint64(63)).astype(np.uint64)  # bit 63: present
                pages.append(np.uint64(start) + np.uint64(size) * present)
    except OSError:
        pass
    return np.concatenate(pages)


def _run_stage(name: str, work: Work, pages: np.ndarray, verbose: bool) -> dict:
    """Runs one stage in a child process forked from this one, and returns its JSON result.

    A child of its own gives each stage its own peak resident memory, never what an earlier stage left
    behind, and it starts with TensorFlow imported. Its peak counts what a fresh ``finetune`` process would:
    a fork copies no page-table entries for file-backed mappings, so the child first reads one byte of each
    library page resident in the parent (``pages``, about 370 MB, 0.15 s), or its figure would be that much
    lower. Without --verbose the child's stderr (TensorFlow's C++ log lines too) goes to a file, whose tail
    is shown if the stage fails.
    """
    started = time.monotonic()
    with tempfile.TemporaryFile() as log:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: run the stage, send its JSON, never return into the parent's code
            status = 1
            try:
                os.close(read_end)
                if not verbose:
                    os.dup2(log.fileno(), 2)
                for address in pages.tolist():
                    ctypes.string_at(address, 1)
                result = STAGES[name](work)
                result["peak_memory_mb"] = _peak_memory_mb()
                result["stage_seconds"] = round(time.monotonic() - started, 1)  # graphs built, steps, all
                with os.fdopen(write_end, "w") as pipe:
                    pipe.write(json.dumps(result))
                status = 0
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(status)
        os.close(write_end)
        with os.fdopen(read_end) as pipe:
            output = pipe.read()
        _, status = os.waitpid(pid, 0)
        if status != 0 or not output:
            log.seek(0)
            tail = log.read().decode("utf-8", "replace").strip().splitlines()[-15:]
            code = os.waitstatus_to_exitcode(status)
            raise SystemExit("\n".join([f"error: stage {name} failed (exit {code})"] + tail))
    print(f"{name}: done in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return json.loads(output)


def _pretrained(path: str) -> Path:
    """--checkpoint as the prefix TensorFlow reads, checked before any stage runs."""
    from finetune import model
    from finetune.errors import FinetuneError

    try:
        return Path(model.open_checkpoint(path).path).resolve()
    except FinetuneError as error:
        raise SystemExit(f"error: {error}") from None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer images and steps, smaller batches, same fields (about 2 minutes, not 11 1/2)")
    parser.add_argument("--table", action="store_true", help="print the Markdown table on stdout, not the JSON")
    parser.add_argument("--work", help="folder for the photos, dataset and models (default: a temporary one)")
    parser.add_argument("--checkpoint", help="the pretrained checkpoint to use (default: a generated stand-in)")
    parser.add_argument("--stages", nargs="+", choices=list(STAGES),
                        help="run only these; the summary takes the others from an earlier run in --work")
    parser.add_argument("-v", "--verbose", action="store_true", help="show each stage's own log lines")
    args = parser.parse_args()
    started = time.monotonic()
    pages = _import_everything()
    pretrained = _pretrained(args.checkpoint) if args.checkpoint else None
    root = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="finetune-benchmark-"))
    try:
        return _report(args, Work(root, QUICK if args.quick else FULL, pretrained), pages, started)
    finally:
        if not args.work:
            shutil.rmtree(root, ignore_errors=True)


def _report(args: argparse.Namespace, work: Work, pages: np.ndarray, started: float) -> int:
    """Runs the stages asked for, then prints the report from every stage's newest result in --work."""
    # Each stage's result is kept, so that --stages can rerun some and summarise with the others.
    results = work.root / (("results-quick" if args.quick else "results-full") + work.tag.replace("_", "-"))
    results.mkdir(parents=True, exist_ok=True)
    for name in args.stages or STAGES:
        (results / f"{name}.json").write_text(json.dumps(_run_stage(name, work, pages, args.verbose)))
    stages = {name: json.loads((results / f"{name}.json").read_text())
              for name in STAGES if (results / f"{name}.json").exists()}  # fmt: skip
    from finetune.precision import cpu_has_bf16

    report = {
        "command": " ".join(["python", "scripts/benchmark.py"] + sys.argv[1:]),
        "quick": args.quick,
        "cores": _cores(),
        "cpu_has_bf16": cpu_has_bf16(),
        "checkpoint": str(work.pretrained or "stand-in (finetune.synthetic, random weights)"),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "seconds": round(time.monotonic() - started, 1),
        "stages": stages,
    }
    if "gflop_per_image_by_block" not in stages.get("prepare", {}):
        stages.pop("prepare", None)  # kept from before prepare counted the FLOPs: rerun it
    missing = [name for name in STAGES if name not in stages]
    if missing:
        report["summary"] = f"needs the results of {', '.join(missing)}"
        print(json.dumps(report, indent=1))
        return 0
    report["summary"] = summarise(stages)
    text = table(report)
    print(text if args.table else json.dumps(report, indent=1))
    if not args.table:
        print(text, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
