"""The tf-slim patches: each patched path runs on TF 2.21, and only finetune.compat imports tf_slim."""

from __future__ import annotations

import ast
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from finetune.compat import slim, tf

PACKAGE = Path(__file__).resolve().parents[1] / "finetune"


def _run(fetches, feed=None):
    with tf.compat.v1.Session() as session:
        session.run(tf.compat.v1.global_variables_initializer())
        return session.run(fetches, feed)


def test_only_compat_imports_tf_slim():
    importers = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(name == "tf_slim" or name.startswith("tf_slim.") for name in names):
                importers.append(path.name)
    assert sorted(set(importers)) == ["compat.py"]


def test_batch_norm_with_a_python_bool_builds_on_the_fused_path():
    # ops.Tensor: slim's constant_value runs inside every batch norm.
    with tf.Graph().as_default():
        x = tf.random.stateless_normal([8, 4, 4, 3], seed=[1, 2]) * 3 + 5
        y = slim.batch_norm(x, is_training=True, updates_collections="custom_updates")
        out = _run(y)
        assert len(tf.compat.v1.get_collection("custom_updates")) == 2
    assert abs(out.mean()) < 1e-3 and abs(out.std() - 1) < 1e-2


def test_batch_norm_with_a_tensor_is_training_uses_cond():
    # control_flow_ops.cond: slim's smart_cond when the predicate is not a Python value.
    with tf.Graph().as_default():
        training = tf.compat.v1.placeholder(tf.bool, [])
        x = tf.random.stateless_normal([8, 4, 4, 3], seed=[1, 2]) * 3 + 5
        y = slim.batch_norm(x, is_training=training, updates_collections="custom_updates")
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            batch_stats = session.run(y, {training: True})
            moving_stats = session.run(y, {training: False})
    assert abs(batch_stats.mean()) < 1e-3  # normalised with the batch's own mean
    assert moving_stats.mean() > 4  # moving mean 0, variance 1: the input passes nearly unchanged


def _example(encoded: bytes, fmt: bytes, height: int, width: int) -> bytes:
    feature = {
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded])),
        "image/format": tf.train.Feature(bytes_list=tf.train.BytesList(value=[fmt])),
        "image/height": tf.train.Feature(int64_list=tf.train.Int64List(value=[height])),
        "image/width": tf.train.Feature(int64_list=tf.train.Int64List(value=[width])),
        "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[3])),
        "label/rows": tf.train.Feature(int64_list=tf.train.Int64List(value=[1])),
        "label/cols": tf.train.Feature(int64_list=tf.train.Int64List(value=[1])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_slim_tfexample_decoder_reads_slim_style_records(fmt):
    # control_flow_ops.case and .cond (Image handler), array_ops.stack (Tensor handler with shape keys).
    from tf_slim.data import tfexample_decoder

    buffer = io.BytesIO()
    Image.new("RGB", (6, 4), (200, 30, 10)).save(buffer, format=fmt)
    keys_to_features = {
        "image/encoded": tf.io.FixedLenFeature((), tf.string),
        "image/format": tf.io.FixedLenFeature((), tf.string),
        "image/height": tf.io.FixedLenFeature([1], tf.int64),
        "image/width": tf.io.FixedLenFeature([1], tf.int64),
        "image/class/label": tf.io.FixedLenFeature([1], tf.int64),
        "label/rows": tf.io.FixedLenFeature([1], tf.int64),
        "label/cols": tf.io.FixedLenFeature([1], tf.int64),
    }
    items = {
        "image": tfexample_decoder.Image(channels=3),
        # Shape keys make the handler stack them into a shape at run time.
        "label": tfexample_decoder.Tensor("image/class/label", shape_keys=["label/rows", "label/cols"]),
    }
    with tf.Graph().as_default():
        decoder = tfexample_decoder.TFExampleDecoder(keys_to_features, items)
        record = _example(buffer.getvalue(), fmt.lower().encode()[:3], 4, 6)
        image, label = decoder.decode(tf.constant(record), ["image", "label"])
        image, label = _run([image, label])
    assert image.shape == (4, 6, 3)
    assert abs(float(image[..., 0].mean()) - 200) < 3
    assert label.tolist() == [[3]]


def test_legacy_fully_connected_on_3d_input_uses_unstack():
    # array_ops.unstack: slim reshapes a rank-3 input through its unstacked shape.
    with tf.Graph().as_default():
        x = tf.ones([2, 3, 4])
        y = slim.legacy_fully_connected(x, 5)
        assert _run(y).shape == (2, 3, 5)


def test_importing_compat_prints_nothing_on_stderr():
    # TensorFlow's import-time C++ lines ignore TF_CPP_MIN_LOG_LEVEL; run without it to prove that.
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "FINETUNE_VERBOSE")}
    result = subprocess.run(
        [sys.executable, "-c", "import finetune.compat; finetune.compat.tf.constant(1)"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_the_faster_eagerness_question_answers_as_tensorflow_does_everywhere():
    from tensorflow.python.framework import ops

    ours = ops.executing_eagerly_outside_functions
    theirs = ours.tensorflow_s
    answers = []

    def both():
        answers.append((ours(), theirs()))
        return tf.constant(0)

    both()  # eager, at the top
    tf.function(both)()  # a function traced from eager
    with tf.Graph().as_default():
        both()  # a graph
        tf.function(both)()  # a function traced inside a graph
        with tf.Graph().as_default():
            both()  # a graph inside a graph
    assert answers == [(True, True), (True, True), (False, False), (False, False), (False, False)]
    # And variables, whose hash asks it, stay hashable in a graph (keras's layers put them in sets).
    with tf.Graph().as_default():
        variable = tf.compat.v1.Variable(1.0)
        assert variable in {variable}


def test_the_class_swap_leaves_the_hierarchy_tensorflow_s_leaves_both_ways_round():
    from tensorflow.python.keras.engine import base_layer, base_layer_v1
    from tensorflow.python.keras.utils import version_utils

    ours = version_utils.swap_class
    theirs = ours.tensorflow_s

    def hierarchy():  # a layer two levels below keras's v2 Layer, as tf-slim's legacy layers are
        middle = type("Middle", (base_layer.Layer,), {})
        return type("Leaf", (middle, version_utils.LayerVersionSelector), {})

    mine, reference = hierarchy(), hierarchy()
    orders = []
    for use_v2 in (False, False, True, True, False):
        got = ours(mine, base_layer.Layer, base_layer_v1.Layer, use_v2)
        expected = theirs(reference, base_layer.Layer, base_layer_v1.Layer, use_v2)
        assert got is mine and expected is reference
        orders.append(([c.__name__ for c in mine.__mro__], [c.__name__ for c in reference.__mro__]))
    assert all(a == b for a, b in orders)
    assert (base_layer_v1.Layer in mine.__mro__) is True  # the last swap, to v1, happened
    # And the conv layer slim builds, constructed in a graph, is a v1 layer.
    from tensorflow.python.layers import convolutional

    with tf.Graph().as_default():
        assert isinstance(convolutional.Conv2D(2, 3), base_layer_v1.Layer)
