"""The split never refuses a class that can be split, moves little when a folder grows, and keeps copies together."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune import dataset
from finetune.config import BuildDatasetConfig
from finetune.errors import EmptySplitError
from finetune.synthetic import make_image_folder


def _splits_of(out: Path) -> dict[str, str]:
    """path -> split, from the records themselves."""
    from finetune.compat import tf

    found = {}
    for shard in sorted(out.glob("*.tfrecord")):
        for record in tf.compat.v1.io.tf_record_iterator(str(shard)):
            path = tf.train.Example.FromString(record).features.feature["image/filename"].bytes_list.value[0]
            found[path.decode()] = shard.name.split("-")[0]
    return found


def _build(photos: Path, out: Path, **options) -> dict:
    dataset.build_dataset(BuildDatasetConfig(image_dir=str(photos), out=str(out), workers=1, **options))
    return json.loads((out / "dataset.json").read_text())


def _classes_of_sizes(root: Path, sizes: range, seed: int = 0, prefix: str = "") -> Path:
    """Class folders c02, c03, ... holding that many small generated JPEGs each."""
    made = make_image_folder(root / "tmp", num_classes=len(sizes), images_per_class=max(sizes), seed=seed,
                             min_side=75, max_side=90, png_fraction=0)  # fmt: skip
    for size, name in zip(sizes, made.classes):
        folder = root / f"c{size:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for path in made.files[name][:size]:
            path.rename(folder / f"{prefix}{path.name}")
    shutil.rmtree(root / "tmp")
    return root


@pytest.fixture(scope="module")
def small_classes(tmp_path_factory) -> Path:
    return _classes_of_sizes(tmp_path_factory.mktemp("small") / "photos", range(2, 21))


def test_every_class_of_2_to_20_images_gets_a_validation_image_at_fraction_0_1(small_classes, tmp_path):
    meta = _build(small_classes, tmp_path / "a", validation_fraction=0.1)
    assert meta["version"] == dataset.FORMAT_VERSION
    assert all(count >= 1 for count in meta["class_counts"]["validation"]), meta["class_counts"]
    assert all(count >= 1 for count in meta["class_counts"]["train"]), meta["class_counts"]
    # At 0.1 most of these classes have no image below the fraction: the tool promoted one, and says which.
    promoted = meta["split"]["promoted"]
    assert promoted and all(row["to"] == "validation" for row in promoted)
    assert max(Counter(row["class"] for row in promoted).values()) == 1  # one per class and split
    again = _build(small_classes, tmp_path / "b", validation_fraction=0.1)
    assert again["fingerprint"] == meta["fingerprint"]  # the same seed, the same split
    other = _build(small_classes, tmp_path / "c", validation_fraction=0.1, seed=7)
    assert other["fingerprint"] != meta["fingerprint"]


def test_with_a_test_split_every_class_of_3_or_more_gets_one_of_each_and_2_is_named(small_classes, tmp_path):
    shutil.copytree(small_classes, tmp_path / "photos")
    with pytest.raises(EmptySplitError, match=r"'c02' has 2 images.*at least 3.*--test-fraction 0"):
        _build(tmp_path / "photos", tmp_path / "refused", validation_fraction=0.1, test_fraction=0.1)
    assert not (tmp_path / "refused").exists()
    shutil.rmtree(tmp_path / "photos" / "c02")
    meta = _build(tmp_path / "photos", tmp_path / "out", validation_fraction=0.1, test_fraction=0.1)
    for split in dataset.SPLITS:
        assert all(count >= 1 for count in meta["class_counts"][split]), (split, meta["class_counts"])


def test_adding_10_images_to_each_class_moves_only_promoted_images(small_classes, tmp_path):
    photos = tmp_path / "photos"
    shutil.copytree(small_classes, photos)
    before = _build(photos, tmp_path / "before", validation_fraction=0.1)
    old = _splits_of(tmp_path / "before")
    folders = sorted(photos.iterdir())
    more = make_image_folder(tmp_path / "more", num_classes=len(folders), images_per_class=10, seed=99,
                             min_side=75, max_side=90, png_fraction=0)  # fmt: skip
    for folder, name in zip(folders, more.classes):
        for path in more.files[name]:
            path.rename(folder / f"new_{path.name}")
    after = _build(photos, tmp_path / "after", validation_fraction=0.1)
    new_splits = _splits_of(tmp_path / "after")
    moved = {path for path, split in old.items() if new_splits[path] != split}
    allowed = {row["path"] for row in before["split"]["promoted"] + after["split"]["promoted"]}
    assert moved <= allowed, sorted(moved - allowed)
    assert moved  # the promoted images of the small classes do go back once the classes grow
    for meta in (before, after):
        per_class_split = Counter((row["class"], row["to"]) for row in meta["split"]["promoted"])
        assert max(per_class_split.values()) == 1


def test_split_units_gives_every_splittable_class_every_split():
    rng = np.random.default_rng(0)
    config = BuildDatasetConfig(image_dir="x", out="y", validation_fraction=0.1, test_fraction=0.1)
    for trial in range(200):
        sizes = rng.integers(3, 25, size=4)
        labels = [[label] for label, size in enumerate(sizes) for _ in range(size)]
        positions = rng.random(len(labels)).tolist()
        splits, promotions = dataset.split_units(positions, labels, len(sizes), config)
        for label in range(len(sizes)):
            held = Counter(split for split, unit in zip(splits, labels) if unit == [label])
            assert set(held) == {"train", "validation", "test"}, (trial, label, held)
        natural = [dataset._split_of(p, 0.1, 0.1) for p in positions]
        changed = {unit for unit, (a, b) in enumerate(zip(natural, splits)) if a != b}
        assert changed == set(promotions)
        assert (splits, promotions) == dataset.split_units(positions, labels, len(sizes), config)


# ------------------------------------------------------------------------------------------ near-duplicates

COPIES = ("half", "jpeg60", "crop5", "png", "grey")


def _copy(image: Image.Image, kind: str, path_stem: Path) -> Path:
    width, height = image.size
    if kind == "half":
        path = path_stem.with_suffix(".jpg")
        image.resize((width // 2, height // 2), Image.Resampling.BILINEAR).save(path, quality=90)
    elif kind == "jpeg60":
        path = path_stem.with_suffix(".jpg")
        image.save(path, quality=60)
    elif kind == "crop5":  # 5% off the width and the height, from the top-left corner
        path = path_stem.with_suffix(".jpg")
        image.crop((round(width * 0.05), round(height * 0.05), width, height)).save(path, quality=90)
    elif kind == "png":
        path = path_stem.with_suffix(".png")
        image.save(path)
    else:
        path = path_stem.with_suffix(".jpg")
        image.convert("L").save(path, quality=90)
    return path


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """200 distinct generated images in 4 classes, plus 20 more each with 5 copies scattered over the classes."""
    root = tmp_path_factory.mktemp("near") / "photos"
    distinct = make_image_folder(root, num_classes=4, images_per_class=50, seed=21, min_side=75, max_side=140,
                                 png_fraction=0.2)  # fmt: skip
    originals = make_image_folder(root.parent / "originals", num_classes=4, images_per_class=5, seed=22,
                                  min_side=150, max_side=240, png_fraction=0)  # fmt: skip
    families = []
    classes = list(distinct.classes)
    for number, source in enumerate(path for paths in originals.files.values() for path in paths):
        image = Image.open(source).convert("RGB")
        home = root / classes[number % 4]
        original = home / f"original_{number:02d}.jpg"
        image.save(original, quality=90)
        family = {original.relative_to(root).as_posix()}
        for index, kind in enumerate(COPIES):
            # Copies land in other classes' folders and in nested folders too.
            folder = root / classes[(number + index + 1) % 4] / ("sub" if index % 2 else "")
            folder.mkdir(parents=True, exist_ok=True)
            family.add(_copy(image, kind, folder / f"{kind}_{number:02d}").relative_to(root).as_posix())
        families.append(family)
    return root, families


def test_planted_near_duplicates_are_grouped_into_one_split_and_distinct_images_are_not(planted, tmp_path):
    root, families = planted
    meta = _build(root, tmp_path / "ds", validation_fraction=0.2)
    near = meta["near_duplicates"]
    assert near["checked"] and near["threshold_bits"] >= 1
    groups = [set(group["paths"]) for group in near["groups"]]
    found = sum(1 for family in families if family in groups)
    assert found >= 19, [sorted(f) for f in families if f not in groups]
    # No false group: every group is (part of) one planted family; the 200 distinct images are in none.
    for group in groups:
        assert any(group <= family for family in families), sorted(group)
    for group in near["groups"]:
        assert all(distance <= near["threshold_bits"] for _, _, distance in group["pairs"])
    splits = _splits_of(tmp_path / "ds")
    for family in families:
        if family in groups:
            assert len({splits[path] for path in family}) == 1, sorted(family)


def test_near_duplicates_off_leaves_copies_to_their_own_hash(planted, tmp_path):
    root, families = planted
    meta = _build(root, tmp_path / "ds", validation_fraction=0.2, near_duplicates="off")
    assert meta["near_duplicates"] == {"checked": False, "groups": [], "files": 0}
    splits = _splits_of(tmp_path / "ds")
    assert any(len({splits[path] for path in family}) > 1 for family in families)
