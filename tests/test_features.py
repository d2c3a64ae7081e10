"""The feature cache: the head trained on cached features equals the head trained through the network, the
checkpoint it writes works everywhere, and the cache recomputes exactly what changed."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from finetune import features, model
from finetune.compat import tf
from finetune.config import EvaluateConfig, ExportConfig, TrainConfig
from finetune.errors import FinetuneError
from finetune.evaluate import evaluate
from finetune.train import train
from tests.conftest import run_cli

HEAD = "InceptionV3/Logits/Conv2d_1c_1x1"


@pytest.fixture(scope="module")
def photos_and_dataset(tmp_path_factory):
    from finetune.synthetic import make_image_folder

    root = tmp_path_factory.mktemp("cache-data")
    make_image_folder(root / "photos", num_classes=3, images_per_class=16, seed=21, min_side=90, max_side=150,
                      png_fraction=0.0)  # fmt: skip
    result = run_cli("build-dataset", str(root / "photos"), "--out", str(root / "ds"),
                     "--validation-fraction", "0.25", "--workers", "1")  # fmt: skip
    assert result.returncode == 0, result.stderr
    return root


def _config(root, standin, name, **overrides) -> TrainConfig:
    settings = dict(dataset=str(root / "ds"), train_dir=str(root / name), checkpoint=str(standin),
                    image_size=75, batch_size=8, steps=6, eval_every=3, cache_dir=str(root / "cache"))  # fmt: skip
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.mark.slow
def test_a_file_name_that_is_not_utf8_trains_on_the_cached_path(photos_and_dataset, standin_checkpoint, tmp_path):
    photos = tmp_path / "photos"
    shutil.copytree(photos_and_dataset / "photos", photos)
    image = next((photos / "discs").iterdir())
    os.rename(bytes(image), os.path.join(os.fsencode(image.parent), b"caf\xe9.jpg"))  # Latin-1, as old cameras
    dataset = tmp_path / "ds"
    # All in the train split: the renamed file is cached and looked up by its name, then evaluated and reported.
    result = run_cli("build-dataset", str(photos), "--out", str(dataset), "--workers", "1",
                     "--validation-fraction", "0")  # fmt: skip
    assert result.returncode == 0, result.stderr
    trained = train(_config(photos_and_dataset, standin_checkpoint, "latin1", dataset=str(dataset),
                            train_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), eval_every=0,
                            feature_cache="on", steps=2))  # fmt: skip
    assert trained.status == "completed" and trained.feature_cache["computed"] == 48
    evaluation = evaluate(EvaluateConfig(train_dir=str(tmp_path / "run"), split="train"))
    assert "discs/caf\ufffd.jpg" in [p.path for p in evaluation.predictions]


def _tensor(checkpoint, name):
    return tf.compat.v1.train.NewCheckpointReader(checkpoint).get_tensor(name)


CACHED_SIZE = 107  # the full path trains the aux head too, which must not change the Logits layer's path


@pytest.fixture(scope="module")
def full_and_cached(photos_and_dataset, standin_checkpoint):
    """The same short run through the network and on cached features; the cached one is also evaluated and
    exported below."""
    root = photos_and_dataset
    # The same rate on both; one validation pass, at the end (passes do not touch training, and the accuracies
    # compared are the last pass's), instead of four that each keep a best checkpoint.
    common = dict(image_size=CACHED_SIZE, steps=12, eval_every=12, dropout_keep=1.0, lr_search="off")
    full = train(_config(root, standin_checkpoint, "full", feature_cache="off", **common))
    cached = train(_config(root, standin_checkpoint, "cached", feature_cache="on", **common))
    return full, cached


@pytest.mark.slow
def test_head_on_cached_features_matches_the_head_trained_through_the_network(full_and_cached):
    full, cached = full_and_cached
    assert full.feature_cache is None and cached.feature_cache["computed"] > 0
    for name in (f"{HEAD}/weights", f"{HEAD}/biases"):
        a, b = _tensor(full.checkpoint, name), _tensor(cached.checkpoint, name)
        assert np.abs(a).max() > 1e-4  # it trained: the head started at zero
        # Same batches, same optimizer; only float summation order differs (the network's 1x1 conv against
        # the cached path's matmul, features computed at another batch size). The largest difference seen
        # here was 1.2e-7 on weights of about 1e-2; 1e-5 leaves room for other CPUs' kernels.
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5, err_msg=name)
    assert cached.validation_accuracy == full.validation_accuracy


@pytest.mark.slow
def test_cached_checkpoint_predicts_like_the_cached_head_through_evaluate_and_export(
    photos_and_dataset, standin_checkpoint, full_and_cached, tmp_path
):
    root = photos_and_dataset
    result = full_and_cached[1]
    # The cache-trained head applied by hand to the cached validation features...
    digest = features.backbone_digest(str(standin_checkpoint))
    cache = features.FeatureCache(root / "cache", digest, CACHED_SIZE)
    from finetune.dataset import load_dataset

    examples = features.scan_split(load_dataset(root / "ds"), "validation")
    cached = cache.get([features.entry_key(e.image_sha256, None, 0) for e in examples])
    weights = _tensor(result.checkpoint, f"{HEAD}/weights")[0, 0]
    logits = cached @ weights + _tensor(result.checkpoint, f"{HEAD}/biases")
    by_hand = np.exp(logits - logits.max(1, keepdims=True))
    by_hand /= by_hand.sum(1, keepdims=True)
    # ...equals evaluate on the whole-network checkpoint, and the exported graph.
    # The checkpoint written at the end, not the best validation pass's, which evaluate would take by default.
    # No HTML report: its Grad-CAM maps are not under test here and would add a gradient pass to each.
    evaluation = evaluate(EvaluateConfig(train_dir=str(root / "cached"), checkpoint="newest", html=False))
    assert [p.path for p in evaluation.predictions] == [e.path.decode() for e in examples]
    assert [p.predicted for p in evaluation.predictions] == [evaluation.classes[i] for i in by_hand.argmax(1)]
    np.testing.assert_allclose([p.confidence for p in evaluation.predictions], by_hand.max(1), atol=1e-5)
    from finetune.export import export

    exported = export(ExportConfig(train_dir=str(root / "cached"), out=str(tmp_path / "m.pb"),
                                   checkpoint="newest"))
    from_pb = evaluate(EvaluateConfig(model=exported.model, dataset=str(root / "ds"), html=False))
    assert [p.predicted for p in from_pb.predictions] == [p.predicted for p in evaluation.predictions]


def _extract(dataset_dir, checkpoint_path, image_size, cache_dir) -> features.ExtractionReport:
    """Fills the cache for both splits, as `finetune train` does on the cached path."""
    from finetune.dataset import load_dataset

    info = load_dataset(dataset_dir)
    checkpoint = model.open_checkpoint(checkpoint_path)
    cache = features.FeatureCache(cache_dir, features.backbone_digest(checkpoint.path), image_size)
    examples = {split: features.scan_split(info, split) for split in ("train", "validation")}
    jobs = [("train", None), ("validation", None)]
    return features.extract(cache, info, checkpoint, image_size, examples, jobs, 0, "/cpu:0", None)


def _edit_checkpoint(source, target, scope):
    """A V1 copy of the checkpoint in which the first weights under `scope` are nudged by 0.01.

    Written by the V1 save op directly (the same bytes a V1 Saver writes for these values), without a graph
    holding 100 MB of constants, which took ten times longer."""
    reader = tf.compat.v1.train.NewCheckpointReader(str(source))
    names = sorted(reader.get_variable_to_shape_map())
    edited = next(n for n in names if n.startswith(scope + "/") and n.endswith("/weights"))
    target.parent.mkdir(parents=True)
    values = [reader.get_tensor(n) + (0.01 if n == edited else 0) for n in names]
    tf.raw_ops.Save(filename=str(target), tensor_names=names, data=values)


@pytest.mark.slow
def test_cache_recomputes_exactly_what_changed(photos_and_dataset, standin_checkpoint, tmp_path):
    root = photos_and_dataset
    cache = tmp_path / "cache"
    total = sum(json.loads((root / "ds" / "dataset.json").read_text())["split_counts"].values())

    def counts(report):
        return report.computed, report.reused

    assert counts(_extract(root / "ds", standin_checkpoint, 75, cache)) == (total, 0)
    # A part left half-written by an interrupted run is never read.
    group = next(p for p in cache.iterdir() if p.is_dir())
    (group / ".part-interrupted.npz.tmp").write_bytes(b"PK\x03\x04 half a zip")
    assert counts(_extract(root / "ds", standin_checkpoint, 75, cache)) == (0, total)
    # Another image size: every entry again.
    assert counts(_extract(root / "ds", standin_checkpoint, 80, cache)) == (total, 0)
    # One image's bytes: that entry alone.
    photos = tmp_path / "photos"
    shutil.copytree(root / "photos", photos)
    changed = sorted(photos.rglob("*.jpg"))[0]
    from PIL import Image

    with Image.open(changed) as image:
        image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(changed, quality=90)
    rebuilt = run_cli("build-dataset", str(photos), "--out", str(tmp_path / "ds"), "--validation-fraction", "0.25",
                      "--workers", "1")  # fmt: skip
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert counts(_extract(tmp_path / "ds", standin_checkpoint, 75, cache)) == (1, total - 1)
    # The checkpoint's bytes: a changed head reuses everything, a changed backbone recomputes everything.
    head_edit, backbone_edit = tmp_path / "head" / "a.ckpt", tmp_path / "backbone" / "a.ckpt"
    _edit_checkpoint(standin_checkpoint, head_edit, model.LOGITS_SCOPE)
    _edit_checkpoint(standin_checkpoint, backbone_edit, "InceptionV3/Mixed_7c")
    assert counts(_extract(root / "ds", head_edit, 75, cache)) == (0, total)
    assert counts(_extract(root / "ds", backbone_edit, 75, cache)) == (total, 0)


@pytest.mark.slow
def test_augmented_views_are_cached_per_image(photos_and_dataset, standin_checkpoint, tmp_path):
    root = photos_and_dataset
    counts = json.loads((root / "ds" / "dataset.json").read_text())["split_counts"]
    result = run_cli("train", "--dataset", str(root / "ds"), "--train-dir", str(tmp_path / "run"),
                     "--checkpoint", str(standin_checkpoint), "--image-size", "75", "--batch-size", "8",
                     "--steps", "4", "--augment-views", "2", "--cache-dir", str(tmp_path / "cache"), "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)["feature_cache"]
    assert report["computed"] == 2 * counts["train"] + counts["validation"]
    assert "feature cache: on (only the head trains, 2 augmented views per image" in result.stderr
    plan = json.loads((tmp_path / "run" / "config.json").read_text())
    assert plan["augment"] is True and plan["augment_views"] == 2


def test_the_summary_says_which_path_and_why(photos_and_dataset, standin_checkpoint, tmp_path):
    root = photos_and_dataset
    deeper = run_cli("train", "--dataset", str(root / "ds"), "--train-dir", str(tmp_path / "run"),
                     "--checkpoint", str(standin_checkpoint), "--image-size", "75", "--trainable", "mixed_7",
                     "--feature-cache", "on")  # fmt: skip
    assert deeper.returncode == 1
    assert deeper.stderr.strip() == (
        "error: --feature-cache on: the trainable layers reach below the head, so the features change as it "
        "trains; use --trainable logits without augmentation"
    )
    augmented = run_cli("train", "--dataset", str(root / "ds"), "--train-dir", str(tmp_path / "run"),
                        "--checkpoint", str(standin_checkpoint), "--image-size", "75", "--augment",
                        "--feature-cache", "on")  # fmt: skip
    assert augmented.returncode == 1 and "augmentation is on; --augment-views K" in augmented.stderr
    with pytest.raises(FinetuneError, match="^--augment-views 2: caches augmented views"):
        TrainConfig(dataset="d", train_dir="t", augment=False, augment_views=2)
