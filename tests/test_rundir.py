"""The train dir's config.json and checkpoints: one owner, a format version, and clean errors for bad files."""

from __future__ import annotations

import json
import shutil

import pytest

from finetune import cli, rundir
from finetune.errors import FinetuneError
from tests.conftest import run_cli

SETTINGS = {
    "dataset": "/data/flowers",
    "dataset_fingerprint": "abc123",
    "classes": ("daisy", "tulips"),
    "image_size": 75,
    "total_steps": 40,
    "checkpoint": None,
    "trainable_scopes": ("InceptionV3/Logits",),
}


def test_config_round_trips_with_its_version_and_an_unversioned_file_reads_as_version_1(tmp_path):
    rundir.write_run_config(tmp_path, SETTINGS)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["format_version"] == rundir.FORMAT_VERSION == 1
    run = rundir.read_run_config(tmp_path)
    assert run.classes == ("daisy", "tulips") and run.image_size == 75 and run.total_steps == 40
    assert run.dataset == "/data/flowers" and run.checkpoint is None
    assert run.values["trainable_scopes"] == ["InceptionV3/Logits"]

    del written["format_version"]  # as every config.json written before the field existed
    (tmp_path / "config.json").write_text(json.dumps(written))
    assert rundir.read_run_config(tmp_path).classes == ("daisy", "tulips")


def test_a_newer_format_version_asks_for_a_newer_finetune(tmp_path):
    rundir.write_run_config(tmp_path, SETTINGS)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": rundir.FORMAT_VERSION + 1}))
    with pytest.raises(FinetuneError, match="upgrade finetune") as caught:
        rundir.read_run_config(tmp_path)
    assert str(path) in str(caught.value) and "version 2" in str(caught.value)


@pytest.mark.parametrize(
    "content, problem",
    [
        (None, "unreadable or truncated"),  # the first half of a real config.json
        (b"", "unreadable or truncated"),
        (b"\xff\xfe\x00garbage", "unreadable or truncated"),
        (b'["daisy", "tulips"]', "not a finetune run config"),
        (b'{"classes": ["daisy"], "image_size": 75}', "bad or missing 'total_steps'"),
        (b'{"classes": "daisy", "image_size": 75, "total_steps": 4}', "bad or missing 'classes'"),
        (b'{"format_version": "one"}', "bad format_version"),
    ],
)
def test_a_bad_config_names_the_file_and_the_fix(tmp_path, content, problem):
    path = rundir.write_run_config(tmp_path, SETTINGS)
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2] if content is None else content)
    with pytest.raises(FinetuneError) as caught:
        rundir.read_run_config(tmp_path)
    message = str(caught.value)
    assert message.startswith(str(path)) and problem in message, message
    assert f"--train-dir {tmp_path} --overwrite" in message and "\n" not in message


def test_a_folder_without_config_is_not_a_train_dir(tmp_path):
    with pytest.raises(FinetuneError, match="--train-dir .*: no config.json; pass the folder `finetune train` wrote"):
        rundir.read_run_config(tmp_path)


def test_checkpoint_step_reads_the_step_from_the_name():
    assert rundir.checkpoint_step("/runs/a/model.ckpt-120") == 120
    assert rundir.checkpoint_step("/runs/run-3/model.ckpt") is None
    assert rundir.checkpoint_step("/runs/a/inception_v3.ckpt") is None
    assert rundir.checkpoint_step("model.ckpt-") is None


def test_prepare_resumes_only_a_matching_run_and_refuses_foreign_files(tmp_path):
    train_dir = tmp_path / "run"
    assert rundir.prepare(train_dir, SETTINGS, overwrite=False, must_match=("classes",)) is None
    assert train_dir.is_dir()
    rundir.write_run_config(train_dir, SETTINGS)
    (train_dir / "eval-validation.json").write_text("{}")
    (train_dir / "notes.txt").write_text("mine")
    assert rundir.prepare(train_dir, SETTINGS, overwrite=False, must_match=("classes",)) is None  # no checkpoint
    other = {**SETTINGS, "classes": ("roses",)}
    with pytest.raises(FinetuneError, match="holds a run with another classes"):
        rundir.prepare(train_dir, other, overwrite=False, must_match=("classes",))
    assert rundir.prepare(train_dir, other, overwrite=True, must_match=("classes",)) is None
    assert sorted(p.name for p in train_dir.iterdir()) == ["notes.txt"]  # only what a run writes is cleared

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "checkpoint").write_text('model_checkpoint_path: "x.ckpt"\n')
    with pytest.raises(FinetuneError, match="holds files that finetune did not write"):
        rundir.prepare(foreign, SETTINGS, overwrite=False)


def test_an_unreadable_checkpoint_list_is_an_error_naming_it(tmp_path):
    (tmp_path / "checkpoint").write_bytes(b"\xff\x00 not text")
    with pytest.raises(FinetuneError, match=f"{tmp_path / 'checkpoint'} is unreadable"):
        rundir.newest_checkpoint(tmp_path)


# ------------------------------------------------------------------------------ a truncated config, by command


@pytest.fixture(scope="module")
def truncated_run(trained_run, tmp_path_factory):
    """A copy of a real finished run whose config.json lost its second half (a full disk, a killed copy)."""
    copy = tmp_path_factory.mktemp("truncated") / "run"
    shutil.copytree(trained_run.train_dir, copy)
    config = copy / "config.json"
    config.write_bytes(config.read_bytes()[:200])
    return copy


def _one_error_line(capsys, code: int, path) -> str:
    captured = capsys.readouterr()
    assert code == 1, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert str(path) in lines[0] and "unreadable or truncated" in lines[0] and "--overwrite" in lines[0]
    assert "Traceback" not in captured.err
    return lines[0]


def test_evaluate_export_and_train_report_a_truncated_config(trained_run, truncated_run, standin_checkpoint, capsys):
    config = truncated_run / "config.json"
    _one_error_line(capsys, cli.main(["evaluate", "--train-dir", str(truncated_run)]), config)
    _one_error_line(capsys, cli.main(["export", "--train-dir", str(truncated_run)]), config)
    resume = ["train", "--dataset", str(trained_run.dataset), "--train-dir", str(truncated_run),
              "--checkpoint", str(standin_checkpoint), "--image-size", "75", "--steps", "41"]  # fmt: skip
    _one_error_line(capsys, cli.main(resume), config)
    assert not (truncated_run / "model.pb").exists()
    assert rundir.checkpoint_step(rundir.newest_checkpoint(truncated_run)) == 40  # nothing was trained


def test_a_truncated_config_in_a_fresh_process_prints_no_traceback(truncated_run):
    result = run_cli("export", "--train-dir", str(truncated_run))
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: {truncated_run / 'config.json'} is unreadable or truncated")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_a_checkpoint_is_a_step_of_the_run_only_inside_its_train_dir(tmp_path, monkeypatch):
    run = tmp_path / "runs" / "flowers"
    (run / rundir.BEST_DIR).mkdir(parents=True)
    assert rundir.run_step(run, run / "model.ckpt-40") == 40
    assert rundir.run_step(run, run / rundir.BEST_DIR / "model.ckpt-24") == 24
    assert rundir.run_step(run, run / "sub" / ".." / "model.ckpt-8") == 8
    monkeypatch.chdir(tmp_path / "runs")
    assert rundir.run_step("flowers", "flowers/model.ckpt-40") == 40
    (tmp_path / "link").symlink_to(run)
    assert rundir.run_step(tmp_path / "link", run / "model.ckpt-40") == 40
    assert rundir.run_step(run, tmp_path / "link" / "model.ckpt-40") == 40
    # Another run's checkpoint, or a copy, names a step of its own run, not of this one.
    assert rundir.run_step(run, tmp_path / "runs" / "other" / "model.ckpt-40") is None
    assert rundir.run_step(run, tmp_path / "model.ckpt-40") is None
    assert rundir.choose_checkpoint(run, str(tmp_path / "copy" / "model.ckpt-40")).step is None
    assert rundir.choose_checkpoint(run, str(run / "model.ckpt-40")).step == 40
