"""Balanced sampling, weight averaging (EMA) and test-time augmentation, on small real runs.

One imbalanced dataset (3 classes, 75-pixel images) serves every test here; the EMA and TTA tests share one
short trained run with --ema.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

from finetune import cli
from finetune.config import TrainConfig
from finetune.errors import FinetuneError

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
