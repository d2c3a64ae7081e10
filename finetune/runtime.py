"""The settings every finetune session runs with: train, evaluate and predict share them."""

from __future__ import annotations


def session_config(cpu_devices: int = 1):
    """The ConfigProto of a finetune session.

    Soft placement lets an op without a kernel on the chosen device (a bfloat16 op on an older GPU, say)
    run on the CPU instead of failing; GPU memory grows as needed rather than all being taken at start.
    Thread pools keep TensorFlow's defaults, one intra-op and one inter-op thread per core: the input
    pipeline has a pool of its own (finetune.dataset.read_dataset), and one inter-op thread was no faster
    in the benchmark (scripts/benchmark.py).

    On a machine without a GPU, three of Grappler's passes are off: layout (NCHW for cuDNN), the
    implementation selector (cuDNN versions of functions) and the TFG (MLIR) round trips. On finetune's
    graphs they change no node on a CPU (TF_CPP_VMODULE=meta_optimizer=1 reports "(0)" nodes and edges
    changed for each) yet walked every graph a session ran: about 1 s of the 2.8 s Grappler spent in a short
    training run (6 steps at 75 px, Mixed_7c trained, two validation passes); the trained weights come out
    bit for bit the same. The memory pass stays on: on any device it may rewrite large sums to lower the peak
    when a graph's estimated memory nears the device's.

    Args:
        cpu_devices: logical CPU devices to create; more than one only for `train --device cpu:N` towers.
    """
    from finetune.compat import tf

    config = tf.compat.v1.ConfigProto(allow_soft_placement=True, device_count={"CPU": max(1, cpu_devices)})
    config.gpu_options.allow_growth = True
    if not tf.config.list_physical_devices("GPU"):
        rewrite = config.graph_options.rewrite_options
        rewrite.layout_optimizer = rewrite.OFF
        rewrite.implementation_selector = rewrite.OFF
        rewrite.disable_tfg_optimizer = True
    return config
