"""build-dataset, load_dataset and read_dataset on real image files, real TFRecords and real tf.data."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune import dataset
from finetune.compat import tf
from finetune.config import BuildDatasetConfig
from finetune.errors import DataError
from finetune.synthetic import make_image_folder
from tests.conftest import CliResult, read_records, run_cli, slim_keys


@pytest.fixture(scope="module")
def zoo(odd_folder, tmp_path_factory):
    """The odd folder built through the real CLI (in this process), with two worker processes."""
    out = tmp_path_factory.mktemp("built") / "zoo"
    result = run_cli("build-dataset", str(odd_folder.root), "--out", str(out), "--validation-fraction", "0.3",
                     "--workers", "2", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    meta = json.loads((out / "dataset.json").read_text())
    return {"out": out, "cli": result, "summary": json.loads(result.stdout), "meta": meta,
            "records": read_records(out)}  # fmt: skip


def _by_path(records: dict) -> dict[str, tuple[str, dict]]:
    return {record["filename"]: (split, record) for split, rows in records.items() for record in rows}


def _decode(record: dict) -> np.ndarray:
    return tf.io.decode_jpeg(record["encoded"], channels=0).numpy()


# ------------------------------------------------------------------------------------------ the zoo build


def test_zoo_builds_with_every_usable_image_under_its_class(odd_folder, zoo):
    meta, summary = zoo["meta"], zoo["summary"]
    assert meta["classes"] == list(odd_folder.classes) == summary["classes"]
    for label, name in enumerate(odd_folder.classes):
        assert sum(counts[label] for counts in meta["class_counts"].values()) == len(odd_folder.usable[name])
    assert sum(meta["split_counts"].values()) == sum(len(paths) for paths in odd_folder.usable.values())
    assert meta["split_counts"] == summary["split_counts"]
    stored = _by_path(zoo["records"])
    assert sorted(stored) == sorted(path for paths in odd_folder.usable.values() for path in paths)
    for path, (_, record) in stored.items():
        assert record["label"] == odd_folder.classes.index(path.split("/")[0])
    assert (zoo["out"] / "labels.txt").read_text() == "0:discs\n1:squares\n2:triangles\n"


def test_each_bad_file_is_listed_with_its_reason_and_warned_about_once(odd_folder, zoo):
    skipped = {entry["path"]: entry["reason"] for entry in zoo["meta"]["skipped"]}
    assert sorted(skipped) == sorted(odd_folder.skipped)
    for path, word in odd_folder.skipped.items():
        assert word in skipped[path], (path, skipped[path])
    warnings = [line for line in zoo["cli"].stderr.splitlines() if line.startswith("warning: skipped")]
    assert len(warnings) == 1
    assert f"skipped {len(skipped)} of" in warnings[0] and str(zoo["out"] / "dataset.json") in warnings[0]
    assert zoo["summary"]["skipped"] == len(skipped)


def test_hidden_files_and_folders_are_ignored(odd_folder, zoo):
    mentioned = set(_by_path(zoo["records"])) | {entry["path"] for entry in zoo["meta"]["skipped"]}
    assert all((odd_folder.root / path).is_file() for path in odd_folder.hidden)
    assert not mentioned & set(odd_folder.hidden)
    assert not any("/." in path for path in mentioned)


def test_duplicates_share_a_split_and_are_counted(odd_folder, zoo):
    stored = _by_path(zoo["records"])
    first, second = odd_folder.duplicates
    assert stored[first][0] == stored[second][0]
    assert zoo["meta"]["duplicates"] == {"groups": [sorted(odd_folder.duplicates)], "files": 2}
    assert (zoo["summary"]["duplicate_groups"], zoo["summary"]["duplicate_files"]) == (1, 2)


def test_records_parse_with_slims_keys_alone_and_decode_to_three_channels(zoo):
    seen = 0
    for shard in sorted(zoo["out"].glob("*.tfrecord")):
        for serialized in tf.data.TFRecordDataset(str(shard)):
            example = tf.io.parse_single_example(serialized, slim_keys())
            assert example["image/format"].numpy() == b"jpg"
            image = tf.io.decode_jpeg(example["image/encoded"], channels=0)
            assert image.shape == (example["image/height"], example["image/width"], 3)
            assert 0 <= example["image/class/label"] < 3
            seen += 1
    assert seen == sum(zoo["meta"]["split_counts"].values())


def test_clean_jpeg_is_stored_as_its_own_bytes_and_others_as_new_jpegs(odd_folder, zoo):
    stored = _by_path(zoo["records"])
    for name in odd_folder.clean_jpegs:
        assert stored[name][1]["encoded"] == (odd_folder.root / name).read_bytes()
    for name in ("squares/actually_png.jpg", "triangles/cmyk.jpg", "triangles/picture.webp", odd_folder.gif):
        encoded = stored[name][1]["encoded"]
        assert encoded[:3] == b"\xff\xd8\xff" and encoded != (odd_folder.root / name).read_bytes()
        with Image.open((odd_folder.root / name)) as original:
            assert _decode(stored[name][1]).shape[:2] == (original.height, original.width)


def test_exif_rotated_image_comes_out_upright(odd_folder, zoo):
    with Image.open(odd_folder.root / odd_folder.rotated) as raw:
        assert raw.size == (64, 40)  # stored sideways
    image = _decode(_by_path(zoo["records"])[odd_folder.rotated][1]).astype(int)
    assert image.shape == (64, 40, 3)
    top, bottom = image[4:28].mean(axis=(0, 1)), image[36:60].mean(axis=(0, 1))
    assert top[0] > 200 and top[2] < 60  # red on top
    assert bottom[2] > 200 and bottom[0] < 60  # blue below


def test_multi_frame_16_bit_and_transparent_images_keep_their_look(odd_folder, zoo):
    stored = _by_path(zoo["records"])
    for name in (odd_folder.gif, odd_folder.clean_jpegs[1]):
        colour = _decode(stored[name][1]).astype(int).mean(axis=(0, 1))
        assert colour[0] > 200 and colour[2] < 60  # the first frame (red), not the second (blue)
    grey = _decode(stored[odd_folder.sixteen_bit][1]).astype(int)
    assert np.abs(grey - 128).max() <= 3  # 16-bit 128*257 scaled, not clipped to white
    rgba = _decode(stored[odd_folder.rgba][1]).astype(int)
    assert (rgba[:8, :8] > 240).all()  # transparent corners over white
    assert rgba[22:26, 22:26, 1].min() > 150 and rgba[22:26, 22:26, 0].max() < 60  # the opaque green square


def test_dataset_json_records_the_build(zoo):
    meta = zoo["meta"]
    assert (meta["seed"], meta["validation_fraction"], meta["test_fraction"]) == (0, 0.3, 0.0)
    assert re.fullmatch(r"[0-9a-f]{64}", meta["fingerprint"])
    assert meta["fingerprint"] == zoo["summary"]["fingerprint"]
    stats = meta["image_size_stats"]
    assert stats["images"] == sum(meta["split_counts"].values())
    assert stats["original_width"]["min"] >= 40 and stats["original_width"]["max"] <= 96
    assert meta["images"]["converted"] + meta["images"]["stored_as_is"] == stats["images"]
    for split, names in meta["shards"].items():
        assert names == [f"{split}-00000-of-00001.tfrecord"]  # a small dataset: one shard per split
    assert sorted(path.name for path in zoo["out"].iterdir()) == sorted(
        ["dataset.json", "labels.txt"] + [name for names in meta["shards"].values() for name in names]
    )


# --------------------------------------------------------------------------------------- split stability


def _build(image_dir: Path, out: Path, **options) -> dict[str, str]:
    options = {"validation_fraction": 0.25, **options}  # 20 images a class: 10% could leave one with none
    config = BuildDatasetConfig(image_dir=str(image_dir), out=str(out), workers=1, **options)
    dataset.build_dataset(config)
    return {path: split for path, (split, _) in _by_path(read_records(out)).items()}


@pytest.fixture(scope="module")
def plain_folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("plain") / "photos", num_classes=3, images_per_class=20,
                             seed=11, min_side=40, max_side=64)  # fmt: skip


def test_same_seed_gives_the_same_split_and_another_seed_another(plain_folder, tmp_path):
    first = _build(plain_folder.root, tmp_path / "a", validation_fraction=0.25)
    again = _build(plain_folder.root, tmp_path / "b", validation_fraction=0.25)
    other = _build(plain_folder.root, tmp_path / "c", validation_fraction=0.25, seed=1)
    assert first == again
    assert first != other
    assert dataset.load_dataset(tmp_path / "a").fingerprint == dataset.load_dataset(tmp_path / "b").fingerprint
    assert dataset.load_dataset(tmp_path / "a").fingerprint != dataset.load_dataset(tmp_path / "c").fingerprint


def test_adding_images_moves_no_existing_image(plain_folder, tmp_path):
    photos = tmp_path / "photos"
    shutil.copytree(plain_folder.root, photos)
    before = _build(photos, tmp_path / "before", validation_fraction=0.25, test_fraction=0.25)
    extra = make_image_folder(tmp_path / "extra", num_classes=3, images_per_class=4, seed=99, min_side=40,
                              max_side=64)  # fmt: skip
    added = [path for paths in extra.files.values() for path in paths][:10]
    for path in added:
        shutil.copy(path, photos / path.parent.name / f"new_{path.name}")
    after = _build(photos, tmp_path / "after", validation_fraction=0.25, test_fraction=0.25)
    assert len(after) == len(before) + 10
    assert {path: after[path] for path in before} == before
    assert set(before.values()) == {"train", "validation", "test"}


def test_max_side_downsizes_and_shards_override(plain_folder, tmp_path):
    out = tmp_path / "small"
    _build(plain_folder.root, out, max_side=32, shards=3)
    info = dataset.load_dataset(out)
    assert [path.name for path in info.files("train")] == [f"train-0000{i}-of-00003.tfrecord" for i in range(3)]
    assert len(info.files("validation")) == min(3, info.split_counts["validation"])
    records = [record for rows in read_records(out).values() for record in rows]
    assert len(records) == 60
    for record in records:
        assert max(record["height"], record["width"]) == 32  # every source image is 40 to 64 pixels
        assert _decode(record).shape == (record["height"], record["width"], 3)


# --------------------------------------------------------------------------------------------- refusals


def _refused(result: CliResult, out: Path, *expected: str) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and len(result.stderr.strip().splitlines()) <= 3, result.stderr
    for text in expected:
        assert text in error, error
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*")), "a partial build was left behind"
    return error


def _folder(root: Path, classes: dict[str, int], seed: int = 0) -> Path:
    for index, (name, count) in enumerate(classes.items()):
        images = make_image_folder(root / f"tmp{index}", num_classes=1, images_per_class=max(count, 1),
                                   seed=seed + index, min_side=32, max_side=48, png_fraction=0)  # fmt: skip
        (root / name).mkdir(parents=True)
        for path in images.files[images.classes[0]][:count]:
            path.rename(root / name / path.name)
        shutil.rmtree(root / f"tmp{index}")
    return root


def test_refuses_a_missing_image_dir_or_a_file(tmp_path):
    out = tmp_path / "datasets" / "x"
    _refused(run_cli("build-dataset", str(tmp_path / "nope"), "--out", str(out)), out, "nope", "does not exist")
    (tmp_path / "file.jpg").write_bytes(b"x")
    _refused(run_cli("build-dataset", str(tmp_path / "file.jpg"), "--out", str(out)), out, "is not a folder")
    assert not (tmp_path / "datasets").exists()


def test_refuses_fewer_than_two_classes(tmp_path):
    photos = _folder(tmp_path / "photos", {"cats": 3})
    (photos / "loose.jpg").write_bytes((photos / "cats" / "discs_0000.jpg").read_bytes())
    out = tmp_path / "out"
    _refused(run_cli("build-dataset", str(photos), "--out", str(out)), out, "1 class folder", "at least 2")


def test_refuses_a_class_without_a_usable_image(tmp_path):
    photos = _folder(tmp_path / "photos", {"cats": 4, "dogs": 4})
    (photos / "empty_class").mkdir()
    (photos / "empty_class" / "notes.jpg").write_text("not a picture")
    out = tmp_path / "out"
    error = _refused(run_cli("build-dataset", str(photos), "--out", str(out), "--workers", "1"), out,
                     "'empty_class'", "no usable image", "notes.jpg")  # fmt: skip
    assert "add images" in error


def test_refuses_a_class_too_small_to_split_and_names_the_fix(tmp_path):
    photos = _folder(tmp_path / "photos", {"cats": 5, "dogs": 5, "solo": 1})
    out = tmp_path / "out"
    base = ["build-dataset", str(photos), "--out", str(out), "--workers", "1"]
    # One image cannot be in train and in validation. (Classes that can be split are: tests/test_split.py.)
    _refused(run_cli(*base, "--validation-fraction", "0.5"), out, "'solo' has 1 image", "--validation-fraction 0")


def test_refuses_to_overwrite_a_dataset_unless_asked(plain_folder, tmp_path):
    out = tmp_path / "ds"
    _build(plain_folder.root, out)
    before = (out / "dataset.json").read_bytes()
    command = ["build-dataset", str(plain_folder.root), "--out", str(out), "--seed", "5", "--workers", "1",
               "--validation-fraction", "0.25"]  # fmt: skip
    result = run_cli(*command)
    assert result.returncode == 1 and "already holds a dataset; pass --overwrite" in result.stderr
    assert (out / "dataset.json").read_bytes() == before
    result = run_cli(*command, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "dataset.json").read_text())["seed"] == 5
    assert [path.name for path in tmp_path.iterdir()] == ["ds"]  # no partial or replaced folder left


def test_refuses_bad_flags_naming_them(plain_folder, tmp_path):
    out = tmp_path / "out"
    for flags, text in (
        (["--validation-fraction", "1.5"], "--validation-fraction 1.5: must be at least 0 and below 1"),
        (["--validation-fraction", "0.6", "--test-fraction", "0.4"], "must stay below 1"),
        (["--workers", "0"], "--workers 0: must be at least 1"),
        (["--max-side", "0"], "--max-side 0: must be at least 1"),
    ):
        _refused(run_cli("build-dataset", str(plain_folder.root), "--out", str(out), *flags), out, text)


def test_an_interrupted_build_leaves_nothing_that_looks_finished(tmp_path):
    photos = tmp_path / "photos"
    make_image_folder(photos, num_classes=2, images_per_class=60, seed=5, min_side=40, max_side=64)
    out = tmp_path / "datasets" / "ds"
    command = [sys.executable, "-m", "finetune", "build-dataset", str(photos), "--out", str(out), "--workers", "1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not list(out.parent.glob(".ds.partial-*")) and process.poll() is None:
            assert time.monotonic() < deadline, "the build never started"
            time.sleep(0.01)
        assert process.poll() is None, "the build ended before it could be interrupted"
    finally:
        process.kill()
        process.wait()
    assert not out.exists()
    with pytest.raises(DataError, match="does not exist"):
        dataset.load_dataset(out)
    result = run_cli("build-dataset", str(photos), "--out", str(out), "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert [path.name for path in out.parent.iterdir()] == ["ds"]  # the killed build's leftovers went too


# --------------------------------------------------------------------------------------------- loading


def test_load_dataset_names_the_problem_and_the_fix(zoo, tmp_path):
    info = dataset.load_dataset(zoo["out"])
    assert info.classes == tuple(zoo["meta"]["classes"]) and info.split_counts == zoo["meta"]["split_counts"]
    assert info.files("train") == [zoo["out"] / "train-00000-of-00001.tfrecord"]
    with pytest.raises(DataError, match=r"--dataset .*nowhere does not exist; build one with `finetune build-d"):
        dataset.load_dataset(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"not a dataset \(no dataset.json\)"):
        dataset.load_dataset(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(zoo["out"], broken)
    (broken / "validation-00000-of-00001.tfrecord").unlink()
    with pytest.raises(DataError, match=r"validation-00000-of-00001.tfrecord is missing.*--overwrite"):
        dataset.load_dataset(broken)
    (broken / "dataset.json").write_text('{"format": "finetune-dataset", "vers')
    with pytest.raises(DataError, match=r"dataset.json is unreadable .*rebuild it with"):
        dataset.load_dataset(broken, flag="--data")
    with pytest.raises(DataError, match=r"no test split \(rebuild with --test-fraction above 0\); it has: train"):
        info.files("test")
    with pytest.raises(DataError, match="unknown split 'dev'"):
        dataset.read_dataset(info, "dev", batch_size=2, image_size=75, training=False)


# -------------------------------------------------------------------------------------------- reading


def test_train_reader_batches_have_the_right_shape_range_and_labels(zoo):
    info = dataset.load_dataset(zoo["out"])
    batches = dataset.read_dataset(info, "train", batch_size=8, image_size=75, training=True, seed=1,
                                   drop_remainder=True)  # fmt: skip
    count = 0
    for batch in batches:
        assert batch["image"].shape == (8, 75, 75, 3) and batch["image"].dtype == tf.float32
        assert batch["label"].dtype == tf.int64 and batch["path"].dtype == tf.string
        assert -1.0 <= batch["image"].numpy().min() and batch["image"].numpy().max() <= 1.0
        for label, path in zip(batch["label"].numpy(), batch["path"].numpy()):
            assert info.classes[label] == path.decode().split("/")[0]
        count += 8
    assert count == info.split_counts["train"] // 8 * 8


def test_eval_reader_yields_every_example_once_in_file_order(zoo):
    info = dataset.load_dataset(zoo["out"])
    expected = [record["filename"] for record in zoo["records"]["validation"]]
    for _ in range(2):
        batches = dataset.read_dataset(info, "validation", batch_size=7, image_size=80, training=False)
        paths, images = [], []
        for batch in batches:
            assert batch["image"].shape[1:] == (80, 80, 3)
            paths += [path.decode() for path in batch["path"].numpy()]
            images.append(batch["image"].numpy())
        assert paths == expected
        stacked = np.concatenate(images)
        assert -1.0 <= stacked.min() and stacked.max() <= 1.0 and stacked.std() > 0.1


def test_train_reader_is_reproducible_with_a_seed_and_plain_without_augmentation(zoo):
    info = dataset.load_dataset(zoo["out"])

    def first(**options):
        batches = dataset.read_dataset(info, "train", batch_size=6, image_size=75, training=True, **options)
        return next(iter(batches))

    one, same, other = first(seed=3), first(seed=3), first(seed=4)
    assert (one["path"].numpy() == same["path"].numpy()).all()
    np.testing.assert_array_equal(one["image"].numpy(), same["image"].numpy())
    assert not (one["path"].numpy() == other["path"].numpy()).all()
    # Without augmentation a train batch is exactly what evaluation shows for the same files.
    plain = first(seed=3, augment=False, shuffle=False)
    evaluated = next(iter(dataset.read_dataset(info, "train", batch_size=6, image_size=75, training=False)))
    assert (plain["path"].numpy() == evaluated["path"].numpy()).all()
    np.testing.assert_array_equal(plain["image"].numpy(), evaluated["image"].numpy())


def test_reader_runs_in_a_tf1_graph_with_a_one_shot_iterator(zoo):
    info = dataset.load_dataset(zoo["out"])
    with tf.Graph().as_default():
        batches = dataset.read_dataset(info, "train", batch_size=4, image_size=75, training=True, repeat=True,
                                       seed=0)  # fmt: skip
        batch = tf.compat.v1.data.make_one_shot_iterator(batches).get_next()
        assert batch["image"].shape.as_list() == [None, 75, 75, 3]
        with tf.compat.v1.Session() as session:
            for _ in range(12):  # more than one pass over the training split
                values = session.run(batch)
                assert values["image"].shape == (4, 75, 75, 3)


def test_reader_has_threads_of_its_own_and_no_autotuning_that_could_hold_up_the_end_of_a_run(zoo):
    # With autotuning, closing the session waited 12 to 23 s for tf.data's tuning thread in 3 runs of 8.
    info = dataset.load_dataset(zoo["out"])
    for training in (True, False):
        options = dataset.read_dataset(info, "train", batch_size=4, image_size=75, training=training).options()
        assert options.autotune.enabled is False
        assert options.threading.private_threadpool_size == dataset.default_workers()


# -------------------------------------------------------------------------------------------- preview


def test_preview_draws_originals_with_their_crop_beside_the_network_input(zoo, tmp_path):
    out = tmp_path / "look" / "preview.png"
    result = run_cli("preview", str(zoo["out"]), "--out", str(out), "--count", "3", "--image-size", "64", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["count"] == 3 and len(summary["paths"]) == 3
    assert set(summary["paths"]) <= {record["filename"] for record in zoo["records"]["train"]}
    with Image.open(out) as picture:
        assert picture.format == "PNG"
        assert picture.size == (8 + 2 * 2 * (64 + 8), 8 + 2 * (64 + 8 + 16))  # 2 pairs a row, 2 rows
        pixels = np.asarray(picture.convert("RGB")).reshape(-1, 3).astype(int)
    yellow = (pixels[:, 0] > 230) & (pixels[:, 1] > 200) & (pixels[:, 2] < 40)
    assert yellow.sum() > 3 * 4 * 20  # three crop boxes drawn
    bad = run_cli("preview", str(zoo["out"]), "--out", str(tmp_path / "preview.xyz"))
    assert bad.returncode == 1 and "error: --out" in bad.stderr and ".png" in bad.stderr
    missing = run_cli("preview", str(tmp_path / "none"))
    assert missing.returncode == 1 and "build-dataset" in missing.stderr
