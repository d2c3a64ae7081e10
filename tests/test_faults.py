"""The fault zoo: hostile inputs and damaged artefacts, built by fixtures, each ending in one clear error.

Every case runs under a deadline (an alarm in-process, a subprocess timeout end to end), asserts the exit
status, that stderr carries one `error:` line naming the file and the fix and no traceback, and that the good
data beside the bad is untouched. Tests run as root here, where permission bits do not stop a read, so an
"unreadable" entry is made with a mechanism that works for root too: a FIFO (opening it for reading would
wait for a writer forever), a socket (cannot be opened at all), a symbolic link that loops or dangles.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
from pathlib import Path

import pytest

from tests.conftest import run_cli, spawn_cli

DEADLINE = 300  # seconds; far above what any case takes, far below forever


@contextlib.contextmanager
def bounded(seconds: int = DEADLINE):
    """Fails the test instead of hanging when the block runs past ``seconds`` (SIGALRM interrupts a blocking
    open or read of a FIFO, which Python would otherwise retry)."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: a read that blocks?")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def one_error(result) -> str:
    """The single `error:` line of a failed call (exit 1, no traceback)."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    return lines[0]


# ---------------------------------------------------------------------------------- filesystem oddities


def add_odd_entries(folder: Path, walked: Path) -> dict[str, Path]:
    """Puts one of each odd entry in ``folder``; ``walked`` is a folder the walk visits elsewhere."""
    folder.mkdir(parents=True, exist_ok=True)
    odd = {
        "fifo": folder / "fifo.jpg",
        "socket": folder / "socket.jpg",
        "dangling": folder / "dangling.jpg",
        "loop": folder / "loop_a.jpg",
        "loop_back": folder / "loop_b.jpg",
    }
    os.mkfifo(odd["fifo"])
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(odd["socket"]))
    server.close()  # the socket file stays, nothing listens
    os.symlink(folder / "never_there.jpg", odd["dangling"])
    os.symlink(odd["loop_back"].name, odd["loop"])
    os.symlink(odd["loop"].name, odd["loop_back"])
    for name, minor in (("null", 3), ("zero", 5)):  # /dev/null's and /dev/zero's devices: reading zero never ends
        odd[name] = folder / f"{name}.jpg"
        os.mknod(odd[name], stat.S_IFCHR | 0o666, os.makedev(1, minor))
    odd["zero_link"] = folder / "zero_link.jpg"
    os.symlink("/dev/zero", odd["zero_link"])
    os.symlink(walked, folder / "walked_again")  # a link to a folder the walk already visited
    os.symlink("looping_folder", folder / "looping_folder")  # a link to itself, where a folder is expected
    (folder / "empty_folder").mkdir()
    return odd


DEEP, TOO_DEEP = 1500, 2100  # folders: past Python's recursion limit (1000); past PATH_MAX (4096 bytes)


def make_deep_tree(top: Path, picture: bytes) -> tuple[Path, Path]:
    """``top/d/d/.../d`` TOO_DEEP folders down, with a photo at depth DEEP (its path fits in PATH_MAX) and one at
    the bottom (its path does not). Made through folder descriptors, since no path reaches the bottom.

    Returns the photo at depth DEEP and the first folder whose path is too long to use.
    """
    descriptor = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    too_long = None
    try:
        for depth in range(1, TOO_DEEP + 1):
            os.mkdir("d", dir_fd=descriptor)
            below = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=descriptor)
            os.close(descriptor)
            descriptor = below
            if too_long is None and len(os.fsencode(top)) + 2 * depth > 4095:  # with its NUL, over 4096
                too_long = Path(os.fspath(top) + "/d" * depth)
            if depth in (DEEP, TOO_DEEP):
                photo = os.open("deep.jpg", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=descriptor)
                os.write(photo, picture)
                os.close(photo)
    finally:
        os.close(descriptor)
    assert too_long is not None
    return Path(os.fspath(top) + "/d" * DEEP) / "deep.jpg", too_long


def remove_deep_tree(top: Path) -> None:
    """Removes ``top/d/...`` without recursion and without paths too long to use (pytest's cleanup recurses)."""
    descriptors = [os.open(top, os.O_RDONLY | os.O_DIRECTORY)]
    while "d" in os.listdir(descriptors[-1]):
        descriptors.append(os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=descriptors[-1]))
    while descriptors:
        descriptor = descriptors.pop()
        for name in os.listdir(descriptor):
            os.unlink(name, dir_fd=descriptor) if name != "d" else os.rmdir(name, dir_fd=descriptor)
        os.close(descriptor)


@pytest.fixture(scope="module")
def odd_tree(tmp_path_factory):
    """Two classes of good images; one class folder also holds every odd entry, and odd names; the other a
    tree deeper than Python's recursion limit, with one photo inside PATH_MAX and one beyond."""
    from types import SimpleNamespace

    from finetune.synthetic import make_image_folder

    root = tmp_path_factory.mktemp("oddtree") / "photos"
    made = make_image_folder(root, num_classes=2, images_per_class=6, seed=5, min_side=48, max_side=80,
                             png_fraction=0.0)  # fmt: skip
    first, second = made.classes
    odd = add_odd_entries(root / second, root / first)
    picture = made.files[first][0].read_bytes()
    not_utf8 = Path(os.fsdecode(os.fsencode(str(root / second)) + b"/bad\xffname.jpg"))
    odd_names = [root / second / "new\nline.jpg", not_utf8]
    for path in odd_names:
        path.write_bytes(picture)
    (root / "empty_class_like").mkdir()  # an empty folder at the top: a class with no image
    (root / first / "deep").mkdir()
    deep_photo, too_long = make_deep_tree(root / first / "deep", picture)
    good = sorted(p for paths in made.files.values() for p in paths) + odd_names
    yield SimpleNamespace(root=root, classes=made.classes, odd=odd, good=good, odd_names=odd_names,
                          deep_photo=deep_photo, too_long=too_long)  # fmt: skip
    remove_deep_tree(root / first / "deep")


def test_build_dataset_skips_every_odd_entry_and_never_blocks(odd_tree, tmp_path):
    before = {p: p.read_bytes() for p in odd_tree.good}
    with bounded():
        result = run_cli("build-dataset", str(odd_tree.root), "--out", str(tmp_path / "ds"), "--workers", "1",
                             "--validation-fraction", "0.5")
    # The empty top-level folder is a third class with no image: refused by name, nothing written.
    message = one_error(result)
    assert "empty_class_like" in message
    assert not (tmp_path / "ds").exists()
    (odd_tree.root / "empty_class_like").rmdir()
    try:
        with bounded():
            result = run_cli("build-dataset", str(odd_tree.root), "--out", str(tmp_path / "ds"), "--workers", "1",
                             "--validation-fraction", "0.5")
    finally:
        (odd_tree.root / "empty_class_like").mkdir()
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    meta = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    reasons = {item["path"].split("/")[-1]: item["reason"] for item in meta["skipped"]}
    assert "FIFO" in reasons["fifo.jpg"]
    assert "socket" in reasons["socket.jpg"]
    assert "broken symbolic link" in reasons["dangling.jpg"]
    assert "loops" in reasons["loop_a.jpg"] and "loops" in reasons["loop_b.jpg"]
    assert "loops" in reasons["looping_folder"]
    for name in ("null.jpg", "zero.jpg", "zero_link.jpg"):
        assert "character device" in reasons[name], reasons
    # the deep tree, walked without recursion: the photo at depth 1,500 kept, the folder past PATH_MAX named
    too_long = [item["reason"] for item in meta["skipped"] if item["path"].endswith("/d" * 2000)]
    assert too_long == ["unreadable folder: File name too long"], meta["skipped"]
    assert sum(meta["split_counts"].values()) == len(odd_tree.good) + 1  # odd names, deep photo; linked folder once
    assert {p: p.read_bytes() for p in odd_tree.good} == before


def test_build_dataset_refuses_a_class_folder_named_with_a_newline(tmp_path):
    from finetune.synthetic import make_image_folder

    root = tmp_path / "photos"
    made = make_image_folder(root, num_classes=2, images_per_class=3, seed=2, min_side=48, max_side=60,
                             png_fraction=0.0)  # fmt: skip
    (root / made.classes[1]).rename(root / "two\nlines")
    with bounded():
        message = one_error(run_cli("build-dataset", str(root), "--out", str(tmp_path / "ds")))
    assert "two\\nlines" in message and "rename it" in message
    assert not (tmp_path / "ds").exists()


def test_a_file_that_vanishes_or_turns_into_a_fifo_after_the_scan_is_skipped(tmp_path):
    """The scan saw a regular file; by the time the worker reads it, it is gone, or a FIFO."""
    from finetune.dataset import _check_file

    os.mkfifo(tmp_path / "was_a_file.jpg")
    with bounded(30):
        assert "FIFO" in _check_file(str(tmp_path), None, ("was_a_file.jpg", 0)).reason
        assert "vanished" in _check_file(str(tmp_path), None, ("gone.jpg", 0)).reason


def test_read_regular_file_is_bounded(tmp_path):
    from finetune.paths import NotReadable, read_regular_file

    (tmp_path / "big.jpg").write_bytes(b"x" * 100)
    assert read_regular_file(tmp_path / "big.jpg", limit=100) == b"x" * 100
    with pytest.raises(NotReadable, match="larger than 99 bytes"):
        read_regular_file(tmp_path / "big.jpg", limit=99)
    with pytest.raises(NotReadable, match="a folder"):
        read_regular_file(tmp_path)


# exported_model: the session fixture in conftest.py (the trained run's default export), shared with test_readme.


@pytest.mark.slow
def test_predict_labels_every_good_image_and_names_every_odd_entry(exported_model, odd_tree, tmp_path):
    """Exactly one `error:` line per bad entry (met in the folder, or named), every good image labelled."""
    from finetune.paths import printable

    os.mkfifo(tmp_path / "named_fifo.jpg")
    os.mknod(tmp_path / "named_zero.jpg", stat.S_IFCHR | 0o666, os.makedev(1, 5))
    os.symlink("/dev/zero", tmp_path / "named_zero_link.jpg")
    named = [str(tmp_path / name) for name in ("named_fifo.jpg", "named_zero.jpg", "named_zero_link.jpg", "gone.jpg")]
    with bounded():
        result = run_cli("predict", "--model", str(exported_model), str(odd_tree.root), *named)
    assert result.returncode == 1
    errors = error_lines(result.stderr)
    in_tree = [str(path) for key, path in odd_tree.odd.items()] + [str(odd_tree.too_long)]
    bad = in_tree + named
    assert len(errors) == len(bad), errors
    for path in bad:
        assert sum(line.startswith(f"error: {printable(path)}: ") for line in errors) == 1, (path, errors)
    assert any("character device" in line for line in errors if "named_zero_link" in line)
    labelled = [line.split("\t")[0] for line in result.stdout.splitlines()]
    assert len(labelled) == len(odd_tree.good) + 1  # and the photo 1,500 folders down
    assert "new\\nline.jpg" in "".join(labelled)  # one line per file even for a name with a newline
    assert str(odd_tree.deep_photo) in labelled


@pytest.mark.slow
def test_predict_on_a_fifo_ends_in_a_fresh_process(exported_model, tmp_path):
    """End to end, as a user met it: a FIFO given to predict made it wait forever."""
    os.mkfifo(tmp_path / "photo.jpg")
    result = spawn_cli("predict", "--model", str(exported_model), str(tmp_path / "photo.jpg"), timeout=DEADLINE)
    assert result.returncode == 1
    errors = error_lines(result.stderr)
    assert any("photo.jpg" in line and "FIFO" in line for line in errors), result.stderr


# ---------------------------------------------------------------------------------- wrong kinds of paths


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    """A plain file, a plain folder, a SavedModel-looking folder and a small image tree, to misuse."""
    from types import SimpleNamespace

    from finetune.synthetic import make_image_folder

    root = tmp_path_factory.mktemp("kinds")
    (root / "a_file.txt").write_text("not a folder\n")
    (root / "a_folder").mkdir()
    (root / "saved").mkdir()
    (root / "saved" / "saved_model.pb").write_bytes(b"")
    make_image_folder(root / "photos", num_classes=2, images_per_class=2, seed=1, min_side=48, max_side=50,
                      png_fraction=0.0)  # fmt: skip
    return SimpleNamespace(root=root, file=str(root / "a_file.txt"), folder=str(root / "a_folder"),
                           below_file=str(root / "a_file.txt" / "inside"), saved=str(root / "saved"),
                           photos=str(root / "photos"))  # fmt: skip


WRONG_KINDS = [  # (argv with placeholders, words the error must hold)
    (["build-dataset", "{file}", "--out", "{root}/ds"], ["IMAGE_DIR", "a_file.txt", "not a folder", "subfolder per class"]),
    (["build-dataset", "{photos}", "--out", "{file}"], ["--out", "a_file.txt", "not a folder", "choose a folder"]),
    (["build-dataset", "{photos}", "--out", "{below_file}"], ["--out", "a_file.txt is a file", "choose another path"]),
    (["build-dataset", "{photos}", "--out", "{photos}"], ["--out", "inside IMAGE_DIR", "write it elsewhere"]),
    (["build-dataset", "{photos}", "--out", "{photos}/discs/ds"], ["--out", "inside IMAGE_DIR", "write it elsewhere"]),
    (["preview", "{file}"], ["DATASET", "a_file.txt", "finetune build-dataset"]),
    (["preview", "{folder}", "--out", "{folder}"], ["--out", "a_folder", "is a folder", "file name"]),
    (["train", "--dataset", "{file}", "--train-dir", "{root}/run"], ["--dataset", "a_file.txt", "finetune build-dataset"]),
    (["train", "--dataset", "{folder}", "--train-dir", "{file}"], ["--train-dir", "a_file.txt", "not a folder"]),
    (["train", "--dataset", "{folder}", "--train-dir", "{below_file}"], ["--train-dir", "choose another path"]),
    (["train", "--dataset", "{folder}", "--train-dir", "{root}/run", "--cache-dir", "{file}"], ["--cache-dir", "a_file.txt"]),
    (["evaluate", "--train-dir", "{file}"], ["--train-dir", "a_file.txt", "finetune train"]),
    (["evaluate", "--model", "{folder}"], ["--model", "a_folder", "is a folder", "finetune export"]),
    (["evaluate", "--model", "{saved}"], ["--model", "saved", "no model.json", "finetune export"]),
    (["export", "--train-dir", "{file}"], ["--train-dir", "a_file.txt", "finetune train"]),
    (["export", "--train-dir", "{folder}", "--out", "{folder}"], ["--out", "a_folder", "is a folder"]),
    (["export", "--train-dir", "{folder}", "--saved-model", "{file}"], ["--saved-model", "a_file.txt"]),
    (["predict", "--model", "{folder}", "{photos}"], ["--model", "a_folder", "is a folder", "finetune export"]),
    (["predict", "--model", "{saved}", "{photos}"], ["--model", "saved", "no model.json", "finetune export"]),
    (["download", "--dest", "{file}"], ["--dest", "a_file.txt", "not a folder"]),
    (["quickstart", "--workdir", "{file}"], ["--workdir", "a_file.txt", "not a folder"]),
]  # fmt: skip


@pytest.mark.parametrize("argv, words", WRONG_KINDS, ids=[" ".join(a[:3]) for a, _ in WRONG_KINDS])
def test_a_path_of_the_wrong_kind_is_one_error_naming_the_flag(kinds, argv, words):
    before = sorted(p.relative_to(kinds.root) for p in kinds.root.rglob("*"))
    with bounded(60):
        message = one_error(run_cli(*(part.format(**vars(kinds)) for part in argv)))
    for word in words:
        assert word in message, (word, message)
    assert sorted(p.relative_to(kinds.root) for p in kinds.root.rglob("*")) == before  # nothing made
    assert Path(kinds.file).read_text() == "not a folder\n"


# ------------------------------------------------------------------------------------- damaged artefacts


def damaged_copy(dataset: Path, where: Path, split: str, how: str) -> tuple[Path, Path]:
    """A copy of ``dataset`` whose first ``split`` shard has bytes flipped mid-file or its tail cut off."""
    import shutil

    copy = where / f"damaged_{split}_{how}"
    shutil.copytree(dataset, copy)
    meta = json.loads((copy / "dataset.json").read_text())
    shard = copy / meta["shards"][split][0]
    data = bytearray(shard.read_bytes())
    if how == "flipped":
        middle = len(data) // 2
        data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    else:
        data = data[: len(data) - 100]
    shard.write_bytes(bytes(data))
    return copy, shard


def assert_names_damaged_shard(result, shard: Path, dataset: Path) -> None:
    message = one_error(result)
    assert str(shard) in message, message
    assert f"finetune build-dataset IMAGE_DIR --out {dataset} --overwrite" in message, message


@pytest.mark.slow
@pytest.mark.parametrize("how", ["flipped", "truncated"])
def test_train_on_a_damaged_shard_names_it(trained_run, standin_checkpoint, tmp_path, how):
    copy, shard = damaged_copy(trained_run.dataset, tmp_path, "train", how)
    good = {p.name: p.read_bytes() for p in copy.iterdir() if p != shard}
    with bounded():
        result = run_cli("train", "--dataset", str(copy), "--train-dir", str(tmp_path / "run"),
                         "--checkpoint", str(standin_checkpoint), "--image-size", "75", "--batch-size", "8",
                         "--steps", "30", "--eval-every", "0")  # fmt: skip
    assert_names_damaged_shard(result, shard, copy)
    assert {p.name: p.read_bytes() for p in copy.iterdir() if p != shard} == good


@pytest.mark.slow
def test_evaluate_and_preview_on_a_damaged_shard_name_it(trained_run, tmp_path):
    copy, shard = damaged_copy(trained_run.dataset, tmp_path, "validation", "flipped")
    with bounded():
        result = run_cli("evaluate", "--train-dir", str(trained_run.train_dir), "--dataset", str(copy))
    assert_names_damaged_shard(result, shard, copy)
    copy, shard = damaged_copy(trained_run.dataset, tmp_path, "train", "truncated")
    with bounded():
        result = run_cli("preview", str(copy), "--out", str(tmp_path / "preview.png"), "--count", "64",
                         "--image-size", "75")  # fmt: skip
    assert_names_damaged_shard(result, shard, copy)
    assert not (tmp_path / "preview.png").exists()


def test_a_damaged_feature_cache_part_is_removed_with_a_warning_and_the_rest_kept(tmp_path, caplog):
    import numpy as np

    from finetune import features
    from finetune.network import FEATURE_SIZE

    cache = features.FeatureCache(tmp_path, "backbone", 75)
    good_keys = [bytes([i]) * 32 for i in range(3)]
    cache.add(good_keys, np.ones((3, FEATURE_SIZE), np.float32))
    cache.add([b"\x09" * 32], np.ones((1, FEATURE_SIZE), np.float32))
    parts = sorted(cache.directory.glob("part-*.npz"))
    damaged = next(p for p in parts if p.stat().st_size < max(q.stat().st_size for q in parts))
    damaged.write_bytes(damaged.read_bytes()[:100])  # truncated mid-write by a crash, say
    os.mkfifo(cache.directory / "part-fifo.npz")  # and something that would block a reader
    with bounded(60):
        reopened = features.FeatureCache(tmp_path, "backbone", 75)
    assert all(key in reopened for key in good_keys) and len(reopened) == 3
    assert not damaged.exists() and not (cache.directory / "part-fifo.npz").exists()
    assert "2 damaged feature-cache part(s)" in caplog.text and "computed again" in caplog.text


@pytest.fixture(scope="module")
def damaged_runs(trained_run, tmp_path_factory):
    """Copies of the trained run: .data cut in half, .index cut in half."""
    import shutil

    root = tmp_path_factory.mktemp("damaged_runs")
    runs = {}
    for part in ("data", "index"):
        run = root / f"run_{part}"
        shutil.copytree(trained_run.train_dir, run)
        target = next(p for p in run.iterdir() if p.name.startswith("model.ckpt-") and f".{part}" in p.name)
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
        runs[part] = run
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("part", ["data", "index"])
@pytest.mark.parametrize("command", ["export", "evaluate"])
def test_a_truncated_checkpoint_is_named_with_another_to_pass(damaged_runs, trained_run, tmp_path, part, command):
    run = damaged_runs[part]
    argv = [command, "--train-dir", str(run)] + (["--out", str(tmp_path / "m.pb")] if command == "export" else [])
    with bounded():
        message = one_error(run_cli(*argv))
    assert str(run / "model.ckpt-40") in message, message
    assert "pass another checkpoint with --checkpoint" in message, message
    assert not (tmp_path / "m.pb").exists()


@pytest.mark.slow
def test_training_from_a_truncated_checkpoint_names_it(damaged_runs, trained_run, tmp_path):
    prefix = damaged_runs["data"] / "model.ckpt-40"
    with bounded():
        message = one_error(run_cli("train", "--dataset", str(trained_run.dataset), "--train-dir",
                                    str(tmp_path / "run"), "--checkpoint", str(prefix), "--image-size", "75",
                                    "--steps", "1"))  # fmt: skip
    assert str(prefix) in message and "pass another checkpoint" in message, message


def test_a_truncated_dataset_json_or_config_json_is_named_with_its_fix(tmp_path):
    """The owner modules' own checks, kept in the zoo: a half-written metadata file is one error."""
    dataset, run = tmp_path / "dataset", tmp_path / "run"
    dataset.mkdir()
    run.mkdir()
    (dataset / "dataset.json").write_text('{"format": "finetune-dataset", "vers')
    (run / "config.json").write_text('{"version": 1, "data')
    with bounded(60):
        message = one_error(run_cli("preview", str(dataset), "--out", str(tmp_path / "p.png")))
    assert "dataset.json" in message and "--overwrite" in message
    with bounded(60):
        message = one_error(run_cli("audit", str(dataset), "--out", str(tmp_path / "audit")))
    assert str(dataset / "dataset.json") in message and "--overwrite" in message
    with bounded(60):
        message = one_error(run_cli("export", "--train-dir", str(run)))
    assert str(run / "config.json") in message and "start the run over" in message


@pytest.fixture(scope="module")
def missing_step_run(trained_run, tmp_path_factory) -> Path:
    """A copy of the trained run whose `checkpoint` file names step 40, whose files are gone (deleted by hand,
    say); step 30's files are there (the same bytes, linked)."""
    import shutil

    run = tmp_path_factory.mktemp("missing_step") / "run"
    run.mkdir()
    for path in trained_run.train_dir.iterdir():
        if path.name.startswith("model.ckpt-40"):
            os.link(path, run / path.name.replace("-40", "-30"))
        elif path.name in ("config.json", "checkpoint"):
            shutil.copy(path, run / path.name)
    return run


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train", "evaluate", "evaluate --watch", "export"])
def test_a_checkpoint_file_naming_a_missing_step_says_which_and_what_to_pass(
    missing_step_run, trained_run, standin_checkpoint, tmp_path, command
):
    run = missing_step_run
    argv = {
        "train": ["train", "--dataset", str(trained_run.dataset), "--train-dir", str(run), "--checkpoint",
                  str(standin_checkpoint), "--image-size", "75", "--batch-size", "8", "--steps", "41",
                  "--eval-every", "0"],
        "evaluate": ["evaluate", "--train-dir", str(run)],
        "evaluate --watch": ["evaluate", "--train-dir", str(run), "--watch", "--watch-minutes", "0.1"],
        "export": ["export", "--train-dir", str(run), "--out", str(tmp_path / "m.pb")],
    }[command]  # fmt: skip
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    with bounded():
        message = one_error(run_cli(*argv))
    assert f"{run / 'model.ckpt-40'}.index is missing" in message, message
    assert f"--checkpoint {run / 'model.ckpt-30'}" in message, message
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before  # nothing written or removed
    assert not (tmp_path / "m.pb").exists()


@pytest.fixture(scope="module")
def truncated_model(exported_model, tmp_path_factory) -> Path:
    """A copy of the exported model whose .pb lost its second half; its sidecars are whole."""
    import shutil

    folder = tmp_path_factory.mktemp("truncated_model")
    for path in exported_model.parent.iterdir():
        if path.is_file() and path != exported_model:
            shutil.copy(path, folder / path.name)
    data = exported_model.read_bytes()
    (folder / exported_model.name).write_bytes(data[: len(data) // 2])
    return folder / exported_model.name


@pytest.mark.slow
@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_a_truncated_pb_is_named_with_export_again(truncated_model, trained_run, command):
    argv = (["evaluate", "--model", str(truncated_model), "--dataset", str(trained_run.dataset)]
            if command == "evaluate" else ["predict", "--model", str(truncated_model), str(trained_run.photos)])  # fmt: skip
    before = {p.name: p.read_bytes() for p in truncated_model.parent.iterdir()}
    with bounded():
        message = one_error(run_cli(*argv))
    assert str(truncated_model) in message and "export it again with `finetune export`" in message, message
    assert {p.name: p.read_bytes() for p in truncated_model.parent.iterdir()} == before


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncated", "flipped", "flipped_index"])
def test_training_from_a_damaged_v1_checkpoint_names_it(standin_checkpoint, trained_run, tmp_path, how):
    """The published checkpoint is one V1 file: cut short, bytes flipped in its tensors, or in its index."""
    data = bytearray(standin_checkpoint.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    else:
        start = len(data) // 2 if how == "flipped" else len(data) - 400
        data[start : start + 300] = bytes(b ^ 0xFF for b in data[start : start + 300])
    damaged = tmp_path / "inception_v3.ckpt"
    damaged.write_bytes(bytes(data))
    with bounded():
        message = one_error(run_cli("train", "--dataset", str(trained_run.dataset), "--train-dir",
                                    str(tmp_path / "run"), "--checkpoint", str(damaged), "--image-size", "75",
                                    "--steps", "1"))  # fmt: skip
    assert str(damaged) in message and "pass another checkpoint" in message, message
    assert not list((tmp_path / "run").glob("model.ckpt-*"))


@pytest.mark.slow
def test_audit_on_a_damaged_shard_names_it(trained_run, standin_checkpoint, tmp_path):
    copy, shard = damaged_copy(trained_run.dataset, tmp_path, "train", "flipped")
    with bounded():
        result = run_cli("audit", str(copy), "--checkpoint", str(standin_checkpoint), "--image-size", "75",
                         "--out", str(tmp_path / "audit"), "--cache-dir", str(tmp_path / "cache"))  # fmt: skip
    assert_names_damaged_shard(result, shard, copy)
    assert not (tmp_path / "audit" / "audit.json").exists()


@pytest.mark.slow
def test_library_callers_get_the_same_errors_as_the_command_line(damaged_runs, trained_run, standin_checkpoint,
                                                                tmp_path):
    """train(), evaluate() and export() translate TensorFlow's errors themselves, not only the CLI."""
    from finetune.config import EvaluateConfig, ExportConfig, TrainConfig
    from finetune.errors import FinetuneError
    from finetune.evaluate import evaluate
    from finetune.export import export
    from finetune.train import train

    copy, shard = damaged_copy(trained_run.dataset, tmp_path, "train", "flipped")
    run = damaged_runs["data"]  # restoring it fails inside TensorFlow
    with bounded():
        with pytest.raises(FinetuneError, match=f"dataset shard {shard} is damaged.*--overwrite"):
            train(TrainConfig(dataset=str(copy), train_dir=str(tmp_path / "run"),
                              checkpoint=str(standin_checkpoint),
                              image_size=75, batch_size=8, steps=30, eval_every=0))  # fmt: skip
        for call in (lambda: evaluate(EvaluateConfig(train_dir=str(run))),
                     lambda: export(ExportConfig(train_dir=str(run), out=str(tmp_path / "m.pb")))):  # fmt: skip
            with pytest.raises(FinetuneError, match=f"checkpoint {run / 'model.ckpt-40'} is damaged.*pass another"):
                call()
    assert not (tmp_path / "m.pb").exists()


# ------------------------------------------------------------------------------------------ resource limits


@contextlib.contextmanager
def tmpfs(mount: Path, size: str):
    """A tmpfs of ``size`` mounted at ``mount`` (needs root); the test is skipped where mounting is not allowed."""
    import subprocess

    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:  # fmt: skip
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(mount)], check=True)
            pytest.fail(f"{mount} was still busy after the command ended: a file left open")


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MB tmpfs mounted for the test."""
    with tmpfs(tmp_path / "tiny", "1m") as mount:
        yield mount


def fill(mount: Path, leave: int = 8192) -> None:
    usage = os.statvfs(mount)
    (mount / "filler").write_bytes(b"x" * max(0, usage.f_bavail * usage.f_frsize - leave))


def test_build_dataset_on_a_full_disk_keeps_the_previous_dataset(full_disk, tmp_path):
    from finetune.synthetic import make_image_folder

    photos = tmp_path / "photos"
    make_image_folder(photos, num_classes=2, images_per_class=4, seed=3, min_side=48, max_side=64,
                      png_fraction=0.0)  # fmt: skip
    out = full_disk / "dataset"
    argv = ["build-dataset", str(photos), "--out", str(out), "--workers", "1", "--validation-fraction", "0.5"]
    assert run_cli(*argv).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    fill(full_disk)
    with bounded():
        message = one_error(run_cli(*argv, "--overwrite"))
    assert "disk is full" in message and "free some space" in message, message
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in full_disk.iterdir()) == ["dataset", "filler"]  # no partial folder left


def test_a_full_disk_in_pythons_own_writes_is_one_error(full_disk):
    from finetune.errors import FinetuneError, translated_tf_errors
    from finetune.files import write_bytes_atomically

    fill(full_disk)
    (full_disk / "previous.json").write_bytes(b"{}")  # fits in what fill left
    with pytest.raises(FinetuneError, match="disk is full"):
        with translated_tf_errors("writing", "free space"):
            write_bytes_atomically(full_disk / "previous.json", b"x" * 100_000)
    assert (full_disk / "previous.json").read_bytes() == b"{}"
    assert [p.name for p in full_disk.iterdir() if p.name.endswith(".tmp")] == []


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != "filler"}


@pytest.mark.slow
def test_a_full_disk_while_saving_a_checkpoint_keeps_the_previous_one(trained_run, standin_checkpoint, tmp_path):
    import shutil

    with tmpfs(tmp_path / "disk", "128m") as disk:
        run = disk / "run"
        run.mkdir()
        for path in trained_run.train_dir.iterdir():
            if path.name.startswith("model.ckpt-40") or path.name in ("config.json", "checkpoint"):
                shutil.copy(path, run / path.name)
        checkpoint = {name: data for name, data in files_of(run).items() if name != "config.json"}
        fill(disk, leave=1 << 20)  # room for the small files, not for a checkpoint
        with bounded():
            message = one_error(run_cli("train", "--dataset", str(trained_run.dataset), "--train-dir", str(run),
                                        "--checkpoint", str(standin_checkpoint), "--image-size", "75",
                                        "--batch-size", "8", "--steps", "41", "--eval-every", "0"))  # fmt: skip
        assert "disk is full" in message and "free some space" in message, message
        after = files_of(run)
        assert {name: after.get(name) for name in checkpoint} == checkpoint  # step 40 and the list, untouched
        assert not [name for name in os.listdir(run) if "ckpt-41" in name or name.endswith(".tmp")], os.listdir(run)


@pytest.mark.slow
def test_a_full_disk_while_exporting_keeps_the_previous_model(exported_model, trained_run, tmp_path):
    import shutil

    with tmpfs(tmp_path / "disk", "96m") as disk:
        for path in exported_model.parent.iterdir():
            if path.is_file():
                shutil.copy(path, disk / path.name)
        before = files_of(disk)
        fill(disk, leave=1 << 20)
        with bounded():
            message = one_error(run_cli("export", "--train-dir", str(trained_run.train_dir), "--out",
                                        str(disk / exported_model.name)))  # fmt: skip
        assert "disk is full" in message and "free some space" in message, message
        assert files_of(disk) == before
        assert sorted(os.listdir(disk)) == sorted([*before, "filler"])  # no temporary file left


@pytest.mark.slow
def test_a_full_disk_while_caching_features_is_one_error(trained_run, standin_checkpoint, full_disk, tmp_path):
    fill(full_disk, leave=64 << 10)  # room for the cache's folders and group.json, not for its features
    with bounded():
        message = one_error(run_cli("train", "--dataset", str(trained_run.dataset), "--train-dir",
                                    str(tmp_path / "run"), "--checkpoint", str(standin_checkpoint),
                                    "--image-size", "75", "--steps", "1", "--eval-every", "0",
                                    "--cache-dir", str(full_disk / "cache")))  # fmt: skip
    assert "disk is full writing" in message and str(full_disk / "cache") in message, message
    assert not list(full_disk.rglob("part-*")) and not list(full_disk.rglob("*.tmp"))
    assert not list((tmp_path / "run").glob("model.ckpt-*"))
