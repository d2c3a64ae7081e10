"""TensorFlow and tf-slim, imported once, quietly, with tf-slim 1.1.0 patched to run on TF 2.21.

Every module of the package takes TensorFlow and tf-slim from here:

    from finetune.compat import tf, slim, inception

Nothing else in the package imports ``tf_slim``, so the patches below are in place before tf-slim's first
import (Python runs this module once per process). Each patch restores a name that tf-slim 1.1.0 (2020, the
last release) reads and that TensorFlow has since moved; none changes behaviour. A patch only fills a name
that is missing, so on a TensorFlow that still has it nothing is touched.

One more replaces a function rather than filling a name, for speed alone: ``_faster_graph_building`` answers
the question every variable's hash asks without entering a graph context, with the answer TensorFlow gives.

Not patched, on purpose: ``slim.batch_norm`` with the default ``updates_collections=UPDATE_OPS`` takes a
path through ``tensorflow.python.layers.normalization`` that imports ``tf_keras.legacy_tf_layers``, which no
released tf_keras provides any more. ``finetune.model`` always passes its own collection name, which keeps
batch norm on slim's fused path; there is nothing to patch as long as that holds.
"""

from __future__ import annotations

import os
import sys
import warnings

# Set FINETUNE_VERBOSE=1 (the CLI's -v does) to see TensorFlow's own log lines.
VERBOSE = os.environ.get("FINETUNE_VERBOSE", "") not in ("", "0")


def _import_tensorflow():
    """Imports TensorFlow; unless verbose, without the C++ lines it prints at import.

    TensorFlow prints its oneDNN and CUDA notices to file descriptor 2 before absl logging is set up, so
    TF_CPP_MIN_LOG_LEVEL does not reach them. Pointing descriptor 2 at /dev/null for the import is the
    only way to keep them off the terminal; a Python exception raised by the import still surfaces.
    """
    if VERBOSE:
        import tensorflow

        return tensorflow
    # Level 3 also hides "failed call to cuInit" on machines without a GPU; real failures still raise.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    tensorflow.get_logger().setLevel("ERROR")
    return tensorflow


def _patch_tensorflow_for_tf_slim() -> list[str]:
    """Fills the names tf-slim 1.1.0 reads from TensorFlow modules that TF 2.21 moved. Returns what it set."""
    from tensorflow.python.framework import ops
    from tensorflow.python.framework import tensor
    from tensorflow.python.ops import array_ops, array_ops_stack, control_flow_case, control_flow_ops
    from tensorflow.python.ops import cond

    patches = [
        # `ops.Tensor` became `tensor.Tensor` (TF 2.14). tf-slim's `layers.utils.constant_value` checks
        # `isinstance(x, ops.Tensor)` inside every `slim.batch_norm`, so without it no InceptionV3 builds;
        # `learning.py` and `layers/optimizers.py` read it too. Can go when tf-slim stops naming ops.Tensor.
        (ops, "Tensor", tensor.Tensor),
        # `control_flow_ops.cond` moved to `ops.cond` (TF 2.13). tf-slim's `layers.utils.smart_cond` calls it
        # when `is_training` is a tensor, and `tfexample_decoder.Image` when choosing the JPEG decoder.
        (control_flow_ops, "cond", cond.cond),
        # `control_flow_ops.case` moved to `ops.control_flow_case` (TF 2.13). `tfexample_decoder.Image`
        # calls it to pick a decoder by `image/format`.
        (control_flow_ops, "case", control_flow_case.case),
        # `array_ops.stack` / `unstack` moved to `ops.array_ops_stack` (TF 2.13). `tfexample_decoder.Tensor`
        # stacks shape keys; `legacy_fully_connected` unstacks a shape; several metrics use both.
        (array_ops, "stack", array_ops_stack.stack),
        (array_ops, "unstack", array_ops_stack.unstack),
    ]
    applied = []
    for module, name, value in patches:
        if not hasattr(module, name):
            setattr(module, name, value)
            applied.append(f"{module.__name__}.{name}")
    return applied


def _faster_graph_building() -> None:
    """Answers ``ops.executing_eagerly_outside_functions()`` without entering a context when the answer is
    plain: eager (True), or a graph that is not tracing a function (False). Anything else, TensorFlow's own.

    Keras's legacy layers, which tf-slim's conv layers are, build ``set(tf.compat.v1.global_variables())`` at
    every weight they add, and hashing a variable calls this function, which enters and leaves the outermost
    graph's context (about 0.1 ms) to ask. InceptionV3 adds about 380 weights per copy, so a graph of two
    copies asked it about 110,000 times, a quarter of the time taken to build it (measured: 5.6 s -> 4.1 s
    for a training and a validation copy at 75 px). The shortcut gives the answer TensorFlow's walk gives:
    outside a function the outermost context not building a function is the default graph itself, where
    nothing executes eagerly. tests/test_compat.py compares the two in eager mode, in a graph and in
    functions traced from each.
    """
    from tensorflow.python.eager import context
    from tensorflow.python.framework import ops

    asked = ops.executing_eagerly_outside_functions

    def executing_eagerly_outside_functions() -> bool:
        if context.executing_eagerly():
            return True
        if not ops.get_default_graph().building_function:
            return False
        return asked()

    executing_eagerly_outside_functions.tensorflow_s = asked  # for the test that compares them
    ops.executing_eagerly_outside_functions = executing_eagerly_outside_functions


def _no_needless_class_rebasing() -> None:
    """Keras's legacy layers (tf-slim's conv, pooling and dropout layers) pick their v1 or v2 base class at
    every construction: ``version_utils.swap_class`` walks the layer's bases and assigns ``cls.__bases__`` on
    every class of the way, even when nothing changes. Each assignment makes Python recompute the method order
    of the class and every subclass of it; InceptionV3 constructs 110 such layers per copy, and this took a
    fifth of the time to build one (measured: 2.0 s -> 1.6 s for a copy at 107 px). The replacement makes the
    same choices and assigns only bases that differ: the class hierarchy it leaves is the one TensorFlow's
    leaves. tests/test_compat.py compares the two, both ways round.
    """
    from tensorflow.python.keras.utils import version_utils

    theirs = version_utils.swap_class

    def swap_class(cls, v2_cls, v1_cls, use_v2):
        if cls is object:
            return cls
        if cls in (v2_cls, v1_cls):
            return v2_cls if use_v2 else v1_cls
        wrong = v1_cls if use_v2 else v2_cls
        bases = tuple(swap_class(base, v2_cls, v1_cls, use_v2) if issubclass(base, wrong) else base
                      for base in cls.__bases__)  # fmt: skip
        if bases != cls.__bases__:
            cls.__bases__ = bases
        return cls

    swap_class.tensorflow_s = theirs  # for the test that compares them
    version_utils.swap_class = swap_class


tf = _import_tensorflow()
PATCHES_APPLIED = tuple(_patch_tensorflow_for_tf_slim())
_faster_graph_building()
_no_needless_class_rebasing()

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import tf_slim as slim  # noqa: E402  (after the patches, by design)
    from tf_slim.nets import inception_v3 as inception  # noqa: E402

# tf-slim builds its conv layers through `layer.apply`, which warns once per layer; the user cannot act on it.
warnings.filterwarnings("ignore", message=r"`layer\.apply` is deprecated")

__all__ = ["tf", "slim", "inception", "PATCHES_APPLIED"]
