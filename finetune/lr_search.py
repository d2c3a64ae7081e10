"""Choose a cached head's learning rate and weight decay by short trial runs, judged on training images only.

No single rate suits every head: the right one depends on the optimizer, the classes, the backbone's features
and the length of the run (adam at 1e-3 left a 5 x 60 set at 0.41 validation accuracy where 1e-2 reached
0.99). On cached features a step costs a few milliseconds, so instead of guessing, finetune tries a
grid of rates and weight decays and keeps the best, for less time than the features took to compute.

How, in order:

1. **Folds of the training split.** Each class's training images are ordered by a hash of the seed and their
   path and dealt round-robin into ``FOLDS`` folds, so every fold holds every class that can spare an image
   (a class with one training image is never held out). Trial runs train on all folds but one and are judged
   on that one: every training image is judged once, and the validation and test splits, which the run
   reports, are never seen. The search is given the training split's features alone.
2. **Every candidate at once.** One graph holds a head per (fold, rate, weight decay), each with its own
   optimizer of the run's kind, fed the same batches of its fold (the same draws, the same dropout mask), so
   candidates differ by their settings alone. A trial is the run's own schedule (warm-up, then the same
   decay) shortened to ``TRIAL_STEPS``.
3. **Judged** by held-out accuracy over all folds, ties broken by held-out cross-entropy.
4. **Widened once**: a winner at the edge of the rate grid adds two rates beyond that edge and tries those.

Deterministic for a seed: the folds, the draws and the dropout masks all derive from it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass

import numpy as np

from finetune import model, schedule

log = logging.getLogger("finetune")

FOLDS = 3
# Trial length: long enough that the rates have separated (held-out loss ranks them as the full run's
# results do, docs/benchmarks.md), short enough that the whole grid costs seconds.
TRIAL_STEPS = 400
# Rates from 1/10 to 30x the optimizer's usual head rate, in half decades; the run's weight decay and
# a strong one, for small sets where the head overfits.
RATE_FACTORS = tuple(10 ** (k / 2) for k in range(-2, 4))
WEIGHT_DECAYS = (0.00004, 0.001)


@dataclass(frozen=True)
class SearchSettings:
    """What a trial run shares with the run it chooses for."""

    optimizer: str
    base_rate: float  # the optimizer's usual head rate: the centre of the grid
    batch_size: int
    dropout_keep: float
    label_smoothing: float
    class_weights: tuple[float, ...] | None
    num_classes: int
    schedule: schedule.Schedule  # the full run's; trials run it shortened
    seed: int


@dataclass
class Candidate:
    learning_rate: float
    weight_decay: float
    holdout_accuracy: float
    holdout_loss: float


@dataclass
class SearchResult:
    """The chosen settings and everything the search tried, for config.json and the summary."""

    learning_rate: float
    weight_decay: float
    candidates: list[Candidate]
    folds: int
    trial_steps: int
    fit_examples: int  # training images the trials trained on (each fold trains on the others)
    holdout_examples: int  # training images judged: each once, across the folds
    examples_sha256: str  # over the sorted paths of every image the search read: the training split's
    widened: str | None  # "down" or "up" when the grid was widened once
    seconds: float


def fold_of_each(paths: list[bytes], labels: np.ndarray, seed: int, folds: int = FOLDS) -> np.ndarray:
    """Each training image's fold, -1 for an image never held out (its class has a single image).

    Within a class the images are ordered by sha256(seed, path), which does not depend on the other images,
    and dealt round-robin, so each class is spread over the folds as evenly as it can be.
    """
    assignment = np.full(len(paths), -1, np.int64)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < 2:
            continue
        order = sorted(members, key=lambda row: hashlib.sha256(f"{seed}:".encode() + paths[row]).digest())
        for position, row in enumerate(order):
            assignment[row] = position % folds
    return assignment


def search(
    features: np.ndarray, labels: np.ndarray, paths: list[bytes], settings: SearchSettings, session_config
) -> SearchResult:
    """Tries the grid on the training split's features and returns the best setting.

    Args:
        features: [images, views, 2048], the training split's cached features (views: augmented copies).
        labels: [images], their class ids.
        paths: [images], their paths as the records store them (for the fold order and the digest).
        settings: the run's optimizer, batch, dropout, loss and schedule.
        session_config: the TensorFlow session config the run uses.
    """
    started = time.monotonic()
    folds = fold_of_each(paths, labels, settings.seed)
    fold_count = int(folds.max()) + 1 if (folds >= 0).any() else 0
    if fold_count < 2:
        raise ValueError("the learning-rate search needs at least two training images in some class")
    steps = min(TRIAL_STEPS, settings.schedule.total_steps)
    rates = [settings.base_rate * factor for factor in RATE_FACTORS]
    tried = _trials(features, labels, folds, fold_count, rates, settings, steps, session_config)
    widened = None
    best = _best(tried)
    if best.learning_rate in (rates[0], rates[-1]):
        widened = "down" if best.learning_rate == rates[0] else "up"
        step = RATE_FACTORS[1] / RATE_FACTORS[0]
        edge = best.learning_rate
        more = [edge / step, edge / step**2] if widened == "down" else [edge * step, edge * step**2]
        tried += _trials(features, labels, folds, fold_count, more, settings, steps, session_config)
        best = _best(tried)
    digest = hashlib.sha256(b"\n".join(sorted(paths))).hexdigest()
    return SearchResult(
        learning_rate=best.learning_rate,
        weight_decay=best.weight_decay,
        candidates=sorted(tried, key=lambda c: (c.learning_rate, c.weight_decay)),
        folds=fold_count,
        trial_steps=steps,
        fit_examples=len(paths),
        holdout_examples=int((folds >= 0).sum()),
        examples_sha256=digest,
        widened=widened,
        seconds=time.monotonic() - started,
    )


def _best(candidates: list[Candidate]) -> Candidate:
    return max(candidates, key=lambda c: (round(c.holdout_accuracy, 9), -c.holdout_loss))


def _batches(folds: np.ndarray, fold_count: int, views: int, settings: SearchSettings, steps: int):
    """Each step's rows and views, per fold: shuffled passes over the fold's training images."""
    rng = np.random.default_rng(settings.seed)
    rows = np.empty((steps, fold_count, settings.batch_size), np.int64)
    for fold in range(fold_count):
        train_rows = np.flatnonzero(folds != fold)
        stream = np.concatenate([rng.permutation(train_rows)
                                 for _ in range(-(-steps * settings.batch_size // len(train_rows)))])  # fmt: skip
        rows[:, fold] = stream[: steps * settings.batch_size].reshape(steps, settings.batch_size)
    chosen_views = rng.integers(0, views, size=rows.shape)
    return rows, chosen_views


def _trials(features, labels, folds, fold_count, rates, settings: SearchSettings, steps: int, session_config):
    """Trains a head per (rate, fold, weight decay) for ``steps`` steps in one graph; scores each.

    The heads of one rate share a variable ([folds, decays, 2048, classes]) and an optimizer: every update
    rule here works element by element, so the heads in a variable train exactly as they would apart, and
    the graph has a handful of ops per rate instead of per head.
    """
    from finetune.compat import tf

    decays = np.array(WEIGHT_DECAYS, np.float32)
    trial = schedule.shortened(settings.schedule, steps)
    rows, views = _batches(folds, fold_count, features.shape[1], settings, steps)
    classes, batch = settings.num_classes, settings.batch_size
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.set_random_seed(settings.seed)
        table_values = tf.compat.v1.placeholder(tf.float32, features.shape)
        table = tf.compat.v1.Variable(table_values, trainable=False)
        batch_rows = tf.compat.v1.placeholder(tf.int64, rows.shape[1:])  # [folds, batch]
        batch_views = tf.compat.v1.placeholder(tf.int64, rows.shape[1:])
        step = tf.compat.v1.placeholder(tf.int64, ())
        inputs = tf.gather(tf.gather(table, batch_rows), batch_views, batch_dims=2)  # [folds, batch, 2048]
        if settings.dropout_keep < 1:
            inputs = tf.nn.dropout(inputs, rate=1 - settings.dropout_keep)
        shape = [fold_count, len(decays)]
        weights = [tf.compat.v1.Variable(tf.zeros(shape + [model.FEATURE_SIZE, classes]), name=f"weights_{i}")
                   for i in range(len(rates))]  # fmt: skip
        biases = [tf.compat.v1.Variable(tf.zeros(shape + [classes]), name=f"biases_{i}") for i in range(len(rates))]
        all_weights, all_biases = tf.stack(weights), tf.stack(biases)  # [rates, folds, decays, ...]
        logits = tf.einsum("fbx,rfdxk->rfdbk", inputs, all_weights) + all_biases[:, :, :, None, :]
        heads = len(rates) * fold_count * len(decays)
        fold_labels = tf.gather(tf.constant(labels, tf.int64), batch_rows)
        every_label = tf.reshape(tf.broadcast_to(fold_labels[None, :, None], [len(rates)] + shape + [batch]), [-1])
        # classification_loss averages over every head's batch at once; times the heads, it is their sum.
        loss = heads * model.classification_loss(
            tf.reshape(logits, [-1, classes]), every_label, classes,
            class_weights=settings.class_weights, label_smoothing=settings.label_smoothing,
        ) + tf.reduce_sum(decays * 0.5 * tf.reduce_sum(tf.square(all_weights), axis=[-2, -1]))  # fmt: skip
        gradients = tf.gradients(loss, weights + biases)
        factor = schedule.rate_tensor(1.0, trial, step)  # the schedule's shape; each rate scales it
        updates = []
        for index, rate in enumerate(rates):
            update = schedule.optimizer(settings.optimizer, rate * factor)
            pairs = [(gradients[index], weights[index]), (gradients[len(rates) + index], biases[index])]
            updates.append(update.apply_gradients(pairs))
        train_op = tf.group(*updates)
        scores = []
        for fold in range(fold_count):
            held = np.flatnonzero(folds == fold)
            held_inputs = tf.gather(table[:, 0], held)  # the first view: evaluation transform, or augmented view 0
            held_logits = tf.einsum("nx,rdxk->rdnk", held_inputs, all_weights[:, fold]) + all_biases[:, fold, :, None]
            held_labels = np.broadcast_to(labels[held], held_logits.shape[:-1])
            losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=held_labels, logits=held_logits)
            hits = tf.cast(tf.equal(tf.argmax(held_logits, -1), held_labels), tf.float64)
            scores.append((tf.reduce_sum(hits, -1), tf.reduce_sum(tf.cast(losses, tf.float64), -1)))  # [rates, decays]
        with tf.compat.v1.Session(config=session_config) as session:
            session.run(tf.compat.v1.global_variables_initializer(), {table_values: features})
            for number in range(steps):
                session.run(train_op, {batch_rows: rows[number], batch_views: views[number], step: number})
            scored = session.run(scores)
    judged = int((folds >= 0).sum())
    hits = sum(fold_hits for fold_hits, _ in scored) / judged
    losses = sum(fold_losses for _, fold_losses in scored) / judged
    return [
        Candidate(learning_rate=float(rate), weight_decay=float(decay), holdout_accuracy=float(hits[r, d]),
                  holdout_loss=float(losses[r, d]))  # fmt: skip
        for r, rate in enumerate(rates)
        for d, decay in enumerate(WEIGHT_DECAYS)
    ]
