"""Calibrated probabilities: a temperature fitted on validation logits, its ECE, and its place in the export."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from finetune import calibration


def _calibrated_set(seed: int = 0, count: int = 3000, classes: int = 5):
    """Logits and labels drawn from the logits' own softmax: perfectly calibrated at temperature 1."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(count, classes)) * 2.0
    cumulative = calibration.softmax(logits).cumsum(axis=1)
    labels = (rng.random((count, 1)) > cumulative).sum(axis=1)
    return logits, labels


@pytest.mark.parametrize("factor", [0.4, 2.5])
def test_the_fitted_temperature_undoes_a_known_scale(factor):
    logits, labels = _calibrated_set()
    scaled = logits * factor  # over-confident for factor > 1, timid below
    temperature = calibration.fit_temperature(scaled, labels)
    assert temperature == pytest.approx(factor, rel=0.05)
    before = calibration.expected_calibration_error(calibration.softmax(scaled), labels)
    after = calibration.expected_calibration_error(calibration.softmax(scaled, temperature), labels)
    assert after < before / 2
    assert np.array_equal(calibration.softmax(scaled, temperature).argmax(1), scaled.argmax(1))
    # Fitting on log-probabilities (what evaluate has) finds the same temperature: softmax ignores a row shift.
    from_probabilities = calibration.fit_temperature(calibration.log_probabilities(calibration.softmax(scaled)), labels)
    assert from_probabilities == pytest.approx(temperature, rel=1e-4)


def test_ece_of_a_hand_made_case():
    # Two examples at confidence 0.9 (one right), two at 0.6 (both right): bins 14 and 9 of 15.
    probabilities = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    labels = np.array([0, 1, 0, 0])
    assert calibration.expected_calibration_error(probabilities, labels) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)


@pytest.mark.slow
def test_the_run_s_temperature_is_reported_by_evaluate_and_folded_by_export(trained_run, tmp_path):
    from finetune.compat import tf
    from finetune.config import EvaluateConfig, ExportConfig
    from finetune.evaluate import calibrate_run, evaluate
    from finetune.export import export

    train_dir = tmp_path / "run"
    shutil.copytree(trained_run.train_dir, train_dir)
    fit = calibrate_run(train_dir)  # what `finetune train` runs at the end of a run with validation passes
    temperature = fit["temperature"]
    recorded = json.loads((train_dir / "calibration.json").read_text())["fits"][str(fit["step"])]
    assert recorded["temperature"] == temperature
    evaluation = evaluate(EvaluateConfig(train_dir=str(train_dir), split="validation"))
    assert evaluation.temperature == pytest.approx(temperature) and recorded["ece_after"] == pytest.approx(
        evaluation.ece_calibrated)  # fmt: skip
    # The fit minimises the NLL (T = 1 among the candidates); ECE on 17 examples may go either way.
    assert recorded["nll_after"] <= recorded["nll_before"] + 1e-9 and evaluation.ece is not None
    assert (train_dir / "calibration-validation.png").stat().st_size > 0

    result = export(ExportConfig(train_dir=str(train_dir), out=str(tmp_path / "model.pb")))
    assert result.temperature == temperature
    assert json.loads((tmp_path / "model.json").read_text())["temperature"] == temperature
    graph_def = tf.compat.v1.GraphDef.FromString((tmp_path / "model.pb").read_bytes())
    images = np.random.default_rng(0).uniform(-1, 1, (4, 75, 75, 3)).astype(np.float32)
    with tf.Graph().as_default() as graph, tf.compat.v1.Session(graph=graph) as session:
        tf.compat.v1.import_graph_def(graph_def, name="")
        probabilities, logits = session.run(["probabilities:0", "logits:0"], {"input:0": images})
    assert np.allclose(probabilities, calibration.softmax(logits, temperature), atol=1e-5)
    assert np.array_equal(probabilities.argmax(1), logits.argmax(1))

    plain = export(ExportConfig(train_dir=str(train_dir), out=str(tmp_path / "plain.pb"), calibrate=False))
    assert plain.temperature is None and json.loads((tmp_path / "plain.json").read_text())["temperature"] is None
