"""`finetune audit`: planted label errors found, copies across classes shown, an old dataset explained."""

from __future__ import annotations

import colorsys
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune import audit, cli, lr_search
from finetune.config import BuildDatasetConfig
from finetune.dataset import build_dataset

from tests.browser import Dom, chromium


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


def _tinted_classes(root: Path, per_class: int, seed: int) -> list[str]:
    """Classes "blue", "green", "red": 75-110 px JPEGs of their hue (a little jitter in hue, saturation and
    brightness, faint noise). The stand-in's random features separate these (clean out-of-fold accuracy about
    0.97), where they do not separate make_image_folder's shapes well enough to judge the audit's ranking."""
    rng = np.random.default_rng(seed)
    names = ["red", "green", "blue"]
    for index, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for number in range(per_class):
            width, height = (int(side) for side in rng.integers(75, 111, size=2))
            hue = (index / 3 + rng.normal(0, 0.03)) % 1.0
            colour = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.75, 0.9), rng.uniform(0.75, 0.9))) * 255
            pixels = np.clip(colour + rng.normal(0, 2, size=(height, width, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "RGB").save(root / name / f"{name}_{number:03d}.jpg", quality=90)
    return sorted(names)


@pytest.fixture(scope="module")
def planted_dataset(tmp_path_factory):
    """A 3-class generated set of 120 images with 5% of each class moved to another class's folder, built."""
    root = tmp_path_factory.mktemp("audit")
    photos = root / "photos"
    planted = _plant(photos, _tinted_classes(photos, per_class=40, seed=7), 0.05, seed=7)
    # A copy of one image filed under another class too: the same photo under two labels.
    source = sorted((photos / "red").glob("red_*"))[0]
    shutil.copy(source, photos / "green" / "same_photo.jpg")
    build_dataset(BuildDatasetConfig(image_dir=str(photos), out=str(root / "dataset"), workers=1,
                                     validation_fraction=0.2))  # fmt: skip
    return root, planted, f"red/{source.name}"


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
def test_audit_on_the_standin_finds_the_planted_errors_and_shows_them_and_the_copy_in_its_page(
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
    # The bar of issue 22: at least 80% of the planted errors (6 of 121 images) in the first 2x entries.
    top = {issue["path"] for issue in issues[: 2 * len(planted)]}
    assert len(top & planted) >= 0.8 * len(planted), (sorted(planted), [i["path"] for i in issues[:12]])
    copies = report["cross_class_duplicates"]
    assert [sorted(group["paths"]) for group in copies] == [sorted([copied, "green/same_photo.jpg"])]
    # The page, as a browser renders it: no script errors, a picture, the given and suggested label and the
    # score for each listed error, in rank order; both copies of the photo filed twice.
    dumped = chromium("--dump-dom", page=out / "audit.html", tmp_path=tmp_path)
    assert dumped.returncode == 0, dumped.stderr
    assert [line for line in dumped.stderr.splitlines() if ":CONSOLE" in line] == []
    dom = Dom()
    dom.feed(dumped.stdout)
    figures = [a for tag, a, _ in dom.within("div#issue-gallery") if tag == "figure"]
    pictures = [a for tag, a, _ in dom.within("div#issue-gallery") if tag == "img"]
    assert len(figures) == len(pictures) == min(len(issues), 50) > 0  # --top's default: 50
    assert [a["alt"] for a in pictures] == [issue["path"] for issue in issues[:50]]
    assert all(a["src"].startswith("data:image/jpeg;base64,") for a in pictures)
    captions = [text for text, tag, context in dom.texts if any(c.startswith("figure#issue-1") for c in context)]
    assert issues[0]["given"] in captions and issues[0]["suggested"] in captions
    assert f"{issues[0]['given_probability']:.3f}" in captions
    shown = [a["alt"] for tag, a, _ in dom.within("div#copies-1") if tag == "img"]
    assert sorted(shown) == sorted([copied, "green/same_photo.jpg"])


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
