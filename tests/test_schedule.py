"""The schedule derived from the data: the documented cases, user overrides, and the rate the graph computes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from finetune import schedule


@pytest.mark.parametrize(
    "examples, path, steps, epochs",
    [
        (20, "cached", 2_000, 2_000.0),  # tiny: one step a pass, so the floor of 2,000 steps rules
        (231, "cached", 2_000, 250.0),  # small: 8 steps a pass, still the floor
        (3_300, "cached", 10_400, 100.0),  # flowers-sized: 100 passes of 104 steps
        (1_000_000, "cached", 20_000, 20_000 / 31_250),  # large: the 20,000-step ceiling, under a pass
        (20, "network", 10, 10.0),  # the whole network: 10 passes up to 10,000 images
        (3_300, "network", 1_040, 10.0),
        (40_000, "network", 6_250, 5.0),  # 10 * sqrt(10,000 / 40,000) passes
        (1_000_000, "network", 62_500, 2.0),  # never below 2 passes
    ],
)
def test_derived_lengths_of_the_documented_cases(examples, path, steps, epochs):
    run = schedule.derive(examples, 32, path)
    assert run.total_steps == steps
    assert run.epochs == pytest.approx(epochs)
    assert run.shape == "cosine"
    assert run.warmup_steps == min(round(0.05 * steps), 1_000)
    assert any(note.startswith(f"steps {steps:,}") for note in run.notes)


def test_values_the_user_gives_replace_the_derived_ones_and_are_not_called_derived():
    run = schedule.derive(231, 32, "cached", epochs=10, warmup_epochs=1, decay_rate=0.5)
    assert (run.total_steps, run.warmup_steps, run.shape, run.decay_rate) == (80, 8, "step", 0.5)
    assert run.decay_steps == 16  # slim's 2 epochs of 8 steps, as --decay-epochs was not given
    assert not any(note.startswith(("steps", "warm-up")) for note in run.notes)
    assert schedule.derive(231, 32, "cached", steps=7, epochs=10).total_steps == 7  # --steps wins
    assert schedule.derive(231, 32, "network", shape="constant").shape == "constant"


def test_cosine_warms_up_then_decays_to_zero_and_slims_staircase_keeps_its_steps():
    run = schedule.derive(3_300, 32, "cached")
    rates = [schedule.rate_at(step, 0.01, run) for step in range(run.total_steps)]
    peak = int(np.argmax(rates))
    assert peak == run.warmup_steps - 1 and rates[peak] == pytest.approx(0.01)
    assert rates[0] == pytest.approx(0.01 / run.warmup_steps)
    assert all(a >= b for a, b in zip(rates[peak:], rates[peak + 1 :]))
    assert rates[-1] < 1e-7
    slim = schedule.derive(3_300, 32, "cached", shape="step", warmup_epochs=0)
    assert schedule.rate_at(2 * 104 - 1, 0.01, slim) == pytest.approx(0.01)
    assert schedule.rate_at(2 * 104, 0.01, slim) == pytest.approx(0.0094)
    # What the issue measured: slim's decay over 300 epochs leaves almost nothing of the rate.
    assert schedule.rate_at(300 * 104, 1.0, slim) < 1e-4


@pytest.mark.parametrize("shape", schedule.SHAPES)
def test_the_graph_computes_the_rate_the_formula_gives(shape):
    from finetune.compat import tf

    run = schedule.derive(500, 32, "cached", shape=shape)
    steps = [0, 1, run.warmup_steps - 1, run.warmup_steps, 777, run.total_steps - 1]
    with tf.Graph().as_default():
        step = tf.compat.v1.placeholder(tf.int64, ())
        rate = schedule.rate_tensor(0.03, run, step)
        with tf.compat.v1.Session() as session:
            got = [session.run(rate, {step: s}) for s in steps]
    assert got == pytest.approx([schedule.rate_at(s, 0.03, run) for s in steps], rel=1e-5, abs=1e-9)


def test_a_shortened_schedule_keeps_its_shape():
    run = schedule.derive(3_300, 32, "cached")
    short = schedule.shortened(run, 400)
    assert short.total_steps == 400
    assert short.warmup_steps == round(run.warmup_steps * 400 / run.total_steps)
    half = schedule.rate_at(short.warmup_steps + (400 - short.warmup_steps) // 2, 1.0, short)
    assert half == pytest.approx(0.5, abs=0.01)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="path"):
        schedule.derive(10, 32, "cache")
    with pytest.raises(ValueError, match="shape"):
        schedule.derive(10, 32, "cached", shape="linear")
    with pytest.raises(ValueError):
        schedule.derive(0, 32, "cached")
    assert math.isclose(schedule.derive(1, 1, "network").epochs, 10.0)
