"""Calibrated probabilities: one temperature fitted on validation logits, expected calibration error, and
the reliability diagram. numpy and Pillow only (no TensorFlow), so every command can use it.

Temperature scaling (Guo et al., 2017) divides every logit by one number T fitted to minimise the negative
log-likelihood of a held-out split. T > 1 softens over-confident probabilities, T < 1 sharpens timid ones;
dividing by a positive number never changes which class is largest, so accuracy is untouched.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

ECE_BINS = 15  # Guo et al.'s choice, and the usual one since
# The search runs over the inverse temperature, in which the NLL is convex (a log-sum-exp of linear
# functions minus a linear one), so a golden-section search over a bracket finds its minimum.
_INVERSE_RANGE = (1e-3, 1e3)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    scaled = np.asarray(logits, np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def log_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """Logits up to a per-row constant (all temperature scaling needs), from probabilities."""
    return np.log(np.maximum(np.asarray(probabilities, np.float64), 1e-38))


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    scaled = np.asarray(logits, np.float64) / temperature
    top = scaled.max(axis=1, keepdims=True)
    log_sum = np.log(np.exp(scaled - top).sum(axis=1)) + top[:, 0]
    return float(np.mean(log_sum - scaled[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising the NLL of ``labels`` under ``softmax(logits / T)``.

    Raises:
        ValueError: no examples.
    """
    logits, labels = np.asarray(logits, np.float64), np.asarray(labels, np.int64)
    if not len(labels):
        raise ValueError("fit_temperature needs at least one example")

    def loss(log_inverse: float) -> float:
        return negative_log_likelihood(logits, labels, 1.0 / math.exp(log_inverse))

    low, high = (math.log(v) for v in _INVERSE_RANGE)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = loss(a), loss(b)
    for _ in range(80):  # the bracket shrinks by 0.618 a step: 80 steps reach float precision
        if fa <= fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = loss(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = loss(b)
    return 1.0 / math.exp((low + high) / 2)


def reliability(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS):
    """Per equal-width bin of top-class confidence: (share of examples, mean confidence, accuracy)."""
    probabilities = np.asarray(probabilities, np.float64)
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == np.asarray(labels)).astype(np.float64)
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    rows = []
    for b in range(bins):
        chosen = which == b
        rows.append((float(chosen.mean()), float(confidence[chosen].mean()) if chosen.any() else float("nan"),
                     float(correct[chosen].mean()) if chosen.any() else float("nan")))  # fmt: skip
    return rows


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, each weighted by its share of examples."""
    return float(sum(share * abs(accuracy - confidence)
                     for share, confidence, accuracy in reliability(probabilities, labels, bins) if share))  # fmt: skip


def draw_reliability(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, bins: int = ECE_BINS) -> Path:
    """A reliability diagram PNG: accuracy against confidence per bin, one line per named curve.

    ``curves`` maps a legend label (e.g. "before, ECE 0.12") to (probabilities, labels). Written atomically.
    """
    from PIL import Image, ImageDraw

    from finetune.files import write_bytes_atomically

    size, margin = 360, 40
    image = Image.new("RGB", (size + 2 * margin, size + 2 * margin + 20 * len(curves)), "white")
    draw = ImageDraw.Draw(image)

    def point(x: float, y: float) -> tuple[float, float]:
        return margin + x * size, margin + (1 - y) * size

    draw.rectangle([point(0, 1), point(1, 0)], outline="black")
    draw.line([point(0, 0), point(1, 1)], fill=(160, 160, 160), width=1)  # perfect calibration
    for tick in (0, 0.5, 1):
        draw.text((point(tick, 0)[0] - 6, margin + size + 4), f"{tick:g}", fill="black")
        draw.text((margin - 22, point(0, tick)[1] - 6), f"{tick:g}", fill="black")
    draw.text((margin, 10), "reliability: accuracy (y) against confidence (x)", fill="black")
    colours = [(200, 60, 40), (40, 90, 200), (40, 150, 60)]
    for index, (label, (probabilities, labels)) in enumerate(curves.items()):
        colour = colours[index % len(colours)]
        rows = [(c, a) for share, c, a in reliability(probabilities, labels, bins) if share]
        draw.line([point(c, a) for c, a in rows], fill=colour, width=2) if len(rows) > 1 else None
        for c, a in rows:
            x, y = point(c, a)
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        draw.text((margin, size + 2 * margin + 20 * index), label, fill=colour)
    path = Path(path)
    from io import BytesIO

    buffer = BytesIO()
    image.save(buffer, format="PNG")
    write_bytes_atomically(path, buffer.getvalue())
    return path
