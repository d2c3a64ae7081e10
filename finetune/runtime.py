"""The settings every finetune session runs with: train, evaluate and predict share them."""

from __future__ import annotations


def session_config(cpu_devices: int = 1):
    """The ConfigProto of a finetune session.

    Soft placement lets an op without a kernel on the chosen device (a bfloat16 op on an older GPU, say)
    run on the CPU instead of failing; GPU memory grows as needed rather than all being taken at start.
    Thread pools keep TensorFlow's defaults, one intra-op and one inter-op thread per core: the input
    pipeline has a pool of its own (finetune.dataset.read_dataset), and one inter-op thread was no faster
    in the benchmark (scripts/benchmark.py).

    Args:
        cpu_devices: logical CPU devices to create; more than one only for `train --device cpu:N` towers.
    """
    from finetune.compat import tf

    config = tf.compat.v1.ConfigProto(allow_soft_placement=True, device_count={"CPU": max(1, cpu_devices)})
    config.gpu_options.allow_growth = True
    return config
