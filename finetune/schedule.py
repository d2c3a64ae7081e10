"""How long and how fast a run trains: a schedule derived from the data, the learning rate at each step,
and the update rule.

Big Transfer's lesson is that a fine-tuning schedule is a function of the data, not a constant: the same
number of epochs that is plenty for 100,000 images starves a head trained on 200. finetune derives the
length, the warm-up and the decay from two facts, the size of the training split and the path the run
takes, as pure functions (no TensorFlow here) whose reasoning is written beside them:

- **cached**: only the head trains, on features computed once (finetune/features.py). A step costs a
  few milliseconds (2 to 4 ms at batch 32 on 2 cores), so the head is trained until it has converged, not until a budget runs out;
- **network**: every step runs the network (deeper presets, or augmentation without cached views). A
  step costs about a second per 12 to 40 images on a laptop CPU, so the length stays near slim's recipe
  (about 10 passes) and shrinks, in passes, as the data grows.

Both decay along a half cosine to zero after a linear warm-up. Cosine needs no decay period tuned to the
run's length, and unlike slim's staircase (x0.94 every 2 epochs) it cannot starve a long run: 300 epochs of
slim's decay leave 1/10,000 of the rate, so most of such a run trains at no rate at all. Slim's staircase
stays available (``--schedule step``, or any ``--decay-*`` flag), as does a constant rate.

Any value the user gives (``--epochs``, ``--steps``, ``--warmup-epochs``, ``--decay-rate``,
``--decay-epochs``, ``--schedule``) replaces the derived one; ``Schedule.notes`` says which values were
derived and from what, and the start-up summary prints it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SHAPES = ("cosine", "step", "constant")
PATHS = ("cached", "network")

# The cached head: a linear classifier on fixed features is a convex problem whose convergence is counted in
# optimizer steps more than in passes. With the searched rate, 2,000 steps matched the best of a manual grid
# (5 rates, constant for 300 passes or cosine) on generated 5 x 60 sets (docs/training-defaults.md); 100
# passes bound the steps of a larger split, and 20,000 steps (about a minute at most here) the run.
CACHED_EPOCHS = 100.0
CACHED_MIN_STEPS = 2_000
CACHED_MAX_STEPS = 20_000
# The whole network: slim's flowers recipe trained about 10 passes (1,000 head steps at batch 32 over
# 3,320 images). Above REFERENCE_EXAMPLES each pass shows more distinct images per step, so passes shrink as
# 1/sqrt(size), never below NETWORK_MIN_EPOCHS.
NETWORK_EPOCHS = 10.0
REFERENCE_EXAMPLES = 10_000
NETWORK_MIN_EPOCHS = 2.0
# Warm-up: a fresh head sends large, random gradients into pretrained layers until it has learned a little;
# a short linear ramp keeps them from undoing the pretraining. 5% of the run (at most 1,000 steps).
WARMUP_FRACTION = 0.05
MAX_WARMUP_STEPS = 1_000
# Slim's staircase, kept for --schedule step: x0.94 every 2 epochs.
SLIM_DECAY_RATE = 0.94
SLIM_DECAY_EPOCHS = 2.0


@dataclass(frozen=True)
class Schedule:
    """A run's length and learning-rate shape, with the reason for each derived value."""

    total_steps: int
    steps_per_epoch: int
    warmup_steps: int
    shape: str  # "cosine", "step" (slim's staircase) or "constant"
    decay_rate: float  # "step" only: the multiplier per period
    decay_steps: int  # "step" only: steps per period
    notes: tuple[str, ...] = ()  # "steps 2,000: derived (...)": what was derived, and from what

    @property
    def epochs(self) -> float:
        return self.total_steps / self.steps_per_epoch


def derived_epochs(train_examples: int, batch_size: int, path: str) -> tuple[float, str]:
    """Passes over the training split when the user gives neither --epochs nor --steps, and why.

    Cached head: 100 passes, but at least 2,000 and at most 20,000 steps (see CACHED_* above). Examples:
    225 images at batch 32 (8 steps a pass) train 2,000 steps, 250 passes; 3,300 images (104 steps a pass)
    10,400 steps, 100 passes; 1,000,000 images 20,000 steps, 0.64 of a pass.

    Network: 10 passes up to 10,000 images, then 10 * sqrt(10,000 / size), at least 2: 3,300 images train
    10 passes, 40,000 images 5, 1,000,000 images 2.
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    steps_per_epoch = math.ceil(train_examples / batch_size)
    if path == "cached":
        steps = min(max(CACHED_EPOCHS * steps_per_epoch, CACHED_MIN_STEPS), CACHED_MAX_STEPS)
        epochs = steps / steps_per_epoch
        return epochs, (
            f"cached head: {CACHED_EPOCHS:g} passes, within {CACHED_MIN_STEPS:,} to {CACHED_MAX_STEPS:,} steps"
        )
    epochs = NETWORK_EPOCHS * min(1.0, math.sqrt(REFERENCE_EXAMPLES / train_examples))
    epochs = max(epochs, NETWORK_MIN_EPOCHS)
    return epochs, (
        f"whole network: {NETWORK_EPOCHS:g} passes up to {REFERENCE_EXAMPLES:,} images, fewer above, "
        f"at least {NETWORK_MIN_EPOCHS:g}"
    )


def derive(
    train_examples: int,
    batch_size: int,
    path: str,
    *,
    epochs: float | None = None,
    steps: int | None = None,
    warmup_epochs: float | None = None,
    shape: str | None = None,
    decay_rate: float | None = None,
    decay_epochs: float | None = None,
) -> Schedule:
    """The run's schedule: the user's values where given, derived ones elsewhere.

    Args:
        train_examples: images in the training split (or the share of it one process trains on).
        batch_size: images per step.
        path: "cached" (the head on cached features) or "network" (every step runs the network).
        epochs, steps: the length; ``steps`` wins over ``epochs``; neither: :func:`derived_epochs`.
        warmup_epochs: the linear warm-up; None: 5% of the run, at most 1,000 steps.
        shape: "cosine", "step" or "constant"; None: "step" when a decay flag is given, else "cosine".
        decay_rate, decay_epochs: slim's staircase (``shape`` "step"); None: 0.94 every 2 epochs.
    """
    if train_examples < 1 or batch_size < 1:
        raise ValueError(f"need at least one example and a batch of one, got {train_examples}, {batch_size}")
    if shape is not None and shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    steps_per_epoch = math.ceil(train_examples / batch_size)
    notes = []
    if steps is not None:
        total = steps
    elif epochs is not None:
        total = max(1, math.ceil(epochs * steps_per_epoch))
    else:
        epochs, why = derived_epochs(train_examples, batch_size, path)
        total = max(1, round(epochs * steps_per_epoch))
        notes.append(f"steps {total:,} ({total / steps_per_epoch:.3g} epochs): derived from {train_examples:,} "
                     f"training images at batch {batch_size} ({why})")  # fmt: skip
    if warmup_epochs is not None:
        warmup = round(warmup_epochs * steps_per_epoch)
    else:
        warmup = min(round(WARMUP_FRACTION * total), MAX_WARMUP_STEPS)
        notes.append(f"warm-up {warmup:,} steps: derived ({WARMUP_FRACTION:.0%} of the run)")
    if shape is None:
        shape = "step" if (decay_rate is not None or decay_epochs is not None) else "cosine"
        reason = "a --decay-* flag was given" if shape == "step" else "the default"
        notes.append(f"schedule {shape}: {reason}")
    rate = decay_rate if decay_rate is not None else SLIM_DECAY_RATE
    period = decay_epochs if decay_epochs is not None else SLIM_DECAY_EPOCHS
    return Schedule(
        total_steps=total,
        steps_per_epoch=steps_per_epoch,
        warmup_steps=min(warmup, total),
        shape=shape,
        decay_rate=rate,
        decay_steps=max(1, round(period * steps_per_epoch)),
        notes=tuple(notes),
    )


def shortened(schedule: Schedule, steps: int) -> Schedule:
    """The same shape over fewer steps (the learning-rate search's trial runs): warm-up and decay scale."""
    scale = steps / schedule.total_steps
    return Schedule(
        total_steps=steps,
        steps_per_epoch=schedule.steps_per_epoch,
        warmup_steps=round(schedule.warmup_steps * scale),
        shape=schedule.shape,
        decay_rate=schedule.decay_rate,
        decay_steps=max(1, round(schedule.decay_steps * scale)),
    )


def rate_at(step: int, base_rate: float, schedule: Schedule) -> float:
    """The learning rate of step ``step`` (0 for the first): the formula :func:`rate_tensor` builds."""
    if schedule.shape == "step":
        rate = base_rate * schedule.decay_rate ** (step // schedule.decay_steps)
    elif schedule.shape == "cosine":
        progress = min(1.0, max(0.0, (step - schedule.warmup_steps) / max(1, schedule.total_steps - schedule.warmup_steps)))
        rate = base_rate * 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        rate = base_rate
    if schedule.warmup_steps:
        rate *= min(1.0, (step + 1) / schedule.warmup_steps)
    return rate


def rate_tensor(base_rate, schedule: Schedule, global_step, name: str = "learning_rate"):
    """The learning rate as a graph tensor of ``global_step`` (the steps taken before this one).

    ``base_rate`` may be a float or a float32 tensor (the search trains several rates in one graph).
    """
    from finetune.compat import tf

    step = tf.cast(global_step, tf.float32)
    if schedule.shape == "step":
        rate = base_rate * tf.pow(schedule.decay_rate, tf.floor(step / schedule.decay_steps))
    elif schedule.shape == "cosine":
        span = float(max(1, schedule.total_steps - schedule.warmup_steps))
        progress = tf.clip_by_value((step - schedule.warmup_steps) / span, 0.0, 1.0)
        rate = base_rate * 0.5 * (1.0 + tf.cos(math.pi * progress))
    else:
        rate = base_rate * tf.ones_like(step)
    if schedule.warmup_steps:
        rate *= tf.minimum(1.0, (step + 1.0) / schedule.warmup_steps)
    return tf.identity(rate, name=name)


def optimizer(name: str, learning_rate):
    """The update rule ``--optimizer`` names, at ``learning_rate`` (a float or a tensor)."""
    from finetune.compat import tf

    train = tf.compat.v1.train
    if name == "rmsprop":  # slim's settings; epsilon 1.0 keeps early steps small on a fresh head
        return train.RMSPropOptimizer(learning_rate, decay=0.9, momentum=0.9, epsilon=1.0)
    if name == "momentum":
        return train.MomentumOptimizer(learning_rate, momentum=0.9)
    if name == "adam":
        return train.AdamOptimizer(learning_rate)
    if name == "sgd":
        return train.GradientDescentOptimizer(learning_rate)
    raise ValueError(f"unknown optimizer {name!r}")
