"""--precision bf16: 16-bit compute over float32 variables, for train, evaluate, export and predict."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from finetune import model, precision
from finetune.compat import tf
from finetune.config import ExportConfig, TrainConfig
from finetune.errors import FinetuneError
from finetune.export import export
from finetune.train import train
from tests.conftest import run_cli

SIZE = 75
# bfloat16 keeps 8 significant bits: each op rounds to about 0.4% relative error, and ~100 layers of them
# add up to logits a few percent off. A softmax over 6 classes then moves by about a hundredth (0.009 at
# most, measured here). 0.06 leaves room for other CPUs and summation orders and would still catch a
# graph that computes something else (a wrong cast, a missing batch norm) by a wide margin.
PROBABILITY_TOLERANCE = 0.06


def _checkpoint_probabilities(run, images, compute_dtype):
    with tf.Graph().as_default():
        net = model.build(tf.constant(images), 6, compute_dtype=compute_dtype)
        with tf.compat.v1.Session() as session:
            tf.compat.v1.train.Saver(model.model_variables()).restore(session, run.checkpoint)
            return session.run(net.probabilities)


def _pb_probabilities(path, images):
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(open(path, "rb").read())
    with tf.Graph().as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
        with tf.compat.v1.Session() as session:
            return session.run("probabilities:0", {"input:0": images}), graph_def


def test_bf16_graph_computes_in_bfloat16_over_float32_variables():
    with tf.Graph().as_default() as graph:
        # 107 pixels: the smallest size with the aux head, so that every layer is there.
        net = model.build(tf.zeros([2, 107, 107, 3]), 5, train_scopes=model.PRESETS["all"],
                          compute_dtype="bfloat16")  # fmt: skip
        convolutions = [op for op in graph.get_operations() if op.type == "Conv2D"]
        batch_norms = [op for op in graph.get_operations() if op.type == "FusedBatchNormV3"]
        assert convolutions and all(op.get_attr("T") == tf.bfloat16 for op in convolutions)
        # Fused batch norm takes 16-bit activations with float32 scale, offset and statistics.
        assert batch_norms and all(op.inputs[0].dtype == tf.bfloat16 for op in batch_norms)
        assert all(op.inputs[2].dtype == tf.float32 for op in batch_norms)
        assert len(model.model_variables()) == 388
        assert {v.dtype.base_dtype for v in model.model_variables()} == {tf.float32}
        for tensor in (net.logits, net.probabilities, net.features, net.aux_logits):
            assert tensor.dtype == tf.float32


@pytest.mark.slow
def test_bf16_training_changes_only_the_trained_layers_and_saves_float32(trained_run, tmp_path):
    result = train(TrainConfig(dataset=str(trained_run.dataset), train_dir=str(tmp_path / "run"),
                               checkpoint=str(trained_run.checkpoint), trainable="Mixed_7c,logits",
                               image_size=SIZE, batch_size=8, steps=3, eval_every=0, precision="bf16"))  # fmt: skip
    assert result.status == "completed" and np.isfinite(result.final_loss)
    reader = tf.compat.v1.train.NewCheckpointReader(result.checkpoint)
    dtypes = reader.get_variable_to_dtype_map()
    assert {dtype for name, dtype in dtypes.items() if name != "global_step"} == {tf.float32}
    start = tf.compat.v1.train.NewCheckpointReader(trained_run.checkpoint)
    weights = [name for name in start.get_variable_to_shape_map()
               if name.startswith("InceptionV3/") and "/Adam" not in name]  # fmt: skip
    changed = {name for name in weights if not np.array_equal(start.get_tensor(name), reader.get_tensor(name))}
    assert changed and all(model.in_scopes(name, model.resolve_scopes("Mixed_7c,logits", "")) for name in changed)
    assert any(name.startswith("InceptionV3/Mixed_7c/") for name in changed)
    plan = json.loads((tmp_path / "run" / "config.json").read_text())
    assert plan["precision"] == "bf16" and plan["compute_dtype"] == "bfloat16"


@pytest.fixture(scope="module")
def bf16_model(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16") / "model.pb"
    return export(ExportConfig(train_dir=str(trained_run.train_dir), out=str(out), precision="bf16"))


@pytest.mark.slow
def test_bf16_checkpoint_and_pb_give_probabilities_close_to_fp32(trained_run, trained_run_validation, bf16_model):
    images, fp32 = trained_run_validation.images, trained_run_validation.probabilities
    bf16 = _checkpoint_probabilities(trained_run, images, "bfloat16")
    from_pb, graph_def = _pb_probabilities(bf16_model.model, images)
    for probabilities in (bf16, from_pb):
        assert probabilities.dtype == np.float32
        assert np.abs(probabilities - fp32).max() < PROBABILITY_TOLERANCE
        assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)  # the softmax ran in float32
        # Where fp32 is decided by more than the tolerance, bf16 picks the same class.
        ranked = np.sort(fp32, axis=1)
        clear = ranked[:, -1] - ranked[:, -2] > 2 * PROBABILITY_TOLERANCE
        assert clear.any()
        assert np.array_equal(probabilities[clear].argmax(1), fp32[clear].argmax(1))
    convolutions = [node for node in graph_def.node if node.op in ("Conv2D", "_FusedConv2D")]
    assert convolutions and all(node.attr["T"].type == tf.bfloat16.as_datatype_enum for node in convolutions)


def test_pb_records_its_precision_and_refuses_another(trained_run, bf16_model, tmp_path):
    sidecar = json.loads(open(bf16_model.sidecar).read())
    assert sidecar["precision"] == "bf16" and sidecar["compute_dtype"] == "bfloat16"
    assert sidecar["inputs"]["input"]["dtype"] == "float32"
    image = str(next(trained_run.photos.rglob("*.jpg")))
    refused = run_cli("predict", "--model", bf16_model.model, "--precision", "fp32", image)
    assert refused.returncode == 1 and refused.stdout == ""
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --precision fp32: ")
    assert "exported at bf16" in lines[0] and "finetune export --precision fp32" in lines[0]
    refused = run_cli("evaluate", "--model", bf16_model.model, "--precision", "fp32")
    assert refused.returncode == 1 and "exported at bf16" in refused.stderr
    accepted = run_cli("predict", "--model", bf16_model.model, "--precision", "bf16", image, "--json")
    assert accepted.returncode == 0, accepted.stderr
    assert json.loads(accepted.stdout)["predictions"][0]["class"] in sidecar["classes"]


def test_unknown_precision_is_refused_in_one_line(tmp_path):
    with pytest.raises(FinetuneError, match=r"^--precision fp16: unknown; choose one of fp32, bf16$"):
        TrainConfig(dataset="d", train_dir="t", precision="fp16")
    result = run_cli("export", "--train-dir", str(tmp_path), "--precision", "fp16")
    assert result.returncode == 2 and "--precision: invalid choice: 'fp16'" in result.stderr


def test_cpu_bf16_support_is_read_from_cpuinfo(tmp_path):
    with_bf16 = tmp_path / "with"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 sse2\n\nprocessor\t: 1\n")
    without = tmp_path / "without"
    without.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f\n")
    assert precision.cpu_has_bf16(with_bf16) is True
    assert precision.cpu_has_bf16(without) is False
    assert precision.cpu_has_bf16(tmp_path / "missing") is None


def test_bf16_without_onednn_warns_in_one_line(monkeypatch, caplog):
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    with caplog.at_level(logging.WARNING, logger="finetune"):
        compute = precision.resolve("bf16", gpu=False)
    assert compute.dtype == "bfloat16" and not compute.loss_scaling
    (record,) = caplog.records
    assert record.getMessage().startswith("--precision bf16: TF_ENABLE_ONEDNN_OPTS turns oneDNN off")
    assert "--precision fp32" in record.getMessage() and "\n" not in record.getMessage()
    assert precision.resolve("fp32", gpu=False).dtype == "float32"


def test_float16_path_with_loss_scaling_trains_on_the_cpu():
    """The path of GPUs without bfloat16 (float16, loss scaling), run on the CPU as the towers are."""
    compute = precision.Compute("bf16", precision.FLOAT16)
    assert compute.loss_scaling
    with tf.Graph().as_default():
        images = tf.random.stateless_uniform([2, SIZE, SIZE, 3], seed=[1, 2], minval=-1, maxval=1)
        labels = tf.constant([0, 1], tf.int64)
        net = model.build(images, 3, train_scopes=model.PRESETS["logits"], compute_dtype=compute.dtype)
        loss = tf.compat.v1.losses.sparse_softmax_cross_entropy(labels, net.logits)
        variables = model.trainable_variables(model.PRESETS["logits"])
        step = tf.compat.v1.train.get_or_create_global_step()
        optimizer = precision.loss_scale_optimizer(tf.compat.v1.train.GradientDescentOptimizer(0.1), compute)
        train_op = optimizer.apply_gradients(optimizer.compute_gradients(loss, var_list=variables), global_step=step)
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            before = session.run(variables)
            losses = [session.run([train_op, loss])[1] for _ in range(2)]
            after = session.run(variables)
            assert session.run(step) == 2 and all(np.isfinite(losses))
    assert net.logits.dtype == tf.float32 and {v.dtype.base_dtype for v in variables} == {tf.float32}
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))
