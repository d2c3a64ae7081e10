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
    os.symlink(walked, folder / "walked_again")  # a link to a folder the walk already visited
    os.symlink("looping_folder", folder / "looping_folder")  # a link to itself, where a folder is expected
    (folder / "empty_folder").mkdir()
    return odd


@pytest.fixture(scope="module")
def odd_tree(tmp_path_factory):
    """Two classes of good images; one class folder also holds every odd entry, and odd names."""
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
    good = sorted(p for paths in made.files.values() for p in paths) + odd_names
    return SimpleNamespace(root=root, classes=made.classes, odd=odd, good=good, odd_names=odd_names)


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
    assert sum(meta["split_counts"].values()) == len(odd_tree.good)  # odd names kept, linked folder once
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


@pytest.fixture(scope="module")
def exported_model(trained_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults_export") / "model.pb"
    result = run_cli("export", "--train-dir", str(trained_run.train_dir), "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.slow
def test_predict_labels_every_good_image_and_names_every_odd_entry(exported_model, odd_tree):
    odd = odd_tree.odd
    named = [str(odd["fifo"]), str(odd["socket"]), str(odd["dangling"]), str(odd["loop"])]
    with bounded():
        result = run_cli("predict", "--model", str(exported_model), str(odd_tree.root), *named)
    assert result.returncode == 1
    errors = error_lines(result.stderr)
    # the folder scan and the named entries: each odd entry once per time it is met, then the summary
    for path in named:
        assert sum(path in line for line in errors) == 2, (path, errors)
    assert errors[-1].startswith(f"error: {len(errors) - 1} file(s) could not be labelled")
    labelled = [line.split("\t")[0] for line in result.stdout.splitlines()]
    assert len(labelled) == len(odd_tree.good)
    assert "new\\nline.jpg" in "".join(labelled)  # one line per file even for a name with a newline


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
        message = one_error(run_cli("export", "--train-dir", str(run)))
    assert str(run / "config.json") in message and "start the run over" in message


# ------------------------------------------------------------------------------------------ resource limits


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MB tmpfs mounted for the test (needs root); skipped where mounting is not allowed."""
    import subprocess

    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:  # fmt: skip
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


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
