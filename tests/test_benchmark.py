"""scripts/benchmark.py's timing of TFRecords against memory, on a real tf.data reader that counts its batches.

The rest of the benchmark is exercised by running it (see the README); this checks what its figures rest on:
the memory phase reads nothing, every TFRecord block after the first is drained before its clock starts, and
the figures are the medians of the blocks.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path

import pytest

from finetune.compat import tf

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"


@pytest.fixture(scope="module")
def benchmark():
    name = "benchmark_under_test"
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[name]


def _settings(benchmark, blocks: int, warmup: int):
    return benchmark.Settings(photos=0, matmuls=0, pipeline_batches=0, forward_steps=0, forward_batch=1,
                              train_steps={}, blocks=blocks, train_batch=1, warmup=warmup, finetune_steps=0,
                              predict_images=0)  # fmt: skip


@pytest.mark.parametrize("blocks, steps, sizes", [(3, 10, [4, 3, 3]), (1, 2, [2]), (3, 2, [1, 1])])
def test_memory_blocks_read_nothing_and_every_tfrecord_block_is_drained_first(benchmark, blocks, steps, sizes):
    warmup = 2
    with tf.Graph().as_default():
        # Batch i holds the number i; without prefetch or parallel calls the reader makes a batch only when
        # a step asks for one, so the next batch's number is how many were read.
        batches = tf.data.Dataset.range(10**9).map(lambda i: tf.fill([2, 3, 3, 1], tf.cast(i, tf.float32)))
        image = tf.compat.v1.data.make_one_shot_iterator(batches).get_next()
        seen = tf.Variable(-1.0)
        step = seen.assign(tf.reduce_max(image))
        with tf.compat.v1.Session() as session:
            session.run(seen.initializer)
            result = benchmark._records_and_memory(session, step, image, None, _settings(benchmark, blocks, warmup),
                                                   steps)  # fmt: skip
            assert session.run(seen) == 0.0, "the last step was a memory step: it saw the one batch fed, batch 0"
            read = session.run(image)[0, 0, 0, 0]
    # One batch to feed, then per block its untimed steps and its timed ones; the memory steps read none.
    assert read == 1 + len(sizes) * warmup + steps
    assert [len(block) for block in result["step_seconds"]["tfrecords"]] == sizes
    assert [len(block) for block in result["step_seconds"]["memory"]] == sizes
    for phase in ("tfrecords", "memory"):
        block_rates = result[phase]["blocks_images_per_second"]
        assert len(block_rates) == len(sizes)
        assert result[phase]["images_per_second"] == pytest.approx(statistics.median(block_rates), abs=0.01)
    ratios = result["blocks_tfrecords_vs_memory"]
    assert len(ratios) == len(sizes)
    assert result["tfrecords_vs_memory"] == pytest.approx(statistics.median(ratios), abs=1e-3)
    assert result["batch_size"] == 2
