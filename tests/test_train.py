"""`finetune train` on generated data at a small image size, against the stand-in pretrained checkpoint."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from finetune import model
from finetune.compat import tf
from finetune.config import TrainConfig
from finetune.errors import FinetuneError
from finetune.plan import auto_class_weights, imbalance_warning
from finetune.train import train
from tests.conftest import checkpoint_tensors, run_cli

SIZE = "107"  # smallest size with slim's aux head, so the whole head trains
FAST = ["--image-size", SIZE, "--batch-size", "8", "--eval-every", "0"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """3 learnable classes, 20 images each, with a validation split."""
    from finetune.synthetic import make_image_folder

    root = tmp_path_factory.mktemp("train-data")
    make_image_folder(root / "photos", num_classes=3, images_per_class=20, seed=5, min_side=90, max_side=160)
    result = run_cli("build-dataset", str(root / "photos"), "--out", str(root / "ds"),
                     "--validation-fraction", "0.2", "--workers", "1")  # fmt: skip
    assert result.returncode == 0, result.stderr
    return root / "ds"


def _config(dataset, train_dir, checkpoint, **overrides) -> TrainConfig:
    settings = dict(dataset=str(dataset), train_dir=str(train_dir), checkpoint=str(checkpoint),
                    image_size=int(SIZE), batch_size=8, eval_every=0)  # fmt: skip
    settings.update(overrides)
    return TrainConfig(**settings)


def _changed(before: dict, after: dict) -> set:
    return {name for name in before if name in after and not np.array_equal(before[name], after[name])}


@pytest.fixture(scope="module")
def head_run(dataset, standin_checkpoint, tmp_path_factory):
    """A head-only run with the defaults (cached features), 40 steps saved and validated at 20 and 40, with
    class weights: asserted on by the head test and the run-records test, built on by the two-phase recipe,
    and copied by the refused-train-dir test. (The classes are nearly balanced, so the weights are all about
    1 and the head learns as it would without them.)"""
    train_dir = tmp_path_factory.mktemp("head") / "run"
    config = _config(dataset, train_dir, standin_checkpoint, steps=40, save_every=20, eval_every=20,
                     class_weights="auto")  # fmt: skip
    return train(config), train_dir


@pytest.mark.slow
def test_training_logits_changes_only_the_head_and_learns(head_run, checkpoint_values):
    result, train_dir = head_run
    assert result.status == "completed" and result.global_step == 40
    final = checkpoint_tensors(result.checkpoint)
    first = checkpoint_tensors(str(train_dir / "model.ckpt-20"))
    network = {n for n in final if n.startswith("InceptionV3/") and "/Adam" not in n}
    outside = {n for n in network if not model.in_scopes(n, model.HEAD_SCOPES)}
    assert outside == {n for n in checkpoint_values if not model.in_scopes(n, model.HEAD_SCOPES)}
    for name in outside:
        assert np.array_equal(final[name], checkpoint_values[name]), name  # moving statistics included
    head = network - outside
    trained = {n for n in head if "moving_" not in n}
    assert trained <= _changed(first, final)
    assert result.final_loss < result.first_loss
    assert result.train_accuracy > 0.8  # chance is 1/3


@pytest.fixture(scope="module")
def mixed_7_run(dataset, head_run, tmp_path_factory):
    """The two-phase recipe's second phase: mixed_7 (and both heads) trained for 2 steps through the network,
    starting from the head run's train dir. Asserted on by the mixed_7 test and the two-phase test."""
    train_dir = tmp_path_factory.mktemp("deeper") / "run"
    return train(_config(dataset, train_dir, head_run[1], trainable="mixed_7", steps=2, augment=False)), train_dir


def test_the_graph_is_saved_with_the_last_checkpoint_only_and_imports(head_run):
    result, train_dir = head_run
    assert not (train_dir / "model.ckpt-20.meta").exists()  # a periodic save: the weights alone
    assert result.checkpoint.endswith("model.ckpt-40")
    with tf.Graph().as_default():
        saver = tf.compat.v1.train.import_meta_graph(f"{result.checkpoint}.meta")
        with tf.compat.v1.Session() as session:
            saver.restore(session, result.checkpoint)
            name = "InceptionV3/Logits/Conv2d_1c_1x1/weights"
            (head,) = [v for v in tf.compat.v1.global_variables() if v.op.name == name]
            np.testing.assert_array_equal(session.run(head), checkpoint_tensors(result.checkpoint)[name])


@pytest.mark.slow
def test_training_mixed_7_also_changes_those_blocks_and_nothing_below(mixed_7_run, checkpoint_values):
    # The run starts from the head run, whose layers outside the head are the stand-in checkpoint's, bit for
    # bit (the head test asserts it): everything outside the trained scopes must still be exactly those.
    # Its Logits layer is already trained, so the blocks get a gradient from the first step.
    result, _ = mixed_7_run
    final = checkpoint_tensors(result.checkpoint)
    scopes = model.PRESETS["mixed_7"]
    for name in final:
        if name in checkpoint_values and not model.in_scopes(name, scopes):
            assert np.array_equal(final[name], checkpoint_values[name]), name
    mixed_7 = {n for n in checkpoint_values if model.in_scopes(n, scopes[2:])}
    changed = _changed(checkpoint_values, final)
    assert any("Mixed_7a" in n for n in mixed_7) and any("Mixed_7c" in n for n in mixed_7)
    # Every variable of the three blocks moved: the trained ones (weights and batch-norm betas) by the
    # optimizer, the batch-norm moving statistics by their updates (frozen below, as asserted above).
    assert {n for n in mixed_7 if n.endswith("/weights")} <= changed
    assert {n for n in mixed_7 if "moving_" not in n} <= changed
    assert {n for n in mixed_7 if "moving_" in n} <= changed


def _train_args(dataset, train_dir, checkpoint, *extra) -> list[str]:
    return ["train", "--dataset", str(dataset), "--train-dir", str(train_dir), "--checkpoint", str(checkpoint),
            *FAST, *extra]  # fmt: skip


# Dropout stays on, so resume must replay its masks; the whole network runs each step (no feature cache),
# so the stop lands mid-run and batch norm, the reader and the optimizer state all have to come back.
RESUMABLE = ["--steps", "14", "--save-every", "2", "--feature-cache", "off"]


@pytest.fixture(scope="module")
def straight_run(dataset, standin_checkpoint, tmp_path_factory) -> Path:
    """The run the stopped ones must end up equal to: the same command, never stopped, except that it saves
    at its end alone (--save-every 14, given last, wins). Saving changes nothing a run computes, so the
    stopped runs must match it all the same."""
    train_dir = tmp_path_factory.mktemp("straight") / "run"
    straight = run_cli(*_train_args(dataset, train_dir, standin_checkpoint, *RESUMABLE, "--save-every", "14"))
    assert straight.returncode == 0, straight.stderr
    return train_dir


def _stop_when_saved(args, run_dir: Path, step: int, stop) -> tuple[int, str, str]:
    """Runs `finetune ARGS` in a process of its own and sends it ``stop`` once the checkpoint of ``step`` is the
    run's latest: its files and the record naming it (written after them) are both on disk."""
    process = subprocess.Popen([sys.executable, "-m", "finetune", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while not _saved_at_least(run_dir, step):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(stop)
    stdout, stderr = process.communicate(timeout=300)
    return process.returncode, stdout, stderr


def _saved_at_least(run_dir: Path, step: int) -> bool:
    latest = tf.train.latest_checkpoint(str(run_dir)) if run_dir.is_dir() else None
    return latest is not None and _step(latest) >= step


def _step(prefix: str) -> int:
    return int(prefix.rsplit("-", 1)[1])


@pytest.mark.slow
def test_a_run_stopped_by_sigint_then_sigkill_resumes_to_the_same_variables(
    dataset, standin_checkpoint, straight_run, tmp_path
):
    # The stopped runs are processes of their own: the signals are the point. One run is stopped twice:
    # Ctrl-C first (a clean stop with a final save), then, once resumed, SIGKILL (no chance to save).
    stopped = tmp_path / "stopped"
    args = _train_args(dataset, stopped, standin_checkpoint, *RESUMABLE)
    code, stdout, stderr = _stop_when_saved(args, stopped, 4, signal.SIGINT)
    assert code == 130, stderr
    assert stdout.startswith("interrupted:")
    interrupted_at = tf.train.latest_checkpoint(str(stopped))
    assert interrupted_at and _step(interrupted_at) < 14
    assert Path(f"{interrupted_at}.meta").exists()  # a stopped run's last checkpoint has its graph too

    # Resumed, it must write a checkpoint of its own (the next even step after the interrupted one) before
    # it is killed.
    after = _step(interrupted_at) + 2 - _step(interrupted_at) % 2
    code, _, stderr = _stop_when_saved(args, stopped, after, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert f"resuming from {interrupted_at}" in stderr
    killed_at = tf.train.latest_checkpoint(str(stopped))
    assert killed_at and _step(interrupted_at) < _step(killed_at) < 14

    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {killed_at}" in resumed.stderr
    a = checkpoint_tensors(tf.train.latest_checkpoint(str(straight_run)))
    b = checkpoint_tensors(tf.train.latest_checkpoint(str(stopped)))
    assert a.keys() == b.keys() and int(a["global_step"]) == int(b["global_step"]) == 14
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.slow
def test_two_cpu_towers_match_one_device(dataset, standin_checkpoint, tmp_path):
    # Logits alone (no aux head, so no batch norm in training mode) and no dropout: two towers of 4 then
    # compute exactly the averaged gradient of one batch of 8, up to float summation order.
    # The cached path runs on one device, so it is turned off: towers are what this compares.
    common = dict(trainable="Logits", dropout_keep=1.0, steps=5, feature_cache="off")
    one = train(_config(dataset, tmp_path / "one", standin_checkpoint, device="cpu", **common))
    two = train(_config(dataset, tmp_path / "two", standin_checkpoint, device="cpu:2", **common))
    assert two.devices == ("/cpu:0", "/cpu:1")
    a, b = checkpoint_tensors(one.checkpoint), checkpoint_tensors(two.checkpoint)
    weights = "InceptionV3/Logits/Conv2d_1c_1x1/weights"
    assert not np.array_equal(a[weights], np.zeros_like(a[weights]))
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.slow
def test_a_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(dataset, standin_checkpoint, tmp_path):
    result = run_cli(*_train_args(dataset, tmp_path / "run", standin_checkpoint, "--steps", "30",
                                  "--optimizer", "sgd", "--learning-rate", "1e12", "--save-every", "1"))  # fmt: skip
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the loss became") and "lower --learning-rate (it was 1e+12)" in last
    bad_step = int(last.split(" at step ")[1].split(";")[0])
    kept = tf.train.latest_checkpoint(str(tmp_path / "run"))
    assert kept is None or int(kept.rsplit("-", 1)[1]) == bad_step - 1
    assert "Traceback" not in result.stderr


def test_missing_inputs_are_reported_before_tensorflow_works(dataset, standin_checkpoint, tmp_path, capsys):
    from finetune import cli

    junk = tmp_path / "notes.ckpt"
    junk.write_text("not a checkpoint")

    cases = [
        (["--dataset", str(tmp_path / "nope")], "--dataset"),
        (["--checkpoint", str(tmp_path / "missing.ckpt")], "run `finetune download`"),
        (["--trainable", "Mixed_9"], "--trainable: unknown scope 'Mixed_9'"),
        (["--image-size", "60"], "--image-size 60 is out of range"),
        (["--device", "cpu:3", "--batch-size", "8"], "--batch-size 8 does not split evenly over 3 devices"),
        (["--learning-rate", "-1"], "--learning-rate -1.0: must be positive"),
        (["--checkpoint", str(junk)], "not a readable TensorFlow checkpoint"),
    ]
    for extra, message in cases:
        args = ["train", "--dataset", str(dataset), "--checkpoint", str(standin_checkpoint),
                "--train-dir", str(tmp_path / "run"), *extra]  # fmt: skip
        code = cli.main(args)  # in-process: the same main() the console script runs
        stderr = capsys.readouterr().err
        assert code == 1, (extra, stderr)
        assert stderr.startswith("error: ") and message in stderr, stderr
        assert len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_train_dir_for_another_dataset_is_refused_unless_overwrite(dataset, head_run, standin_checkpoint, tmp_path):
    import shutil

    from finetune.synthetic import make_image_folder

    # A copy of the module's head run stands in for a first run on `dataset` (checkpoint paths are relative).
    shutil.copytree(head_run[1], tmp_path / "run")
    first = str(tmp_path / "run" / Path(head_run[0].checkpoint).name)
    assert tf.train.latest_checkpoint(str(tmp_path / "run")) == first
    make_image_folder(tmp_path / "other", num_classes=2, images_per_class=8, seed=1, min_side=90, max_side=120)
    built = run_cli("build-dataset", str(tmp_path / "other"), "--out", str(tmp_path / "other-ds"),
                    "--validation-fraction", "0.25", "--workers", "1")  # fmt: skip
    assert built.returncode == 0, built.stderr
    with pytest.raises(FinetuneError, match="holds a run with another dataset fingerprint"):
        train(_config(tmp_path / "other-ds", tmp_path / "run", standin_checkpoint, steps=1))
    assert tf.train.latest_checkpoint(str(tmp_path / "run")) == first
    again = train(_config(tmp_path / "other-ds", tmp_path / "run", standin_checkpoint, steps=1, overwrite=True))
    assert again.start_step == 0 and again.global_step == 1
    assert json.loads((tmp_path / "run" / "config.json").read_text())["classes"] == ["discs", "squares"]


@pytest.mark.slow
def test_two_phase_recipe_builds_on_the_first_train_dir(dataset, head_run, mixed_7_run, tmp_path):
    head, head_dir = head_run
    deeper, deeper_dir = mixed_7_run
    plan = json.loads((deeper_dir / "config.json").read_text())
    # The head trained on cached features (the default for logits), which leaves no aux head: that part
    # starts fresh, the Logits layer comes from the first run.
    assert plan["exclude_scopes"] == ["InceptionV3/AuxLogits"]
    assert plan["checkpoint"] == str(Path(head.checkpoint).resolve())
    assert plan["learning_rate"] == 0.0001  # adam's mixed_7 default, a tenth of the head's
    # The trained Logits layer came along: two adam steps at 1e-4 move it by at most about 2e-4, while the
    # first run moved it from zero by far more.
    name = "InceptionV3/Logits/Conv2d_1c_1x1/weights"
    first, second = checkpoint_tensors(head.checkpoint)[name], checkpoint_tensors(deeper.checkpoint)[name]
    assert np.abs(first).max() > 5e-3 and np.abs(second - first).max() < 5e-4
    # A head-only run from the first one (the cached path again) also starts from its trained head, not
    # from zero: one adam step at 1e-3 moves a weight by about 1e-3 at most.
    again = train(_config(dataset, tmp_path / "again", head_dir, steps=1))
    assert json.loads((tmp_path / "again" / "config.json").read_text())["feature_cache"] is True
    third = checkpoint_tensors(again.checkpoint)[name]
    assert np.abs(third - first).max() < 2e-3


@pytest.mark.slow
def test_run_records_config_and_tensorboard_scalars(head_run, standin_checkpoint):
    result, train_dir = head_run  # validated every 20 of its 40 steps, with --class-weights auto
    plan = json.loads((train_dir / "config.json").read_text())
    assert plan["dataset_fingerprint"] and plan["classes"] == ["discs", "squares", "triangles"]
    assert plan["checkpoint"] == str(standin_checkpoint.resolve())
    assert plan["exclude_scopes"] == list(model.HEAD_SCOPES) and plan["augment"] is False
    assert plan["class_weights"] and len(plan["class_weights"]) == 3
    tags = {}
    for events in train_dir.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(events)):
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(event.step)
    assert {"loss", "accuracy", "learning_rate", "validation_accuracy"} <= tags.keys()
    assert tags["validation_accuracy"] == [20, 40]
    assert 0 <= result.validation_accuracy <= 1


def test_class_weights_and_the_imbalance_warning():
    weights = auto_class_weights([40, 10, 10])
    assert weights == pytest.approx((0.5, 2.0, 2.0))  # inverse frequency, averaging 1 over the examples
    # Averaging 1 over the examples holds for any counts, not just those above (where it follows from them).
    uneven = [37, 12, 5]
    assert sum(w * c for w, c in zip(auto_class_weights(uneven), uneven)) == pytest.approx(sum(uneven))
    assert imbalance_warning((40, 10, 13), weighted=False) == (
        "classes are imbalanced: the largest has 40 training examples, the smallest 10; "
        "consider --class-weights auto"
    )
    assert imbalance_warning((40, 10, 13), weighted=True).endswith("the smallest 10")
    assert imbalance_warning((30, 10, 13), weighted=False) is None
