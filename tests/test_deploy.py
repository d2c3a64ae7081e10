"""Every export format answers as the .pb does: TFLite (float, float16, int8), ONNX and SavedModel; predict and
evaluate take each file; the docs' snippets run without TensorFlow; refusals are one line."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from finetune import cli, modelfile
from finetune.config import ExportConfig
from finetune.errors import FinetuneError
from finetune.export import export
from finetune.runtimes import open_runner
from tests.conftest import validation_examples

pytestmark = pytest.mark.slow

DEPLOY_DOC = (Path(__file__).resolve().parent.parent / "docs" / "deploy.md").read_text()
# float16 stores the weights at half precision and computes in float32: each weight moves by up to 2^-11 of
# itself, which moves the probabilities of this small model by about 1e-3 at most; 1e-2 leaves room.
FLOAT16_TOLERANCE = 1e-2


@pytest.fixture(scope="module")
def exports(trained_run, tmp_path_factory):
    """The trained run exported in every format: float, float16 and int8 TFLite in three places."""
    root = tmp_path_factory.mktemp("deploy")
    run = str(trained_run.train_dir)
    every = export(ExportConfig(train_dir=run, out=str(root / "model.pb"),
                                format=("pb", "tflite", "onnx", "saved_model")))  # fmt: skip
    half = export(ExportConfig(train_dir=run, out=str(root / "half" / "model.pb"), format=("tflite",),
                               quantize="float16"))  # fmt: skip
    int8 = export(ExportConfig(train_dir=run, out=str(root / "int8" / "model.pb"), format=("tflite",),
                               quantize="int8", calibration_images=16, calibration_seed=3))  # fmt: skip
    return SimpleNamespace(root=root, every=every, half=half, int8=int8)


@pytest.fixture(scope="module")
def validation(trained_run):
    return validation_examples(trained_run)


def _probabilities(path, images) -> np.ndarray:
    runner = open_runner(path)
    try:
        return runner.run(images)
    finally:
        runner.close()


@pytest.fixture(scope="module")
def reference(exports, validation):
    """The .pb's probabilities through its `input` path."""
    return _probabilities(exports.every.files["pb"], validation[0])


def test_float_tflite_onnx_and_saved_model_give_the_pb_probabilities(exports, validation, reference):
    images = validation[0]
    assert len(images) >= 12 and reference.shape == (len(images), 6)
    for kind in ("tflite", "onnx", "saved_model"):
        difference = np.abs(_probabilities(exports.every.files[kind], images) - reference).max()
        assert difference <= 1e-4, (kind, difference)
    runner = open_runner(exports.every.files["tflite"])
    assert runner.runtime.startswith("ai-edge-litert"), runner.runtime  # the standalone LiteRT, installed by [test]
    runner.close()


def test_float16_is_close_and_int8_mostly_agrees(exports, validation, reference):
    half = _probabilities(exports.half.files["tflite"], validation[0])
    assert np.abs(half - reference).max() <= FLOAT16_TOLERANCE
    int8 = _probabilities(exports.int8.files["tflite"], validation[0])
    assert np.allclose(int8.sum(axis=1), 1.0, atol=0.02)
    agreement = float((int8.argmax(axis=1) == reference.argmax(axis=1)).mean())
    print(f"int8 top-1 agreement with the .pb: {agreement:.3f} over {len(reference)} validation images")
    assert agreement >= 0.5  # reported above; quantization may flip close calls, not most answers
    sizes = exports.every.sizes["tflite"], exports.half.sizes["tflite"], exports.int8.sizes["tflite"]
    assert sizes[1] < 0.6 * sizes[0] and sizes[2] < 0.35 * sizes[0], sizes


def test_model_json_says_how_each_file_was_made(trained_run, exports):
    every = json.loads(Path(exports.every.sidecar).read_text())
    assert set(every["formats"]) == {"pb", "tflite", "onnx", "saved_model"}
    assert every["formats"]["onnx"]["opset"] == 17 and every["formats"]["tflite"]["quantize"] == "none"
    assert every["formats"]["tflite"]["inputs"] == ["input"]  # no decoding inside: preprocessing says how
    assert every["preprocessing"]["central_crop_fraction"] == 0.875
    calibration = json.loads(Path(exports.int8.sidecar).read_text())["formats"]["tflite"]["calibration"]
    assert calibration == {"dataset": str(trained_run.dataset), "split": "train", "images": 16, "seed": 3,
                           "preprocessing": "eval"}  # fmt: skip
    inner = modelfile.read_model(exports.every.files["saved_model"])  # sidecars inside, in assets.extra/
    assert inner.kind == "saved_model" and list(inner.classes) == exports.every.classes
    import onnx

    metadata = {p.key: p.value for p in onnx.load(exports.every.files["onnx"]).metadata_props}
    assert json.loads(metadata["classes"]) == exports.every.classes


def _photos(trained_run, count: int = 3) -> list[str]:
    """A few of the run's photos, one per class."""
    folders = sorted(p for p in trained_run.photos.iterdir() if p.is_dir())[:count]
    return [str(sorted(folder.glob("*.jpg"))[0]) for folder in folders]


def _predict_top1(capsys, model, photos) -> list[str]:
    assert cli.main(["predict", "--model", str(model), "--json", *photos]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    return [line["predictions"][0]["class"] for line in lines]


@pytest.fixture(scope="module")
def pb_top1(trained_run, exports) -> list[str]:
    """`finetune predict --json` on the .pb: the best class of each of _photos(), asked once for the module
    (a module fixture has no capsys, so its stdout is caught here)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["predict", "--model", exports.every.files["pb"], "--json", *_photos(trained_run)])
    assert code == 0
    return [json.loads(line)["predictions"][0]["class"] for line in out.getvalue().splitlines()]


def test_predict_takes_every_format_and_agrees_with_the_pb(trained_run, exports, capsys, pb_top1):
    photos = _photos(trained_run)
    expected = pb_top1
    assert len(expected) == len(photos) == 3
    for kind in ("tflite", "onnx", "saved_model"):
        assert _predict_top1(capsys, exports.every.files[kind], photos) == expected, kind


def test_evaluate_a_tflite_reports_the_accuracy_of_its_own_predictions(exports, capsys):
    model = exports.int8.files["tflite"]
    assert cli.main(["evaluate", "--model", model, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    report = json.loads(Path(result["report"]).read_text())
    assert Path(result["report"]).name == "model.tflite.eval-validation.json"
    rows = report["predictions"]
    assert len(rows) == report["examples"] > 0
    assert report["top1"] == sum(row["label"] == row["predicted"] for row in rows) / len(rows)
    assert report["source"] == str(Path(model).resolve()) and report["runtime"].startswith("ai-edge-litert")


# ------------------------------------------------------------------------ the docs' snippets, no TensorFlow


def _doc_snippets() -> list[str]:
    """The Python blocks of docs/deploy.md, in order: the LiteRT snippet, then the onnxruntime one."""
    found = re.findall(r"^```(\w*)\n(.*?)^```", DEPLOY_DOC, re.MULTILINE | re.DOTALL)
    return [body for language, body in found if language == "python"]


def _isolated_path(tmp_path: Path, packages: list[str]) -> Path:
    """A folder of links to only these installed packages (and the shared libraries their wheels carry)."""
    folder = tmp_path / "site"
    folder.mkdir(parents=True)
    for name in packages:
        spec = importlib.util.find_spec(name)
        assert spec and spec.submodule_search_locations, f"{name} is not installed; pip install -e '.[test]'"
        package = Path(spec.submodule_search_locations[0])
        (folder / package.name).symlink_to(package)
        for libs in package.parent.glob(f"{package.name}.libs"):
            (folder / libs.name).symlink_to(libs)
    for libs in package.parent.glob("pillow.libs"):
        if not (folder / libs.name).exists():
            (folder / libs.name).symlink_to(libs)
    return folder


def _run_isolated(tmp_path: Path, packages: list[str], snippet: str, *args: str) -> subprocess.CompletedProcess:
    """Runs ``snippet`` in a Python that sees the standard library and ``packages`` alone (-I -S: no site)."""
    folder = _isolated_path(tmp_path, packages)
    script = tmp_path / "snippet.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(folder)!r})\n" + snippet)
    check = subprocess.run([sys.executable, "-I", "-S", "-c",
                            f"import sys; sys.path.insert(0, {str(folder)!r}); import tensorflow"],
                           capture_output=True, text=True)  # fmt: skip
    assert check.returncode != 0 and "No module named 'tensorflow'" in check.stderr
    return subprocess.run([sys.executable, "-I", "-S", str(script), *args], capture_output=True, text=True,
                          timeout=120)  # fmt: skip


@pytest.mark.parametrize(
    "snippet, kind, packages",
    [(0, "tflite", ["ai_edge_litert", "numpy", "PIL"]), (1, "onnx", ["onnxruntime", "numpy", "PIL"])],
    ids=["litert", "onnxruntime"],
)
def test_the_docs_snippet_runs_without_tensorflow_and_agrees_with_predict(
    trained_run, exports, pb_top1, tmp_path, snippet, kind, packages
):
    code = _doc_snippets()[snippet]
    assert f"import {packages[0]}" in code or f"from {packages[0]}" in code
    photos = _photos(trained_run)
    for photo, best in zip(photos, pb_top1, strict=True):
        done = _run_isolated(tmp_path / Path(photo).stem, packages, code, exports.every.files[kind], photo)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split("\t")[0] == best, (photo, done.stdout)


# ----------------------------------------------------------------------------------- files and refusals


def test_exporting_again_replaces_the_set_whole_or_not_at_all(trained_run, exports, tmp_path, monkeypatch):
    run, out = str(trained_run.train_dir), tmp_path / "model.pb"
    # The first set: a copy of the module's float16 .tflite export (model.tflite, model.json, model.labels.txt).
    first = exports.half
    for path in (first.files["tflite"], first.sidecar, first.labels):
        shutil.copy(path, tmp_path / Path(path).name)
    before = {str(tmp_path / Path(path).name): Path(path).read_bytes()
              for path in (first.files["tflite"], first.sidecar, first.labels)}  # fmt: skip
    assert sorted(Path(path).name for path in before) == ["model.json", "model.labels.txt", "model.tflite"]
    writes = []
    real_write = Path.write_bytes

    def interrupted(self, data):  # model.json of the second export: the .pb and .tflite are written already
        writes.append(self)
        if len(writes) == 3:
            raise KeyboardInterrupt
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export(ExportConfig(train_dir=run, out=str(out), format=("pb", "tflite")))
    monkeypatch.undo()
    assert {path: Path(path).read_bytes() for path in before} == before  # the first export, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.labels.txt", "model.tflite"]
    # A later export of another format keeps the earlier files of the same checkpoint listed and usable.
    export(ExportConfig(train_dir=run, out=str(out), format=("pb",)))
    formats = json.loads(out.with_suffix(".json").read_text())["formats"]
    assert set(formats) == {"pb", "tflite"} and formats["tflite"]["quantize"] == "float16"
    assert out.with_suffix(".tflite").read_bytes() == before[str(tmp_path / "model.tflite")]
    for kind in ("pb", "tflite"):
        assert modelfile.read_model(out.with_suffix(modelfile.SUFFIXES[kind])).kind == kind


def _refused(capsys, *command: str) -> str:
    code = cli.main(list(command))
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def test_refusals_are_one_line_naming_the_flag_and_the_fix(trained_run, tmp_path, capsys, monkeypatch):
    run, out = str(trained_run.train_dir), str(tmp_path / "model.pb")
    line = _refused(capsys, "export", "--train-dir", run, "--out", out, "--format", "tflite",
                    "--quantize", "int8", "--dataset", str(tmp_path / "nowhere"))  # fmt: skip
    assert "--quantize int8" in line and "--dataset" in line and "nowhere" in line
    line = _refused(capsys, "export", "--train-dir", run, "--out", out, "--quantize", "int8")
    assert "add --format tflite" in line
    monkeypatch.setitem(sys.modules, "tf2onnx", None)  # as if the [onnx] extra were not installed
    line = _refused(capsys, "export", "--train-dir", run, "--out", out, "--format", "onnx")
    assert "pip install 'finetune[onnx]'" in line
    assert not list(tmp_path.iterdir())  # refused before writing anything
    line = _refused(capsys, "predict", "--model", str(tmp_path / "model.h5"), str(tmp_path))
    assert "no such file" in line


def test_an_op_the_converters_lack_is_named_with_the_format_that_runs_it(tmp_path):
    """A graph with Igamma (the incomplete gamma function), which neither TFLite's builtins nor tf2onnx have."""
    from finetune import export as exporting
    from finetune.compat import tf

    with tf.Graph().as_default() as graph:
        images = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 3], name="input")
        scores = tf.reduce_mean(tf.math.igamma(images * images + 1.0, 2.0), axis=[1, 2])
        tf.nn.softmax(scores, name="probabilities")
        tf.identity(scores, name="logits")
    graph_def = graph.as_graph_def()
    refusal = r"--format tflite .*: unsupported ops Igamma; the \.pb \(--format pb\) runs it"
    with pytest.raises(FinetuneError, match=refusal):
        exporting._tflite(graph_def, ExportConfig(train_dir="run", format=("tflite",)), None)
    with pytest.raises(FinetuneError, match=r"--format onnx: tf2onnx .*: unsupported ops Igamma; .*the \.pb runs it"):
        exporting._onnx(graph_def, ["a", "b", "c"], 8)
