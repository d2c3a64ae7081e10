"""The HTML evaluation report, opened in headless Chromium, and Grad-CAM on a model built to look at one corner."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageStat

from finetune.cli import main
from finetune.dataset import load_dataset

from tests.browser import Dom as _Dom
from tests.browser import chromium as _chromium

ODD_CLASS = "<img src=x onerror=alert(1)>"  # a folder name cannot hold "/", so not "</script>" (tested below)
NON_LATIN_CLASS = "цветы 花"
ODD_FILE = 'a&b "c".jpg'
MISTAKES = 3
def _write_photos(root: Path) -> None:
    """Three generated classes, renamed to an HTML-special and a non-Latin name, one file with HTML-special name."""
    from finetune.synthetic import make_image_folder

    folder = make_image_folder(root, num_classes=3, images_per_class=12, seed=5, min_side=80, max_side=120,
                               png_fraction=0.0)  # fmt: skip
    first, second = folder.classes[0], folder.classes[1]
    (root / first).rename(root / ODD_CLASS)
    (root / second).rename(root / NON_LATIN_CLASS)
    # The split follows a file's bytes; this one's (seed 5) land in the validation split.
    (root / ODD_CLASS / f"{first}_0001.jpg").rename(root / ODD_CLASS / ODD_FILE)


@pytest.fixture(scope="module")
def odd_report(tmp_path_factory, standin_checkpoint):
    """A small weak run (75 px, 10 head steps) on odd names, evaluated in-process with --mistakes 3."""
    from finetune.config import TrainConfig
    from finetune.train import train

    root = tmp_path_factory.mktemp("report")
    _write_photos(root / "photos")
    assert main(["build-dataset", str(root / "photos"), "--out", str(root / "dataset"),
                 "--validation-fraction", "0.5", "--workers", "1"]) == 0  # fmt: skip
    train(TrainConfig(dataset=str(root / "dataset"), train_dir=str(root / "run"), checkpoint=str(standin_checkpoint),
                      image_size=75, batch_size=8, steps=10, eval_every=5, lr_search="off"))  # fmt: skip
    assert main(["evaluate", "--train-dir", str(root / "run"), "--mistakes", str(MISTAKES)]) == 0
    import json

    evaluation = json.loads((root / "run" / "eval-validation.json").read_text())
    return SimpleNamespace(root=root, run=root / "run", html=Path(evaluation["html"]), evaluation=evaluation)


@pytest.fixture(scope="module")
def rendered(odd_report, tmp_path_factory):
    """The report opened once in headless Chromium for the tests that read it: the DOM it dumps after the
    page's script ran, with what it logged, and a 1280x1600 screenshot of the same load."""
    folder = tmp_path_factory.mktemp("chromium")
    shot = folder / "report.png"
    run = _chromium("--hide-scrollbars", "--window-size=1280,1600", f"--screenshot={shot}", "--dump-dom",
                    page=odd_report.html, tmp_path=folder)  # fmt: skip
    return SimpleNamespace(run=run, screenshot=shot)


def test_report_opens_in_chromium_without_errors_and_its_dom_adds_up(odd_report, rendered):
    evaluation = odd_report.evaluation
    assert odd_report.html == odd_report.run / "eval-validation.html"
    dumped = rendered.run
    assert dumped.returncode == 0, dumped.stderr
    console = [line for line in dumped.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []  # no script errors, no refused loads (the page's CSP forbids any)
    dom = _Dom()
    dom.feed(dumped.stdout)
    # The confusion matrix's counts, read from the rendered SVG, add up to the split.
    counts = [int(text) for text, tag, context in dom.texts
              if context[-1] == "text#.count" and any(c.startswith("svg#confusion") for c in context)]  # fmt: skip
    count_elements = [e for e in dom.within("svg#confusion") if e[0] == "text" and e[1].get("class") == "count"]
    assert len(count_elements) == len(evaluation["classes"]) ** 2
    split_size = load_dataset(str(odd_report.root / "dataset")).split_counts["validation"]
    assert sum(counts) == evaluation["examples"] == split_size
    # Every cell links to its examples' anchor, which exists.
    ids = {a.get("id") for _, a, _ in dom.elements}
    links = [a["href"] for tag, a, context in dom.within("svg#confusion") if tag == "a"]
    assert len(links) == len(evaluation["classes"]) ** 2
    assert all(link[1:] in ids for link, row in zip(links, np.asarray(evaluation["confusion"]).ravel()) if row)
    # The gallery holds as many pictures as mistakes asked for (or made), each a data: URI.
    wrong = evaluation["examples"] - round(evaluation["top1"] * evaluation["examples"])
    pictures = [a for tag, a, _ in dom.within("div#mistake-gallery") if tag == "img"]
    figures = [a for tag, a, _ in dom.within("div#mistake-gallery") if tag == "figure"]
    assert len(pictures) == len(figures) == min(MISTAKES, wrong) > 0
    assert all(a["src"].startswith("data:image/jpeg;base64,") for a in pictures)
    # Training curves from the run's events: loss, accuracy, learning rate.
    assert len([e for e in dom.elements if e[0] == "svg" and e[1].get("class") == "chart"]) == 3
    assert any(e[1].get("id") == "reliability" for e in dom.elements)
    # Nothing in the file points outside it.
    text = odd_report.html.read_text()
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in text


def test_odd_names_appear_as_text_never_as_markup(odd_report, rendered):
    dumped = rendered.run
    assert dumped.returncode == 0, dumped.stderr
    dom = _Dom()
    dom.feed(dumped.stdout)
    # The class name stays text: no element was made from it, and it reads back whole.
    assert not [a for tag, a, _ in dom.elements if "onerror" in a]
    assert [tag for tag, _, _ in dom.elements].count("script") == 1  # the report's own sorting script
    texts = "".join(text for text, _, _ in dom.texts)
    assert ODD_CLASS in texts
    assert NON_LATIN_CLASS in texts
    odd_paths = [p["path"] for p in odd_report.evaluation["predictions"] if p["path"].endswith(ODD_FILE)]
    assert odd_paths and all(path in texts for path in odd_paths)
    assert ODD_CLASS in {text for text, tag, _ in dom.texts if tag == "td"}


def test_a_script_class_name_is_escaped_in_the_html(odd_report):
    """A class named <script>alert(1)</script> (possible in a labels file, not in a folder name) stays text."""
    from finetune import report
    from finetune.evaluate import Evaluation, score

    classes = ["<script>alert(1)</script>", "plain"]
    probabilities = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]], np.float32)
    labels = np.array([0, 1, 1])
    paths = [ODD_FILE, "x/<b>bold</b>.jpg", "y.jpg"]
    evaluation = Evaluation(split="validation", classes=classes, source="ckpt", global_step=1, dataset="d",
                            dataset_fingerprint="f" * 16, seconds=1.0, images_per_second=3.0,
                            **score(probabilities, labels, paths, classes, mistakes=5))  # fmt: skip
    page = report.render(evaluation, probabilities, labels, {}, [1], [0], None)
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "a&amp;b &quot;c&quot;.jpg" in page
    assert "<b>bold</b>" not in page
    assert page.count("<script>") == 1


def test_the_report_is_written_atomically(odd_report, standin_checkpoint):
    """A failed build leaves the old report as it was; a finished one is renamed into place, nothing left over."""
    from finetune import report
    from finetune.dataset import load_dataset
    from finetune.evaluate import Evaluation

    fields = {k: v for k, v in odd_report.evaluation.items() if k in Evaluation.__dataclass_fields__}
    evaluation = Evaluation(**fields)
    from finetune.evaluate import ClassScore, ExamplePrediction, Mistake

    evaluation.per_class = [ClassScore(**row) for row in evaluation.per_class]
    evaluation.predictions = [ExamplePrediction(**row) for row in evaluation.predictions]
    evaluation.most_confident_mistakes = [Mistake(**row) for row in evaluation.most_confident_mistakes]
    classes = evaluation.classes
    labels = np.array([classes.index(p.label) for p in evaluation.predictions])
    probabilities = np.full((len(labels), len(classes)), 0.1, np.float32)
    probabilities[np.arange(len(labels)), [classes.index(p.predicted) for p in evaluation.predictions]] = 0.8
    path = odd_report.run / "atomic.html"
    path.write_text("the old report")
    before = os.stat(path).st_ino
    info = load_dataset(str(odd_report.root / "dataset"))

    with pytest.raises(ValueError):  # heat maps that do not fit the split: refused before anything is written
        report.write_report(path, evaluation, probabilities, labels, info, 75, np.zeros((1, 1, 1)), odd_report.run, 1)
    assert path.read_text() == "the old report"
    heat = np.random.default_rng(0).random((len(labels), 1, 1)).astype(np.float32)
    result = report.write_report(path, evaluation, probabilities, labels, info, 75, heat, odd_report.run, 1)
    assert path.read_text().startswith("<!DOCTYPE html>")
    assert os.stat(path).st_ino != before  # renamed into place, not rewritten in place
    assert result.size_bytes == path.stat().st_size
    assert not [p for p in odd_report.run.iterdir() if p.name.endswith(".tmp")]


def test_screenshot_is_not_blank(rendered):
    taken = rendered.run
    assert taken.returncode == 0, taken.stderr
    picture = Image.open(rendered.screenshot).convert("RGB")
    assert picture.size == (1280, 1600)
    stats = ImageStat.Stat(picture)
    assert max(stats.stddev) > 20  # text, the matrix and pictures, not one flat colour
    colours = picture.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200  # thumbnails and heat maps, not only text


def test_no_html_writes_none(odd_report, capsys):
    (odd_report.run / "eval-validation.html").rename(odd_report.run / "kept.html")
    try:
        assert main(["evaluate", "--train-dir", str(odd_report.run), "--no-html"]) == 0
        assert not (odd_report.run / "eval-validation.html").exists()
        assert "html report" not in capsys.readouterr().out
    finally:
        (odd_report.run / "kept.html").rename(odd_report.run / "eval-validation.html")


def test_explain_refuses_files_without_gradients(tmp_path, capsys):
    for name in ("model.tflite", "model.onnx"):
        assert main(["explain", "--model", str(tmp_path / name), "x.jpg"]) == 1
        error = capsys.readouterr().err
        assert error.startswith(f"error: --model {tmp_path / name}: Grad-CAM needs gradients")
        assert ".pb" in error and error.count("\n") == 1


# ------------------------------------------------------------------------------------------ Grad-CAM


def _corner_photos(root: Path, count: int, size: int = 150) -> None:
    """Two classes of the same textured backgrounds; "corner" adds a bright square in the top-left quarter."""
    rng = np.random.default_rng(7)
    for name in ("plain", "corner"):
        (root / name).mkdir(parents=True)
        for number in range(count):
            base = rng.integers(60, 140, 3)
            pixels = np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            if name == "corner":
                x, y = rng.integers(20, 36, 2)  # inside the eval crop, inside the top-left quarter
                pixels[y : y + 34, x : x + 34] = (255, 240, 0)
            Image.fromarray(pixels).save(root / name / f"{number:03d}.jpg", quality=92)


@pytest.mark.slow
def test_gradcam_looks_at_the_corner_that_decides_the_class(tmp_path_factory, standin_checkpoint, capsys):
    from finetune import gradcam
    from finetune.config import TrainConfig
    from finetune.train import train
    from tests.conftest import validation_examples

    root = tmp_path_factory.mktemp("corner")
    _corner_photos(root / "photos", 24)
    assert main(["build-dataset", str(root / "photos"), "--out", str(root / "dataset"),
                 "--validation-fraction", "0.5", "--workers", "1"]) == 0  # fmt: skip
    size = 139  # Mixed_7c is 3x3 here: the smallest size with a grid to point into
    result = train(TrainConfig(dataset=str(root / "dataset"), train_dir=str(root / "run"),
                               checkpoint=str(standin_checkpoint), image_size=size, batch_size=8, steps=60,
                               eval_every=0, lr_search="off"))  # fmt: skip
    run = SimpleNamespace(dataset=root / "dataset", image_size=size)
    images, labels, paths = validation_examples(run)
    classes = list(load_dataset(str(root / "dataset")).classes)
    corner = classes.index("corner")
    from finetune.evaluate import checkpoint_source, predict_split

    # evaluate computes the maps inside its own pass over the split; they must be GradCam's maps.
    extras: dict = {}
    every, _, _, _ = predict_split(load_dataset(str(root / "dataset")), "validation", 50, size,
                                   *checkpoint_source(result.checkpoint, 2, heat_maps=True), extras)  # fmt: skip
    cam = gradcam.from_checkpoint(result.checkpoint, classes, size)
    try:
        probabilities, heat = cam.run(images[labels == corner], np.full((labels == corner).sum(), corner))
        _, again = cam.run(images, every.argmax(axis=1))
    finally:
        cam.close()
    assert heat.shape[1:] == (3, 3)
    np.testing.assert_allclose(extras["heat_maps"], again, atol=1e-4)
    peaks = [np.unravel_index(np.argmax(gradcam.upsample(h, size)), (size, size)) for h in heat]
    inside = [y < size / 2 and x < size / 2 for y, x in peaks]
    assert np.mean(inside) >= 0.9, (peaks, probabilities)
    # The same through `finetune explain` with the exported .pb: the frozen graph differentiates too.
    capsys.readouterr()
    assert main(["export", "--train-dir", str(root / "run")]) == 0
    capsys.readouterr()
    files = [str(p) for p in sorted((root / "photos" / "corner").iterdir())[:4]]
    assert main(["explain", "--model", str(root / "run" / "model.pb"), "--class", "corner",
                 "--out", str(root / "explained"), *files]) == 0  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all("Grad-CAM for corner" in line for line in lines)
    written = sorted((root / "explained").iterdir())
    assert [p.name for p in written] == [f"{Path(f).stem}.gradcam.jpg" for f in files]
    overlay = Image.open(written[0])
    assert overlay.size == (2 * 224 + 4, 224)
