"""`finetune export` and `finetune predict`: a frozen graph that plain TensorFlow runs, with the model's answers."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from finetune.compat import tf
from finetune.config import EvaluateConfig, ExportConfig
from finetune.dataset import load_dataset
from finetune.evaluate import evaluate
from finetune.export import export
from tests.conftest import run_cli

# Run in a fresh interpreter: TensorFlow alone, as a serving client would (no finetune, no tf_slim).
PLAIN_TENSORFLOW = textwrap.dedent(
    """
    import sys, numpy as np, tensorflow as tf
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(open(sys.argv[1], "rb").read())
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    with tf.compat.v1.Session(graph=graph) as session:
        images = np.load(sys.argv[2])
        by_input = session.run("probabilities:0", {"input:0": images})
        slim_name = session.run("InceptionV3/Predictions/Reshape_1:0", {"input:0": images})
        files = [open(path, "rb").read() for path in sys.argv[4:]]
        by_bytes = session.run("probabilities:0", {"image_bytes:0": np.array(files, dtype=object)})
    np.savez(sys.argv[3], by_input=by_input, slim_name=slim_name, by_bytes=by_bytes)
    assert "finetune" not in sys.modules and "tf_slim" not in sys.modules
    """
)


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model.pb"
    result = export(ExportConfig(train_dir=str(trained_run.train_dir), out=str(out),
                                 saved_model=str(out.parent / "saved")))  # fmt: skip
    return result


@pytest.fixture(scope="module")
def checkpoint_evaluation(trained_run):
    """evaluate on the run's checkpoint, once: the answers the exported model must agree with."""
    return evaluate(EvaluateConfig(train_dir=str(trained_run.train_dir), html=False))  # the HTML is test_report's


@pytest.mark.slow
def test_frozen_graph_in_plain_tensorflow_matches_the_checkpoint(trained_run, trained_run_validation, exported,
                                                                tmp_path):
    images, paths = trained_run_validation.images, trained_run_validation.paths
    np.save(tmp_path / "images.npy", images)
    files = [str(trained_run.photos / p) for p in paths]  # JPEGs, stored in the records byte for byte
    script = tmp_path / "plain.py"
    script.write_text(PLAIN_TENSORFLOW)
    result = subprocess.run([sys.executable, str(script), exported.model, str(tmp_path / "images.npy"),
                             str(tmp_path / "out.npz"), *files], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = np.load(tmp_path / "out.npz")
    expected = trained_run_validation.probabilities
    assert np.abs(out["by_input"] - expected).max() < 1e-5
    assert np.array_equal(out["slim_name"], out["by_input"])
    # The same files through image_bytes: the same decoder and eval transform as the reader, run inside the
    # graph instead of tf.data, so the pixels are identical and only float summation order could differ.
    assert np.abs(out["by_bytes"] - expected).max() < 1e-5


def test_sidecars_describe_the_model(trained_run, exported):
    sidecar = json.loads(open(exported.sidecar).read())
    assert sidecar["classes"] == list(load_dataset(trained_run.dataset).classes)
    assert open(exported.labels).read().splitlines() == sidecar["classes"]
    assert sidecar["image_size"] == 75 and sidecar["global_step"] == 40
    assert sidecar["inputs"]["input"]["shape"] == [None, 75, 75, 3]
    assert sidecar["outputs"]["probabilities"]["also"] == "InceptionV3/Predictions/Reshape_1"
    assert sidecar["dataset_fingerprint"] == load_dataset(trained_run.dataset).fingerprint


@pytest.mark.slow
def test_saved_model_serves_the_same_probabilities(trained_run, trained_run_validation, exported):
    paths = trained_run_validation.paths
    loaded = tf.saved_model.load(exported.saved_model)
    files = tf.constant([(trained_run.photos / p).read_bytes() for p in paths[:4]])
    served = loaded.signatures["serving_default"](image_bytes=files)["probabilities"].numpy()
    expected = trained_run_validation.probabilities[:4]  # computed in one batch with the rest
    assert np.abs(served - expected).max() < 1e-5


@pytest.mark.slow
def test_evaluating_the_pb_matches_the_checkpoint(exported, checkpoint_evaluation):
    from_pb = evaluate(EvaluateConfig(model=exported.model, html=False))
    from_checkpoint = checkpoint_evaluation
    assert from_pb.top1 == from_checkpoint.top1 and from_pb.confusion == from_checkpoint.confusion


@pytest.mark.slow
def test_predict_agrees_with_evaluate_and_survives_a_corrupt_file(trained_run, exported, checkpoint_evaluation,
                                                                  tmp_path):
    evaluation = checkpoint_evaluation
    folder = tmp_path / "to-label"
    folder.mkdir()
    for example in evaluation.predictions:
        (folder / example.path.replace("/", "__")).write_bytes((trained_run.photos / example.path).read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 this is not really a JPEG")
    result = run_cli("predict", "--model", exported.model, str(folder), "--json", "--batch-size", "4")
    assert result.returncode == 1
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    errors = [row for row in rows if "error" in row]
    assert [row["path"] for row in errors] == [str(folder / "broken.jpg")]
    assert "broken.jpg: cannot decode" in result.stderr
    predicted = {row["path"].rsplit("/", 1)[1]: row["predictions"][0]["class"] for row in rows if "predictions" in row}
    assert len(predicted) == len(evaluation.predictions)
    for example in evaluation.predictions:
        assert predicted[example.path.replace("/", "__")] == example.predicted, example.path


def test_predict_table_and_errors(trained_run, exported, tmp_path):
    first = next((trained_run.photos).rglob("*.jpg"))
    result = run_cli("predict", "--model", exported.model, str(first), "--top-k", "2")
    assert result.returncode == 0, result.stderr
    path, label, probability, rest = result.stdout.strip().split("\t")
    assert path == str(first) and label in json.loads(open(exported.sidecar).read())["classes"]
    assert 0 < float(probability) <= 1 and rest.count(",") == 0  # one more class with --top-k 2
    missing = run_cli("predict", "--model", str(tmp_path / "nope.pb"), str(first))
    assert missing.returncode == 1 and "--model" in missing.stderr and "finetune export" in missing.stderr


def test_export_refuses_a_name_without_pb(trained_run, tmp_path):
    result = run_cli("export", "--train-dir", str(trained_run.train_dir), "--out", str(tmp_path / "model.bin"))
    assert result.returncode == 1 and "--out" in result.stderr and ".pb" in result.stderr
    assert not list(tmp_path.iterdir())


def test_a_checkpoint_of_another_head_is_refused_naming_its_layers(trained_run, standin_checkpoint, tmp_path):
    """The pretrained 1001-class checkpoint given to a 6-class run: its head cannot be frozen into the graph."""
    result = run_cli("export", "--train-dir", str(trained_run.train_dir), "--checkpoint", str(standin_checkpoint),
                     "--out", str(tmp_path / "model.pb"))  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: InceptionV3/Logits/Conv2d_1c_1x1/weights has shape [1, 1, 2048, 6] in the "
                               "model but [1, 1, 2048, 1001] in checkpoint")  # fmt: skip
    assert "(and 1 more variable)" in lines[0] and str(standin_checkpoint) in lines[0]
    assert lines[0].endswith("pass --checkpoint a checkpoint of this model (one of its train dir's steps)")
    assert not list(tmp_path.iterdir())
