"""`finetune evaluate`: every example once, numbers that match a by-hand count, a valid confusion PNG."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from finetune import model
from finetune.compat import tf
from finetune.config import EvaluateConfig
from finetune.dataset import load_dataset
from finetune.evaluate import score, watch
from finetune.errors import FinetuneError
from finetune.preprocessing import decode_image, preprocess_for_eval
from tests.conftest import run_cli


def _by_hand(run, split="validation"):
    """Parses the split's records with slim's keys alone and counts argmax hits with the checkpoint."""
    info = load_dataset(run.dataset)
    images, labels = [], []
    with tf.Graph().as_default():
        for shard in info.files(split):
            for record in tf.compat.v1.io.tf_record_iterator(str(shard)):
                example = tf.train.Example.FromString(record)
                labels.append(example.features.feature["image/class/label"].int64_list.value[0])
                images.append(example.features.feature["image/encoded"].bytes_list.value[0])
        encoded = tf.compat.v1.placeholder(tf.string, [])
        preprocessed = preprocess_for_eval(decode_image(encoded), run.image_size)
        batch = tf.compat.v1.placeholder(tf.float32, [None, run.image_size, run.image_size, 3])
        net = model.build(batch, len(info.classes))
        with tf.compat.v1.Session() as session:
            tf.compat.v1.train.Saver(model.model_variables()).restore(session, run.checkpoint)
            pixels = np.stack([session.run(preprocessed, {encoded: data}) for data in images])
            probabilities = session.run(net.probabilities, {batch: pixels})
    return probabilities, np.array(labels)


@pytest.mark.slow
def test_accuracy_equals_a_by_hand_count_and_every_example_counts_once_in_the_json_report(trained_run):
    # --json prints the whole Evaluation; --batch-size 7 does not divide the split, so a last short batch
    # must count once. The HTML report is test_report.py's; skipping it here skips its Grad-CAM graph.
    result = run_cli("evaluate", "--train-dir", str(trained_run.train_dir), "--batch-size", "7", "--json",
                     "--no-html")  # fmt: skip
    assert result.returncode == 0, result.stderr
    evaluation = json.loads(result.stdout)
    assert evaluation["split"] == "validation" and len(evaluation["confusion"]) == 6
    probabilities, labels = _by_hand(trained_run)
    info = load_dataset(trained_run.dataset)
    assert evaluation["examples"] == len(labels) == info.split_counts["validation"]
    assert evaluation["top1"] == pytest.approx(float((probabilities.argmax(1) == labels).mean()), abs=1e-12)
    best5 = np.argsort(-probabilities, axis=1)[:, :5]
    assert evaluation["top5"] == pytest.approx(float((best5 == labels[:, None]).any(1).mean()), abs=1e-12)
    confusion = np.array(evaluation["confusion"])
    assert confusion.sum() == len(labels) and confusion.shape == (6, 6)
    assert [c["support"] for c in evaluation["per_class"]] == list(np.bincount(labels, minlength=6))
    assert len({p["path"] for p in evaluation["predictions"]}) == len(labels)  # no example twice
    with Image.open(evaluation["confusion_png"]) as png:
        png.verify()
    with Image.open(evaluation["confusion_png"]) as png:
        assert png.format == "PNG" and min(png.size) > 200
    saved = json.loads((trained_run.train_dir / "eval-validation.json").read_text())
    assert saved["top1"] == evaluation["top1"] and saved["global_step"] == 40


def test_scores_from_known_predictions():
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    labels = np.array([0, 1, 1, 1])
    scores = score(probabilities, labels, ["a", "b", "c", "d"], ["x", "y", "z"])
    assert scores["top1"] == 0.5 and scores["top5"] is None
    assert scores["confusion"] == [[1, 0, 0], [1, 1, 1], [0, 0, 0]]
    x, y, z = scores["per_class"]
    assert (x.precision, x.recall, x.support) == (0.5, 1.0, 1)
    assert (y.precision, y.recall, y.support) == (1.0, pytest.approx(1 / 3), 3)
    assert y.f1 == pytest.approx(0.5) and z.f1 == 0.0
    assert [(m.path, m.predicted) for m in scores["most_confident_mistakes"]] == [("c", "x"), ("d", "z")]


def test_cli_prints_tables(trained_run):
    # --json is asserted on by the by-hand count above.
    result = run_cli("evaluate", "--train-dir", str(trained_run.train_dir))
    assert result.returncode == 0, result.stderr
    assert "validation: top-1 " in result.stdout and "confusion matrix" in result.stdout


def test_refusals_name_the_flag(trained_run, tmp_path):
    cases = [
        (["--train-dir", str(tmp_path)], "no config.json"),
        (["--train-dir", str(trained_run.train_dir), "--split", "test"], "--split test: "),
        ([], "pass --train-dir (a training run) or --model"),
        (["--train-dir", str(trained_run.train_dir), "--checkpoint", str(tmp_path / "x.ckpt")], "no such checkpoint"),
    ]
    for extra, message in cases:
        result = run_cli("evaluate", *extra)
        assert result.returncode == 1 and message in result.stderr, (extra, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1


def test_watch_evaluates_the_finished_run_and_writes_tensorboard(trained_run):
    seen = []
    count = watch(EvaluateConfig(train_dir=str(trained_run.train_dir), watch=True, watch_minutes=0.1, html=False),
                  seen.append)  # fmt: skip
    assert count == 1 and seen[0].global_step == 40
    steps = [
        (event.step, value.simple_value)
        for events in trained_run.train_dir.glob("events.out.tfevents.*.eval")
        for event in tf.compat.v1.train.summary_iterator(str(events))
        for value in event.summary.value
        if value.tag == "eval/validation_accuracy"
    ]
    assert (40, pytest.approx(seen[0].top1)) in steps


def test_watch_refuses_a_model(tmp_path):
    with pytest.raises(FinetuneError, match="--watch follows a training run"):
        watch(EvaluateConfig(model=str(tmp_path / "m.pb"), watch=True), print)
