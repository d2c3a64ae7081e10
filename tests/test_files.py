"""What finetune writes follows the user's umask, like any other program's files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from finetune.config import BuildDatasetConfig, EvaluateConfig, ExportConfig, TrainConfig
from finetune.dataset import build_dataset
from finetune.evaluate import evaluate
from finetune.export import export
from finetune.files import write_text_atomically
from finetune.synthetic import make_image_folder
from finetune.train import train


def _written_under(umask: int, work: Path, photos: Path, checkpoint: Path) -> list[Path]:
    """Runs build-dataset, train, evaluate and export with the umask set; returns every path they made."""
    dataset, run, exported = work / "dataset", work / "run", work / "export"
    previous = os.umask(umask)
    try:
        build_dataset(BuildDatasetConfig(image_dir=str(photos), out=str(dataset), validation_fraction=0.5,
                                         workers=1))  # fmt: skip
        train(TrainConfig(dataset=str(dataset), train_dir=str(run), checkpoint=str(checkpoint), image_size=75,
                          batch_size=4, steps=2, save_every=1, eval_every=0))  # fmt: skip
        evaluate(EvaluateConfig(train_dir=str(run)))
        export(ExportConfig(train_dir=str(run), out=str(exported / "model.pb"), saved_model=str(exported / "saved")))
    finally:
        os.umask(previous)
    return [path for root in (dataset, run, exported) for path in (root, *root.rglob("*"))]


@pytest.mark.slow
def test_every_file_of_a_dataset_run_and_export_follows_the_umask(standin_checkpoint, tmp_path):
    """Under 027 a file must be readable by its group and by nobody else: a temporary file's 0600 fails the
    first half, a mode forced to 0644 the second."""
    photos = tmp_path / "photos"
    make_image_folder(photos, num_classes=2, images_per_class=6, seed=2, min_side=80, max_side=100)
    paths = _written_under(0o027, tmp_path / "work", photos, standin_checkpoint)
    names = {path.name for path in paths}
    assert {"dataset.json", "config.json", "eval-validation.json", "eval-validation.png", "model.json",
            "model.labels.txt", "model.pb", "saved_model.pb"} <= names, names  # fmt: skip
    assert any(name.startswith("model.ckpt-") for name in names) and any(".tfrecord" in n for n in names)
    for path in paths:
        mode = stat.S_IMODE(path.stat().st_mode)
        wanted = 0o050 if path.is_dir() else 0o040  # the group may read every file and list every folder
        assert mode & wanted == wanted and mode & 0o007 == 0, f"{path} has mode {mode:o}"


def test_an_atomic_write_takes_the_umask_and_leaves_no_temporary(tmp_path):
    previous = os.umask(0o027)
    try:
        write_text_atomically(tmp_path / "report.json", "{}\n")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "report.json").stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_an_unpacked_checkpoint_and_its_manifest_follow_the_umask(standin_tarball, tmp_path):
    from finetune.config import DownloadConfig
    from finetune.download import download

    previous = os.umask(0o022)
    try:
        result = download(DownloadConfig(dest=str(tmp_path / "checkpoints"), url=str(standin_tarball)))
    finally:
        os.umask(previous)
    for path in (Path(result.checkpoint), Path(result.manifest_path)):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
