"""Calibrated probabilities: a temperature fitted on validation logits and its ECE (a run's own fit and its
place in the export: tests/test_best.py)."""

from __future__ import annotations


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


