"""`finetune audit`: planted label errors found, copies across classes shown, an old dataset explained."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from finetune import audit, cli, lr_search
from finetune.config import BuildDatasetConfig
from finetune.dataset import build_dataset
from finetune.synthetic import make_image_folder


def _plant(root: Path, classes: list[str], share: float, seed: int) -> set[str]:
    """Moves ``share`` of each class's images into the next class's folder; returns the moved paths."""
    rng = np.random.default_rng(seed)
    planted = set()
    for index, name in enumerate(classes):
        files = sorted((root / name).iterdir())
        other = classes[(index + 1) % len(classes)]
        for position in rng.choice(len(files), size=max(1, round(share * len(files))), replace=False):
            target = root / other / f"moved_{files[position].name}"
            files[position].rename(target)
            planted.add(f"{other}/{target.name}")
    return planted


@pytest.fixture(scope="module")
def planted_dataset(tmp_path_factory):
    """A 3-class generated set of 120 images with 5% of each class moved to another class's folder, built."""
    root = tmp_path_factory.mktemp("audit")
    folder = make_image_folder(root / "photos", num_classes=3, images_per_class=40, seed=5, min_side=75,
                               max_side=110, png_fraction=0)  # fmt: skip
    planted = _plant(folder.root, list(folder.classes), 0.05, seed=5)
    build_dataset(BuildDatasetConfig(image_dir=str(folder.root), out=str(root / "dataset"), workers=1,
                                     validation_fraction=0.2))  # fmt: skip
    # A copy of one image filed under another class too: the same photo under two labels.
    source = sorted((folder.root / "discs").glob("discs_*"))[0]
    shutil.copy(source, folder.root / "squares" / "same_photo.jpg")
    build_dataset(BuildDatasetConfig(image_dir=str(folder.root), out=str(root / "dataset"), workers=1,
                                     validation_fraction=0.2, overwrite=True))  # fmt: skip
    return root, planted, f"discs/{source.name}"


def test_the_rule_flags_a_confidently_other_image_and_ranks_by_the_given_label():
    labels = np.array([0, 0, 0, 1, 1, 1])
    probabilities = np.array([[0.9, 0.1], [0.8, 0.2], [0.2, 0.8],  # the third looks like class 1
                              [0.1, 0.9], [0.3, 0.7], [0.45, 0.55]])  # fmt: skip
    rows, suggested, thresholds = audit.find_label_issues(probabilities, labels, 2)
    assert rows == [2] and suggested == [1]
    assert thresholds.tolist() == pytest.approx([(0.9 + 0.8 + 0.2) / 3, (0.9 + 0.7 + 0.55) / 3])


def test_fold_heads_judge_each_image_by_a_head_that_never_saw_it():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 2048)).astype(np.float32)
    labels = np.repeat(np.arange(3), 20)
    features = centres[labels] + 0.3 * rng.normal(size=(60, 2048)).astype(np.float32)
    flipped = 7  # labelled 0, looks like class 2
    features[flipped] = centres[2] + 0.3 * rng.normal(size=2048)
    paths = [f"{i}.jpg".encode() for i in range(60)]
    folds = lr_search.fold_of_each(paths, labels, seed=0, folds=5)
    probabilities = audit.train_fold_heads(features, labels, folds, 3)
    assert not np.isnan(probabilities).any()
    # A head that had seen image 7 labelled 0 would give it some weight; held out, it is plainly class 2.
    assert probabilities[flipped].argmax() == 2 and probabilities[flipped, 0] < 0.2
    rows, suggested, _ = audit.find_label_issues(probabilities, labels, 3)
    assert rows[0] == flipped and suggested[0] == 2


@pytest.mark.slow
def test_audit_on_the_standin_writes_json_and_html_and_shows_the_copy_across_classes(
    planted_dataset, standin_checkpoint, tmp_path, capsys
):
    root, planted, copied = planted_dataset
    out = tmp_path / "report"
    code = cli.main(["audit", str(root / "dataset"), "--checkpoint", str(standin_checkpoint), "--out", str(out),
                     "--image-size", "75"])  # fmt: skip
    assert code == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"audit of {root / 'dataset'}: ") and "likely label errors" in line
    assert "1 set(s) of copies across classes" in line and str(out / "audit.html") in line
    report = json.loads((out / "audit.json").read_text())
    assert report["images"] == 121 and report["folds"] == 5 and report["judged"] == 121
    issues = report["label_issues"]
    assert all(issue["given"] != issue["suggested"] for issue in issues)
    assert [i["given_probability"] for i in issues] == sorted(i["given_probability"] for i in issues)
    copies = report["cross_class_duplicates"]
    assert [sorted(group["paths"]) for group in copies] == [sorted([copied, "squares/same_photo.jpg"])]
    page = (out / "audit.html").read_text()
    assert page.count("data:image/jpeg;base64,") >= min(len(issues), 50) + 2
    assert "squares/same_photo.jpg" in page and "<script" not in page
    # The stand-in's random features still separate these drawn shapes somewhat: the planted images rank
    # above chance (6 of 121 are planted; the first 12 entries would hold 0.6 of them by chance).
    top = {issue["path"] for issue in issues[: 2 * len(planted)]}
    assert len(top & planted) >= 2, (sorted(planted), [i["path"] for i in issues[:12]])


@pytest.mark.slow
def test_a_dataset_from_before_near_duplicates_is_audited_with_a_note_on_how_to_rebuild(
    planted_dataset, standin_checkpoint, tmp_path, capsys
):
    root, *_ = planted_dataset
    old = tmp_path / "old"
    shutil.copytree(root / "dataset", old)
    meta = json.loads((old / "dataset.json").read_text())
    for key in ("near_duplicates", "split"):
        del meta[key]
    meta["version"] = 1
    (old / "dataset.json").write_text(json.dumps(meta))
    code = cli.main(["audit", str(old), "--checkpoint", str(standin_checkpoint), "--out", str(tmp_path / "r"),
                     "--image-size", "75"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0
    assert "built before near-duplicate checking" in captured.err and "--overwrite" in captured.err
    report = json.loads((tmp_path / "r" / "audit.json").read_text())
    assert "finetune build-dataset IMAGE_DIR --out" in report["near_duplicates_note"]
    # Identical files are in every version's dataset.json: the copy across classes is still shown.
    assert len(report["cross_class_duplicates"]) == 1
    # The old dataset still trains and evaluates.
    from finetune.config import EvaluateConfig, TrainConfig
    from finetune.evaluate import evaluate
    from finetune.train import train

    trained = train(TrainConfig(dataset=str(old), train_dir=str(tmp_path / "run"), checkpoint=str(standin_checkpoint),
                                image_size=75, batch_size=8, steps=2, eval_every=0))  # fmt: skip
    assert trained.global_step == 2
    evaluation = evaluate(EvaluateConfig(train_dir=str(tmp_path / "run")))
    assert evaluation.examples == meta["split_counts"]["validation"]


def test_audit_refuses_a_missing_dataset_naming_it(tmp_path, capsys):
    assert cli.main(["audit", str(tmp_path / "nope")]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: DATASET ") and "nope" in error and "build-dataset" in error
