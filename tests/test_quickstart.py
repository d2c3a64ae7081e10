"""`finetune quickstart` offline: every stage runs, every artefact it names is there and valid, every result
it prints is labelled "not pretrained"; and its refusals."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from finetune import cli
from finetune.pretrained import PRETRAINED
from finetune.quickstart import MARKER, STAGES, STANDIN_CHECKPOINT
from tests.conftest import closed_port_url, run_cli, spawn_cli

CLASSES = ["discs", "rings", "squares", "stars", "triangles"]
# Small enough to run in well under a minute: 100 photos at 75 px, 6 steps of 8.
SMALL = ["--images-per-class", "20", "--image-size", "75", "--steps", "6", "--batch-size", "8"]


def _closed_port_url() -> str:
    return closed_port_url(PRETRAINED["inception_v3"].tarball)


def _section(stdout: str, title: str) -> list[str]:
    """The indented lines under a line that starts with ``title``."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title)) + 1
    section = []
    for line in lines[start:]:
        if not line.startswith("  "):
            break
        section.append(line.strip())
    return section


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    """One quickstart run in the default work folder (the current one), at small sizes, with the download
    pointed at a closed port; in a fresh process, as a user runs it, so stderr is all a user would see."""
    workdir = tmp_path_factory.mktemp("quickstart")
    result = spawn_cli("quickstart", "--url", _closed_port_url(), *SMALL, cwd=workdir)
    return workdir, result


@pytest.mark.slow
def test_offline_quickstart_says_so_once_and_labels_every_result(offline_run):
    workdir, result = offline_run
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1, result.stderr
    assert warnings[0].startswith("warning: no pretrained checkpoint: cannot reach 127.0.0.1")
    assert "Connection refused" in warnings[0] and "NOT PRETRAINED" in warnings[0]
    headers = [line for line in result.stderr.splitlines() if re.match(r"\[\d/\d\] ", line)]
    assert [h.split(":")[0] for h in headers] == [f"[{i}/7] {name}" for i, name in enumerate(STAGES, 1)]
    out = result.stdout
    assert "NOT PRETRAINED" in out
    results = [line for line in out.splitlines() if "accuracy" in line or "labelled right" in line]
    results += _section(out, "new photos:")
    assert len(results) == 2 + 2 * len(CLASSES)
    for line in results:
        assert "(not pretrained)" in line, line


@pytest.mark.slow
def test_offline_quickstart_writes_every_artefact_it_names(offline_run):
    from PIL import Image

    from finetune import model
    from finetune.compat import tf
    from finetune.config import PredictConfig
    from finetune.dataset import load_dataset
    from finetune.modelfile import load_graph_def, read_model
    from finetune.predict import predict

    workdir, result = offline_run
    assert result.returncode == 0, result.stderr
    named = {}
    for line in _section(result.stdout, "artefacts:"):
        name, where = re.split(r"\s{2,}", line, maxsplit=1)
        named[name] = [workdir / path for path in re.findall(r"(?:checkpoints|datasets|runs)/[\w./-]+[\w]", where)]
        for path in named[name]:
            assert path.exists(), f"{name}: {path} is named but missing"
    assert set(named) == {"checkpoint", "photos", "new photos", "dataset", "train dir", "evaluation", "model",
                          "predictions"}  # fmt: skip

    # The stand-in checkpoint: slim's InceptionV3, every variable of the published one, and honestly named.
    (checkpoint,) = named["checkpoint"]
    assert checkpoint == workdir / "checkpoints" / STANDIN_CHECKPOINT
    assert not (workdir / "checkpoints" / "inception_v3.ckpt").exists()
    shapes = model.open_checkpoint(checkpoint).shapes
    assert sum(1 for name in shapes if name.startswith("InceptionV3/")) == 388

    # The photos and the dataset built from them: 5 classes of 20, each with a validation photo.
    (photos,) = named["photos"]
    assert sorted(p.name for p in photos.iterdir() if not p.name.startswith(".")) == CLASSES
    assert sum(1 for _ in photos.rglob("*_*.*")) == 100
    (dataset,) = named["dataset"]
    info = load_dataset(dataset)
    assert list(info.classes) == CLASSES
    assert sum(info.split_counts.values()) == 100
    assert all(count > 0 for count in info.class_counts["validation"])

    # The run: its checkpoint at the last step, started from the stand-in.
    (train_dir,) = named["train dir"]
    plan = json.loads((train_dir / "config.json").read_text())
    assert plan["checkpoint"] == str(checkpoint.resolve()) and plan["image_size"] == 75
    latest = tf.train.latest_checkpoint(str(train_dir))
    assert latest.endswith("model.ckpt-6")
    assert tf.compat.v1.train.NewCheckpointReader(latest).get_tensor("global_step") == 6

    # The evaluation: the whole validation split, the number printed, a real PNG.
    report_path, png = named["evaluation"]
    report = json.loads(report_path.read_text())
    assert report["examples"] == info.split_counts["validation"]
    assert f"validation accuracy {report['top1']:.4f} over {report['examples']} photos" in result.stdout
    with Image.open(png) as picture:
        assert picture.format == "PNG" and picture.width > 100

    # The model and its sidecars.
    (pb,) = named["model"]
    load_graph_def(pb)
    sidecar = read_model(pb).values
    assert sidecar["classes"] == CLASSES and sidecar["image_size"] == 75
    assert sidecar["pretrained_from"] == str(checkpoint.resolve())
    assert pb.with_suffix(".labels.txt").read_text().split() == CLASSES

    # The predictions: the new photos (none of them in the dataset), as the .pb labels them.
    (predictions_path,) = named["predictions"]
    saved = json.loads(predictions_path.read_text())
    assert saved["pretrained"] is False
    (new_photos,) = named["new photos"]
    files = sorted(str(p.relative_to(workdir)) for p in new_photos.rglob("*_*.*"))
    assert sorted(p["path"] for p in saved["predictions"]) == files and len(files) == 2 * len(CLASSES)
    digests = {hashlib.sha256(p.read_bytes()).digest() for p in photos.rglob("*_*.*")}
    assert not digests & {hashlib.sha256(p.read_bytes()).digest() for p in new_photos.rglob("*_*.*")}
    again = {p.path: p.top[0] for p in predict(PredictConfig(paths=(str(new_photos),), model=str(pb)))}
    for prediction in saved["predictions"]:
        assert prediction["expected"] == Path(prediction["path"]).parent.name
        name, probability = again[str(workdir / prediction["path"])]
        assert prediction["predicted"] == name
        assert prediction["probability"] == pytest.approx(probability, abs=1e-5)


@pytest.mark.slow
def test_after_a_download_quickstart_runs_offline_on_the_checkpoint_and_labels_nothing(standin_tarball, tmp_path):
    # `finetune download` installs a (stand-in) pretrained tarball into the work folder's checkpoints; quickstart,
    # pointed at a closed port as on an offline machine, finds it verified and uses it. The photos an earlier run
    # left (marked as quickstart's) are replaced, not added to.
    from PIL import Image

    earlier = tmp_path / "datasets" / "quickstart-photos"
    (earlier / "balloons").mkdir(parents=True)
    (earlier / MARKER).write_text("written by an earlier run\n")
    Image.new("RGB", (90, 90), "red").save(earlier / "balloons" / "balloons_0.jpg")
    installed = run_cli("download", "--url", str(standin_tarball), "--dest", str(tmp_path / "checkpoints"))
    assert installed.returncode == 0, installed.stderr
    result = run_cli("quickstart", "--url", _closed_port_url(), *SMALL, "--steps", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "warning: " not in result.stderr
    assert "not pretrained" not in result.stdout.lower()
    (checkpoint,) = [line for line in _section(result.stdout, "artefacts:") if line.startswith("checkpoint ")]
    assert checkpoint.split()[-1] == "checkpoints/inception_v3.ckpt"
    assert not (tmp_path / "checkpoints" / STANDIN_CHECKPOINT).exists()
    plan = json.loads((tmp_path / "runs" / "quickstart" / "config.json").read_text())
    assert plan["checkpoint"] == str((tmp_path / "checkpoints" / "inception_v3.ckpt").resolve())
    assert json.loads((tmp_path / "runs" / "quickstart" / "predictions.json").read_text())["pretrained"] is True
    assert sorted(p.name for p in earlier.iterdir() if p.is_dir()) == CLASSES
    assert sum(1 for _ in earlier.rglob("*_*.*")) == 100


def test_a_folder_quickstart_did_not_write_is_refused_untouched(tmp_path):
    mine = tmp_path / "datasets" / "quickstart-photos" / "holiday.jpg"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"my photo")
    result = run_cli("quickstart", "--workdir", str(tmp_path), "--url", _closed_port_url(), *SMALL)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --workdir {tmp_path}: {mine.parent} holds files that quickstart did not write, and a run "
        "would replace them; move them away or pass another --workdir"
    )
    assert mine.read_bytes() == b"my photo"
    assert not (tmp_path / "checkpoints").exists(), "refused before any work"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--images-per-class", "5"], "error: --images-per-class 5: must be at least 20"),
        (["--steps", "0"], "error: --steps 0: must be at least 1"),
        (["--image-size", "40"], "error: --image-size 40 is out of range"),
        (["--url", "nowhere/inception_v3_2016_08_28.tar.gz"], "error: --url nowhere/inception_v3_2016_08_28.tar.gz: "
                                                              "no such file"),  # fmt: skip
    ],
)
def test_bad_flags_are_one_line_errors_naming_the_flag(tmp_path, capsys, flags, message):
    code = cli.main(["quickstart", "--workdir", str(tmp_path), *flags])
    err = capsys.readouterr().err
    assert code == 1
    assert err.strip().splitlines()[-1].startswith(message), err
    assert not (tmp_path / "datasets").exists()
