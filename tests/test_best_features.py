"""Balanced sampling, weight averaging (EMA) and test-time augmentation, on small real runs.

One imbalanced dataset (3 classes, 75-pixel images) serves every test here; the EMA and TTA tests share one
short trained run with --ema.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from finetune import cli
from finetune.config import TrainConfig
from finetune.errors import FinetuneError
from tests.conftest import run_frozen_graph

CLASS_SIZES = (24, 8, 4)  # images per class before the split: 6:1


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory) -> Path:
    """A built dataset whose training split is imbalanced about 6:1."""
    from finetune.synthetic import make_image_folder

    root = tmp_path_factory.mktemp("imbalanced")
    make_image_folder(root / "photos", num_classes=len(CLASS_SIZES), images_per_class=max(CLASS_SIZES), seed=5,
                      min_side=80, max_side=110, png_fraction=0.0)  # fmt: skip
    for folder, keep in zip(sorted((root / "photos").iterdir()), CLASS_SIZES):
        for extra in sorted(folder.iterdir())[keep:]:
            extra.unlink()
    assert cli.main(["build-dataset", str(root / "photos"), "--out", str(root / "ds"),
                     "--validation-fraction", "0.25", "--workers", "1"]) == 0  # fmt: skip
    return root / "ds"


def _config(dataset: Path, train_dir: Path, checkpoint, **overrides) -> TrainConfig:
    settings = dict(dataset=str(dataset), train_dir=str(train_dir), checkpoint=str(checkpoint), image_size=75,
                    batch_size=4, steps=12, lr_search="off", warmup_epochs=0)  # fmt: skip
    settings.update(overrides)
    return TrainConfig(**settings)


def _labels_drawn(built, steps: int) -> np.ndarray:
    """The labels of the batches the training graph's first ``steps`` steps train on, in order."""
    from finetune.compat import tf

    with built.graph.as_default(), tf.compat.v1.Session() as session:
        built.initialize(session)
        return np.concatenate([session.run(built.labels) for _ in range(steps)])


# ------------------------------------------------------------------------------------------ balanced sampling


@pytest.mark.slow
def test_balanced_sampling_draws_each_class_equally_often_per_epoch_on_both_paths(imbalanced, tmp_path):
    from finetune.cached import FeatureTables, build_cached_graph
    from finetune.dataset import load_dataset
    from finetune.graph import build_network_graph
    from finetune.plan import plan_training

    info = load_dataset(imbalanced)
    counts = info.class_counts["train"]
    total = sum(counts)
    assert max(counts) >= 4 * min(counts) > 0, counts
    plan = plan_training(_config(imbalanced, tmp_path / "run", "none", sampling="balanced", feature_cache="off"))
    epochs, batch = 3, plan.batch_size
    steps = -(-epochs * total // batch)
    drawn = _labels_drawn(build_network_graph(plan, 0), steps)  # the records path: decoded images' labels
    for epoch in range(epochs):
        per_class = np.bincount(drawn[epoch * total:(epoch + 1) * total], minlength=len(counts))
        assert per_class.max() - per_class.min() <= 1, (epoch, per_class)
    # Deterministic for a seed, and a resumed run's stream goes on exactly where it was (as the graph reads it).
    assert np.array_equal(_stream_labels(info, plan, skip=3 * batch, count=len(drawn) - 3 * batch), drawn[3 * batch:])
    natural = _stream_labels(info, dataclasses.replace(plan, sampling="natural"), skip=0, count=total)
    assert np.array_equal(np.bincount(natural, minlength=len(counts)), counts)

    # The cached-features path: the rows it gathers come in the same class sequence (features are zeros
    # here: only the order is under test).
    labels = np.array([info.classes.index(p.split("/")[0]) for p in _file_order_paths(info)], np.int64)
    tables = FeatureTables(train=np.zeros((total, 1, 2048), np.float32), train_labels=labels,
                           train_paths=[b""] * total, records_per_file=_records_per_file(info),
                           validation=None, validation_labels=None, report={})  # fmt: skip
    cached = build_cached_graph(dataclasses.replace(plan, feature_cache=True), 0, tables)
    assert np.array_equal(_labels_drawn(cached, steps), drawn)


def _stream_labels(info, plan, skip: int, count: int) -> np.ndarray:
    from finetune.compat import tf
    from finetune.dataset import record_stream

    spec = {"image/class/label": tf.io.FixedLenFeature([], tf.int64)}
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        tf.compat.v1.set_random_seed(plan.seed)  # as the training graph does
        stream = record_stream(info, "train", shuffle=True, repeat=True, seed=plan.seed, skip=skip,
                               sampling=plan.sampling)  # fmt: skip
        labels = stream.map(lambda r, _: tf.io.parse_single_example(r, spec)["image/class/label"]).batch(count)
        return session.run(tf.compat.v1.data.make_one_shot_iterator(labels).get_next())


def _file_order_paths(info) -> list[str]:
    from finetune.compat import tf

    spec = {"image/filename": tf.io.FixedLenFeature([], tf.string)}
    return [tf.io.parse_single_example(r, spec)["image/filename"].numpy().decode()
            for shard in info.files("train") for r in tf.data.TFRecordDataset(str(shard))]  # fmt: skip


def _records_per_file(info) -> list[int]:
    from finetune.compat import tf

    return [sum(1 for _ in tf.data.TFRecordDataset(str(shard))) for shard in info.files("train")]


def test_balanced_sampling_with_class_weights_warns_once_and_a_resume_keeps_the_sampling(imbalanced, tmp_path):
    from finetune.plan import plan_training
    from finetune.train import _check_resumed_settings, _start_warnings

    config = _config(imbalanced, tmp_path / "run", "none", sampling="balanced", class_weights="auto")
    plan = plan_training(config)
    said = [w for w in _start_warnings(plan, config, None) if "--sampling balanced" in w]
    assert len(said) == 1 and "--class-weights auto" in said[0]
    from finetune import rundir

    (tmp_path / "run").mkdir()
    rundir.write_run_config(tmp_path / "run", dataclasses.asdict(dataclasses.replace(plan, sampling="natural")))
    with pytest.raises(FinetuneError, match="holds a run with --sampling natural, not balanced"):
        _check_resumed_settings(tmp_path / "run", plan)
    with pytest.raises(FinetuneError, match="--sampling even: unknown"):
        TrainConfig(dataset="d", train_dir="t", sampling="even")


# ------------------------------------------------------------------------------------------- weight averaging

EMA_DECAY, EMA_STEPS = 0.6, 4
HEAD = "InceptionV3/Logits/Conv2d_1c_1x1"  # zeroed at the start of a new run: the trajectory starts at 0


@pytest.fixture(scope="module")
def ema_run(imbalanced, standin_checkpoint, tmp_path_factory):
    """A short cached-head run with --ema, every step saved, validated every 2 steps (selected by loss)."""
    from finetune.train import train

    train_dir = tmp_path_factory.mktemp("ema") / "run"
    config = _config(imbalanced, train_dir, standin_checkpoint, steps=EMA_STEPS, ema=EMA_DECAY, save_every=1,
                     keep_checkpoints=EMA_STEPS + 1, eval_every=2, select_by="loss", learning_rate=0.05)  # fmt: skip
    result = train(config)
    assert result.status == "completed"
    return config, train_dir, result


@pytest.fixture(scope="module")
def plain_export(ema_run, tmp_path_factory):
    """The EMA run's best checkpoint exported without calibration: its result and the .pb's path."""
    from finetune.config import ExportConfig
    from finetune.export import export

    path = tmp_path_factory.mktemp("ema-export") / "plain.pb"
    return export(ExportConfig(train_dir=str(ema_run[1]), out=str(path), calibrate=False)), path


def _tensors(checkpoint: str, *names: str) -> list[np.ndarray]:
    from finetune.compat import tf

    reader = tf.compat.v1.train.NewCheckpointReader(checkpoint)
    return [reader.get_tensor(name) for name in names]


def _closed_form_average(trajectory: list[np.ndarray], decay: float) -> np.ndarray:
    """sum over i of w_i * v_i: the start v_0 weighs decay^k, step i's value (1 - decay) * decay^(k - i)."""
    k = len(trajectory) - 1
    weights = [decay**k] + [(1 - decay) * decay ** (k - i) for i in range(1, k + 1)]
    return sum(w * np.asarray(v, np.float64) for w, v in zip(weights, trajectory))


def _check_averages_follow_the_trajectory(train_dir: Path, steps: int, decay: float) -> None:
    for name in (f"{HEAD}/weights", f"{HEAD}/biases"):
        values = [_tensors(str(train_dir / f"model.ckpt-{step}"), name)[0] for step in range(1, steps + 1)]
        (average,) = _tensors(str(train_dir / f"model.ckpt-{steps}"), f"{name}/ExponentialMovingAverage")
        trajectory = [np.zeros_like(values[0])] + values
        assert np.abs(values[-1]).max() > 0, "the head must have moved for the test to mean anything"
        expected = _closed_form_average(trajectory, decay)
        assert np.allclose(average, expected, rtol=1e-5, atol=1e-7), name
        assert not np.allclose(average, values[-1], rtol=1e-3), "the average must differ from the weights"


@pytest.mark.slow
def test_ema_follows_the_closed_form_average_and_validation_judges_it(ema_run):
    from finetune import rundir
    from finetune.cached import cached_features
    from finetune.calibration import negative_log_likelihood
    from finetune.plan import plan_training

    config, train_dir, _ = ema_run
    _check_averages_follow_the_trajectory(train_dir, EMA_STEPS, EMA_DECAY)
    # Each validation pass measured the averaged head: its loss is the averages' loss on the cached features.
    tables = cached_features(plan_training(config))
    for step, loss in rundir.read_best(train_dir).passes:
        weights, biases = _tensors(str(train_dir / f"model.ckpt-{step}"), f"{HEAD}/weights/ExponentialMovingAverage",
                                   f"{HEAD}/biases/ExponentialMovingAverage")  # fmt: skip
        logits = tables.validation @ weights.reshape(2048, -1) + biases
        assert loss == pytest.approx(negative_log_likelihood(logits, tables.validation_labels), rel=1e-4)


@pytest.mark.slow
def test_ema_on_the_network_path(imbalanced, standin_checkpoint, tmp_path):
    from finetune.train import train

    steps = 3
    train(_config(imbalanced, tmp_path / "run", standin_checkpoint, steps=steps, ema=0.5, save_every=1,
                  eval_every=0, feature_cache="off", learning_rate=0.05))  # fmt: skip
    _check_averages_follow_the_trajectory(tmp_path / "run", steps, 0.5)


@pytest.mark.slow
def test_evaluate_and_export_take_the_averaged_weights(ema_run, plain_export):
    from finetune.compat import tf
    from finetune.config import EvaluateConfig
    from finetune.evaluate import evaluate
    from finetune.cached import cached_features
    from finetune.plan import plan_training

    config, train_dir, result = ema_run
    exported, pb = plain_export
    checkpoint = str(train_dir / "best" / f"model.ckpt-{exported.global_step}")
    graph_def = tf.compat.v1.GraphDef.FromString(pb.read_bytes())
    constants = {node.name: tf.make_ndarray(node.attr["value"].tensor) for node in graph_def.node
                 if node.op == "Const" and node.name.startswith(HEAD)}  # fmt: skip
    average, raw = _tensors(checkpoint, f"{HEAD}/weights/ExponentialMovingAverage", f"{HEAD}/weights")
    assert np.array_equal(constants[f"{HEAD}/weights"], average) and not np.allclose(average, raw)
    # evaluate restores the same averages: its predictions are the averaged head's on the cached features.
    evaluation = evaluate(EvaluateConfig(train_dir=str(train_dir), html=False))
    assert evaluation.global_step == result.best_step
    tables = cached_features(plan_training(config))
    (biases,) = _tensors(checkpoint, f"{HEAD}/biases/ExponentialMovingAverage")
    predicted = (tables.validation @ average.reshape(2048, -1) + biases).argmax(1)
    assert [p.predicted for p in evaluation.predictions] == [evaluation.classes[i] for i in predicted]


def test_ema_outside_zero_to_one_is_refused(capsys):
    for value in ("0", "1", "1.5", "-0.1"):
        assert cli.main(["train", "--dataset", "d", "--train-dir", "t", "--ema", value]) == 1
        assert f"error: --ema {float(value)}: must be in (0, 1)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- test-time augmentation


@pytest.mark.slow
def test_tta_flip_averages_the_image_and_its_mirror_in_export_and_evaluate(ema_run, plain_export, tmp_path,
                                                                           capsys):  # fmt: skip
    from finetune.compat import tf
    from finetune.config import EvaluateConfig, ExportConfig
    from finetune.dataset import load_dataset, read_dataset
    from finetune.evaluate import evaluate
    from finetune.export import export
    from finetune.runtimes import open_runner

    config, train_dir, _ = ema_run
    plain_pb, flip_pb = plain_export[1], tmp_path / "flip.pb"
    flip = export(ExportConfig(train_dir=str(train_dir), out=str(flip_pb), calibrate=False, tta="flip",
                               format=("pb", "tflite", "onnx")))  # fmt: skip
    assert flip.tta == "flip"
    import json

    assert json.loads((tmp_path / "flip.json").read_text())["test_time_augmentation"] == "flip"
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:  # the validation images, preprocessed
        batches = read_dataset(load_dataset(config.dataset), "validation", batch_size=100, image_size=75,
                               training=False)  # fmt: skip
        batch = session.run(tf.compat.v1.data.make_one_shot_iterator(batches).get_next())
    images, labels = batch["image"], batch["label"]
    # The plain graph run once on the images and their mirrors together: one import instead of three.
    both = run_frozen_graph(plain_pb, np.concatenate([images, images[:, :, ::-1, :]]))[0]
    plain, mirrored = both[: len(images)], both[len(images):]
    by_hand = (plain + mirrored) / 2
    assert np.allclose(run_frozen_graph(flip_pb, images)[0], by_hand, atol=1e-6)
    for kind in ("tflite", "onnx"):  # converted from the `input` path, after which the flip sits
        runner = open_runner(flip.files[kind])
        try:
            assert np.allclose(runner.run(images), by_hand, atol=1e-5), kind
        finally:
            runner.close()
    assert not np.allclose(by_hand, plain, atol=1e-4), "the flip must change something"

    # evaluate: the same pass gives top-1 with the flip and without it.
    plain_top1 = float((plain.argmax(1) == labels).mean())
    flipped = evaluate(EvaluateConfig(train_dir=str(train_dir), html=False, tta="flip"))
    assert flipped.tta == "flip" and flipped.top1_without_tta == pytest.approx(plain_top1)
    assert flipped.top1 == pytest.approx(float((by_hand.argmax(1) == labels).mean()))
    assert cli.main(["evaluate", "--train-dir", str(train_dir), "--tta", "crops", "--no-html"]) == 0
    assert "test-time augmentation crops: top-1 " in capsys.readouterr().out
    report = json.loads((train_dir / "eval-validation.json").read_text())
    assert report["tta"] == "crops" and report["top1_without_tta"] == pytest.approx(plain_top1)


def test_unknown_tta_modes_are_refused():
    from finetune.config import EvaluateConfig, ExportConfig

    with pytest.raises(FinetuneError, match="--tta crops: unknown for export"):
        ExportConfig(train_dir="t", tta="crops")
    with pytest.raises(FinetuneError, match="--tta mirror: unknown"):
        EvaluateConfig(train_dir="t", tta="mirror")
