"""The model module: scopes, restore with exclusions, shape checks, and training only the chosen layers."""

from __future__ import annotations

import numpy as np
import pytest

from finetune import model
from finetune.compat import tf
from finetune.errors import CheckpointError, FinetuneError, ScopeError

SIZE = 107  # the smallest size at which slim's aux head exists, so the head presets are complete
BATCH = 4


def _images(seed=0):
    return tf.random.stateless_uniform([BATCH, SIZE, SIZE, 3], seed=[seed, 7], minval=-1, maxval=1)


def _values(session, variables):
    return dict(zip([v.op.name for v in variables], session.run(variables)))


# ---------------------------------------------------------------------------------------------- scopes


def test_presets_resolve_to_block_scopes():
    assert model.resolve_scopes("logits", "--trainable") == ("InceptionV3/Logits", "InceptionV3/AuxLogits")
    mixed_7 = model.resolve_scopes("mixed_7", "--trainable")
    assert mixed_7[2:] == ("InceptionV3/Mixed_7a", "InceptionV3/Mixed_7b", "InceptionV3/Mixed_7c")
    assert len(model.resolve_scopes("mixed_6", "--trainable")) == 2 + 3 + 5
    assert model.resolve_scopes("all", "--trainable") == ("InceptionV3",)


def test_scope_lists_accept_short_and_full_names_without_repeats():
    scopes = model.resolve_scopes("Mixed_7c, InceptionV3/Logits,logits", "--trainable")
    assert scopes == ("InceptionV3/Mixed_7c", "InceptionV3/Logits", "InceptionV3/AuxLogits")
    assert model.resolve_scopes("none", "--exclude") == ()
    assert model.resolve_scopes("", "--exclude") == ()


def test_unknown_scope_error_lists_the_valid_names():
    with pytest.raises(ScopeError) as error:
        model.resolve_scopes("logits,Mixed_9z", "--trainable")
    message = str(error.value)
    assert message.startswith("--trainable: unknown scope 'Mixed_9z'")
    for name in ("logits", "mixed_7", "mixed_6", "all", "Conv2d_1a_3x3", "Mixed_6e", "AuxLogits"):
        assert name in message


def test_in_scopes_matches_whole_path_components():
    assert model.in_scopes("InceptionV3/Mixed_7c/Branch_0/weights", ["InceptionV3/Mixed_7c"])
    assert not model.in_scopes("InceptionV3/Mixed_7cc/weights", ["InceptionV3/Mixed_7c"])


# ------------------------------------------------------------------------------------------ image sizes


def test_image_size_range_is_checked():
    for bad in (74, 331):
        with pytest.raises(FinetuneError, match="--image-size"):
            model.check_image_size(bad)
    assert not model.aux_head_fits(106) and model.aux_head_fits(107) and model.aux_head_fits(299)


def _assert_built_at(net, size, batch):
    assert net.logits.shape.as_list() == [batch, 5]
    assert net.features.shape.as_list() == [batch, model.FEATURE_SIZE]
    assert (net.aux_logits is not None) == model.aux_head_fits(size)


# 75 (the smallest size) and 107 (the smallest with the aux head) are built, with the head trained, and
# checked with _assert_built_at in the checkpoint tests below, which need those graphs anyway.
@pytest.mark.parametrize("size", [106, 330])
def test_network_builds_at_the_edges_of_its_size_range(size):
    with tf.Graph().as_default():
        images = tf.zeros([2, size, size, 3])
        _assert_built_at(model.build(images, 5, train_scopes=model.PRESETS["logits"]), size, 2)


def _variables_as_built(graph) -> list:
    keys = graph.get_all_collection_keys()
    return [(v.op.name, v.shape.as_list(), v.dtype, type(v), {k for k in keys if v in graph.get_collection(k)})
            for v in tf.compat.v1.global_variables()]  # fmt: skip


def test_the_variables_alone_are_the_built_network_s_at_zero():
    # The head trained on cached features holds the network's variables without its layers: the same list
    # (names, shapes, order, kinds, collections) an inference build makes, so its checkpoints are whole.
    with tf.Graph().as_default() as built:
        model.build(tf.zeros([1, 75, 75, 3]), 7)
        expected = _variables_as_built(built)
    with tf.Graph().as_default() as alone:
        model.create_variables(7)
        assert _variables_as_built(alone) == expected and len(expected) == 378
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            values = session.run(tf.compat.v1.global_variables())
    assert all(not value.any() for value in values)


def test_a_build_for_restoring_cannot_hand_out_initial_values_by_mistake(standin_checkpoint):
    # evaluate, export and feature extraction build the network to restore it: a variable they forgot to
    # restore must fail loudly, never compute with random weights.
    with tf.Graph().as_default():
        net = model.build(tf.zeros([1, 75, 75, 3]), 1001, restored=True)
        with tf.compat.v1.Session() as session:
            with pytest.raises(tf.errors.InvalidArgumentError, match="restored_from_checkpoint"):
                session.run(tf.compat.v1.global_variables_initializer())
            model.restore(session, model.model_variables(), model.open_checkpoint(standin_checkpoint))
            assert np.isfinite(session.run(net.logits)).all()


# ------------------------------------------------------------------------------------------ checkpoints


def test_opens_v1_file_v2_prefix_and_train_dir_and_builds_at_75(standin_checkpoint, tmp_path):
    v1 = model.open_checkpoint(standin_checkpoint)
    assert v1.num_classes == 1001 and len(v1.shapes) == 388
    assert v1.shapes["InceptionV3/Logits/Conv2d_1c_1x1/weights"] == [1, 1, 2048, 1001]
    with tf.Graph().as_default():
        _assert_built_at(model.build(tf.zeros([1, 75, 75, 3]), 5, train_scopes=model.PRESETS["logits"]), 75, 1)
        saver = tf.compat.v1.train.Saver(model.model_variables())
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            prefix = saver.save(session, str(tmp_path / "model.ckpt"), global_step=3)
    for path in (prefix, prefix + ".index", tmp_path):
        v2 = model.open_checkpoint(path)
        assert v2.path == prefix and v2.num_classes == 5


def test_checkpoint_errors_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(CheckpointError, match=r"--checkpoint .*nope.ckpt: no such checkpoint; run `finetune download`"):
        model.open_checkpoint(tmp_path / "nope.ckpt")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"<html>not a checkpoint</html>")
    with pytest.raises(CheckpointError, match="not a readable TensorFlow checkpoint"):
        model.open_checkpoint(junk)
    with tf.Graph().as_default():
        other = tf.compat.v1.get_variable("resnet/conv1/weights", [3])
        with tf.compat.v1.Session() as session:
            session.run(other.initializer)
            path = tf.compat.v1.train.Saver([other]).save(session, str(tmp_path / "resnet.ckpt"))
    with pytest.raises(CheckpointError, match="not of slim's InceptionV3"):
        model.open_checkpoint(path)
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        model.open_checkpoint(tmp_path / "empty" if (tmp_path / "empty").mkdir() is None else None)


def test_default_exclusion_restores_everything_else_exactly_and_builds_at_107(standin_checkpoint, checkpoint_values):
    checkpoint = model.open_checkpoint(standin_checkpoint)
    exclude = model.default_exclusions(5, checkpoint)
    assert exclude == model.HEAD_SCOPES
    with tf.Graph().as_default():
        _assert_built_at(model.build(_images(), 5, train_scopes=model.PRESETS["logits"]), SIZE, BATCH)
        to_restore = model.variables_to_restore(exclude)
        uninitialised = tf.compat.v1.report_uninitialized_variables()
        with tf.compat.v1.Session() as session:
            model.initialise_all_but(session, to_restore)  # the restore fills the rest
            left_to_restore = {name.decode() for name in session.run(uninitialised)}
            model.restore(session, to_restore, checkpoint)
            assert session.run(uninitialised).size == 0
            values = _values(session, model.model_variables())
    restored = {v.op.name for v in to_restore}
    assert left_to_restore == restored
    assert len(restored) == len(values) - sum(model.in_scopes(n, model.HEAD_SCOPES) for n in values)
    for name in restored:
        assert np.array_equal(values[name], checkpoint_values[name]), name
    assert values["InceptionV3/Logits/Conv2d_1c_1x1/weights"].shape == (1, 1, 2048, 5)
    assert values["InceptionV3/Logits/Conv2d_1c_1x1/biases"].shape == (5,)
    # A head layer whose shape matches the checkpoint's still starts fresh, not from the checkpoint.
    fresh = "InceptionV3/AuxLogits/Conv2d_1b_1x1/weights"
    assert values[fresh].shape == checkpoint_values[fresh].shape
    assert not np.allclose(values[fresh], checkpoint_values[fresh])


def test_restoring_the_1001_class_head_into_5_classes_names_variable_shapes_and_flag(standin_checkpoint):
    checkpoint = model.open_checkpoint(standin_checkpoint)
    with tf.Graph().as_default():
        model.build(tf.zeros([1, SIZE, SIZE, 3]), 5)
        with tf.compat.v1.Session() as session:
            with pytest.raises(CheckpointError) as error:
                model.restore(session, model.variables_to_restore(()), checkpoint)
    message = str(error.value)
    assert "InceptionV3/Logits/Conv2d_1c_1x1/weights has shape [1, 1, 2048, 5] in the model" in message
    assert "[1, 1, 2048, 1001] in checkpoint" in message
    assert message.endswith("pass --exclude InceptionV3/Logits")


def test_same_class_count_restores_the_head_too(standin_checkpoint):
    checkpoint = model.open_checkpoint(standin_checkpoint)
    assert model.default_exclusions(1001, checkpoint) == ()


# ------------------------------------------------------------------------------------------ training


def _train_a_few_steps(checkpoint, train_scopes, steps=3):
    """Restores, then runs a few SGD steps on random images; returns variables before and after, and the
    features feeding the head before training, from the training graph and from the pure inference graph."""
    with tf.Graph().as_default():
        tf.compat.v1.set_random_seed(0)
        images = _images()
        net = model.build(images, 5, train_scopes=train_scopes)
        eval_net = model.build(images, 5, reuse=True)
        labels = tf.constant([0, 1, 2, 3])
        loss = tf.compat.v1.losses.sparse_softmax_cross_entropy(labels, net.logits)
        if net.aux_logits is not None:
            loss += 0.4 * tf.compat.v1.losses.sparse_softmax_cross_entropy(labels, net.aux_logits)
        trainable = model.trainable_variables(train_scopes)
        step = tf.compat.v1.train.GradientDescentOptimizer(0.5).minimize(loss, var_list=trainable)
        train_op = tf.group(step, *tf.compat.v1.get_collection(model.BATCH_NORM_UPDATES))
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            model.restore(session, model.variables_to_restore(model.HEAD_SCOPES), checkpoint)
            everything = model.model_variables()
            before = _values(session, everything)
            features = session.run([net.features, eval_net.features])
            for _ in range(steps):
                session.run(train_op)
            after = _values(session, everything)
    return [v.op.name for v in trainable], before, after, features


@pytest.mark.slow
def test_training_logits_changes_exactly_the_head_and_frozen_layers_compute_in_inference_mode(standin_checkpoint):
    checkpoint = model.open_checkpoint(standin_checkpoint)
    trainable, before, after, (train_features, eval_features) = _train_a_few_steps(
        checkpoint, model.PRESETS["logits"]
    )
    head = {n for n in before if model.in_scopes(n, model.HEAD_SCOPES) and "moving_" not in n}
    assert set(trainable) == head and len(head) == 8
    changed = {n for n in before if not np.array_equal(before[n], after[n])}
    # Every trained variable moved, and the aux head's batch norm updated its statistics...
    assert head <= changed
    assert "InceptionV3/AuxLogits/Conv2d_1b_1x1/BatchNorm/moving_mean" in changed
    # ...and nothing else did: frozen weights and frozen batch-norm statistics are bit-identical.
    assert all(model.in_scopes(n, model.HEAD_SCOPES) for n in changed)
    # The features feeding the trained head equal the pure inference graph's: no batch statistics used.
    np.testing.assert_allclose(train_features, eval_features, rtol=1e-5, atol=1e-5)


# Training mixed_7 (its blocks change, nothing below does) is asserted through train() itself, in
# test_train.py's test_training_mixed_7_also_changes_those_blocks_and_nothing_below.
