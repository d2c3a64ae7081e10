"""The exported model: the one module that reads and writes the model files and the two sidecars beside them.

``finetune export --out model.pb`` writes three files::

    model.pb            the frozen GraphDef (tensors below), runnable by plain TensorFlow
    model.json          what a client needs to run it: classes, image size, tensors, preprocessing, precision,
                        and where it came from (checkpoint, step, dataset); with a format version
    model.labels.txt    the class names, one a line, in output order

``--format`` adds files of the same stem, described by the same model.json under ``formats``::

    model.tflite        LiteRT (TFLite) flatbuffer of the ``input`` path, float or quantized (``--quantize``)
    model.onnx          ONNX of the ``input`` path (tf2onnx; the opset is recorded), class names in its metadata
    model.saved_model/  a SavedModel of the frozen graph; its own model.json and labels in assets.extra/

``formats`` maps each format to its file and how it was made; a model.json without it (written before
``--format``) describes a .pb alone. The TFLite and ONNX files take ``input`` only: decoding, the central crop
and the resize happen outside them, as model.json's ``preprocessing`` says.

model.json versions: 1 is every file written so far (files from before the version field count as 1).
A model.json or labels file this code cannot use (unreadable, truncated, not the expected shape, classes
that disagree, or written by a newer finetune) is a FinetuneError naming the file and the fix.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from finetune import __version__
from finetune.config import PRECISIONS
from finetune.errors import FinetuneError
from finetune.files import read_versioned_json, replacing
from finetune.network import EVAL_CENTRAL_FRACTION

# The graph's tensors. `input` takes images already preprocessed into [-1, 1]; `image_bytes` takes whole
# encoded files and preprocesses them in the graph. slim's usual output name is kept as another name of the
# probabilities.
INPUT = "input"
IMAGE_BYTES = "image_bytes"
PROBABILITIES = "probabilities"
LOGITS = "logits"
SLIM_OUTPUT = "InceptionV3/Predictions/Reshape_1"

# The files one export can write, by --format name, and the suffix each takes after the shared stem.
SUFFIXES = {"pb": ".pb", "saved_model": ".saved_model", "tflite": ".tflite", "onnx": ".onnx"}
# Where a SavedModel folder keeps its sidecars (TensorFlow Serving's place for files beside the graph).
SAVED_MODEL_EXTRAS = "assets.extra"

FORMAT = "finetune frozen InceptionV3"
FORMAT_VERSION = 1
_VERSION_KEY = "format_version"


@dataclass(frozen=True)
class ModelInfo:
    """An exported model's model.json, checked: what running and evaluating it need, and the whole file."""

    path: Path  # the model file (or SavedModel folder)
    sidecar: Path  # its model.json
    classes: tuple[str, ...]
    image_size: int
    precision: str  # "fp32" or "bf16", frozen into the graph
    dataset: str | None  # the dataset it was trained on
    values: dict[str, Any]
    kind: str = "pb"  # which format the file is: a key of SUFFIXES
    details: dict[str, Any] | None = None  # model.json's entry for that format (quantization, opset, ...)


@dataclass(frozen=True)
class ModelDescription:
    """What model.json says about the network one export freezes, whatever its formats."""

    classes: list[str]
    image_size: int
    precision: str  # "fp32" or "bf16", as --precision names it
    compute_dtype: str  # the type frozen into the graph: "float32" or "bfloat16"
    checkpoint: str  # the checkpoint it was frozen from
    global_step: int | None
    dataset: str
    dataset_fingerprint: str
    pretrained_from: str | None  # the run's starting checkpoint
    temperature: float | None = None  # folded into the probabilities (see export --calibrate); None: uncalibrated
    tta: str = "none"  # "flip": probabilities (and logits) are the means over each image and its mirror image


def model_kind(model_path: str | Path, flag: str = "--model") -> str:
    """The format of an exported model file, by its name: .pb, .tflite, .onnx, or a SavedModel folder."""
    model_path = Path(model_path)
    if model_path.is_dir():
        if not (model_path / "saved_model.pb").is_file():
            raise FinetuneError(
                f"{flag} {model_path}: a folder without saved_model.pb; pass a .pb, .tflite or .onnx file or a "
                "SavedModel folder written by `finetune export`"
            )
        return "saved_model"
    for kind, suffix in SUFFIXES.items():
        if kind != "saved_model" and model_path.suffix == suffix:
            return kind
    raise FinetuneError(
        f"{flag} {model_path}: not a model file finetune runs; pass a .pb, .tflite or .onnx file or a "
        "SavedModel folder written by `finetune export`"
    )


def sidecar_paths(model_path: str | Path) -> tuple[Path, Path]:
    """The labels file and JSON sidecar of a model: beside a file (model.labels.txt and model.json for
    model.pb, model.tflite or model.onnx), inside a SavedModel folder's assets.extra/."""
    model_path = Path(model_path)
    if model_path.is_dir() or model_path.suffix == SUFFIXES["saved_model"]:
        return model_path / SAVED_MODEL_EXTRAS / "model.labels.txt", model_path / SAVED_MODEL_EXTRAS / "model.json"
    return model_path.with_suffix(".labels.txt"), model_path.with_suffix(".json")


def _formats(values: dict[str, Any], model_path: Path) -> dict[str, Any]:
    """model.json's ``formats``; one written before --format describes its .pb alone."""
    return values.get("formats") or {"pb": {"file": model_path.with_suffix(".pb").name}}


def _reexport(model_path: Path) -> str:
    if model_path.suffix in (".tflite", ".onnx", ".saved_model"):
        stem, kind = model_path.with_suffix(".pb"), model_path.suffix.lstrip(".")
        return f"export the model again with `finetune export --train-dir RUN --out {stem} --format {kind}`"
    return f"export the model again with `finetune export --train-dir RUN --out {model_path}`"


def read_model(model_path: str | Path, flag: str = "--model") -> ModelInfo:
    """Reads and checks the sidecars of an exported .pb (not the graph: see :func:`load_graph_def`).

    Raises:
        FinetuneError: model.json missing, unreadable, truncated, of the wrong shape or of a newer format
            version; or model.labels.txt unreadable or disagreeing with it.
    """
    model_path = Path(model_path)
    labels_path, path = sidecar_paths(model_path)
    if not path.is_file():
        raise FinetuneError(f"{flag} {model_path}: no {path.name} beside it; {_reexport(model_path)}")
    values = read_versioned_json(path, kind="exported-model", what="model description",
                                 newest=FORMAT_VERSION, fix=_reexport(model_path), use="this model")  # fmt: skip
    try:
        classes = values["classes"]
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
            raise ValueError("classes")
        if not isinstance(values["image_size"], int):
            raise ValueError("image_size")
        precision = values.get("precision", "fp32")  # .pb files from before bf16 are fp32
        if precision not in PRECISIONS:
            raise ValueError("precision")
        dataset = values.get("dataset")
        if dataset is not None and not isinstance(dataset, str):
            raise ValueError("dataset")
    except (KeyError, ValueError) as exc:
        problem = f"{path} is incomplete or corrupt (bad or missing '{exc.args[0]}')"
        raise FinetuneError(f"{problem}; {_reexport(model_path)}") from None
    _check_labels(labels_path, classes, model_path)
    kind = model_kind(model_path, flag) if model_path.exists() else "pb"
    formats = _formats(values, model_path)
    if not isinstance(formats, dict) or kind not in formats:
        raise FinetuneError(
            f"{path} describes an export without {model_path.name} (it lists "
            f"{', '.join(formats) if isinstance(formats, dict) else 'nothing'}; the file is left from another "
            f"export); {_reexport(model_path)}"
        )
    return ModelInfo(
        path=model_path,
        sidecar=path,
        classes=tuple(classes),
        image_size=values["image_size"],
        precision=precision,
        dataset=dataset,
        values=values,
        kind=kind,
        details=formats[kind],
    )


def _check_labels(labels_path: Path, classes: list[str], model_path: Path) -> None:
    """A labels file beside the .pb must list model.json's classes; a .pb copied without one is fine."""
    try:
        text = labels_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise FinetuneError(f"{labels_path} is unreadable ({reason}); {_reexport(model_path)}") from None
    if text != _labels_text(classes):
        raise FinetuneError(
            f"{labels_path} does not list the {len(classes)} classes of its model.json, one a line "
            f"(truncated or edited?); {_reexport(model_path)}"
        )


def _labels_text(classes: list[str]) -> str:
    return "".join(f"{name}\n" for name in classes)


_EXPORT_AGAIN = "export it again with `finetune export`, or pass a .pb `finetune export` wrote"


def load_graph_def(model_path: str | Path, flag: str = "--model"):
    """Reads a frozen GraphDef, with a FinetuneError that names the file when it is not one."""
    from finetune.compat import tf

    saved = Path(model_path).is_dir()
    try:
        data = (Path(model_path) / "saved_model.pb" if saved else Path(model_path)).read_bytes()
    except OSError as exc:
        raise FinetuneError(f"{flag} {model_path}: cannot read ({exc.strerror}); run `finetune export` first")
    graph_def = tf.compat.v1.GraphDef()
    try:
        if saved:  # a SavedModel of the frozen graph: its one MetaGraph holds the same GraphDef
            from tensorflow.core.protobuf import saved_model_pb2

            saved_model = saved_model_pb2.SavedModel()
            saved_model.ParseFromString(data)
            graph_def = saved_model.meta_graphs[0].graph_def
        else:
            graph_def.ParseFromString(data)
    except Exception:  # protobuf's DecodeError, whose module path varies between protobuf builds
        raise FinetuneError(f"{flag} {model_path}: not a TensorFlow GraphDef (truncated or damaged?); {_EXPORT_AGAIN}")
    names = {node.name for node in graph_def.node}
    if not {INPUT, PROBABILITIES} <= names:
        raise FinetuneError(
            f"{flag} {model_path}: a GraphDef without '{INPUT}' and '{PROBABILITIES}' nodes (truncated, or "
            f"not from finetune); {_EXPORT_AGAIN}"
        )
    return graph_def


def write_model(
    out: Path,
    graph: bytes | None,
    description: ModelDescription | None = None,
    *,
    others: dict[str, tuple[bytes, dict[str, Any]]] | None = None,
    saved_model: Callable[[Path], None] | None = None,
    **fields: Any,
) -> tuple[Path, Path]:
    """Writes the model files of one export and their two sidecars; returns (labels path, model.json path).

    Args:
        out: the .pb's path; every other file takes its stem (model.tflite, model.onnx, model.saved_model/).
        graph: the frozen GraphDef's bytes, or None when this export writes no .pb.
        others: ``{"tflite" or "onnx": (file bytes, what model.json records about it)}``.
        saved_model: writes a SavedModel into the folder it is given (``out``'s stem + ``.saved_model``).
        description: the network the files hold; or its fields (``classes=...``, ``image_size=...``) as keywords.

    Every file is written under a temporary name first and all are renamed together, the model files last,
    so an interrupted export leaves the previous set whole; a SavedModel folder is swapped in whole after
    them. Formats an earlier export of the same checkpoint wrote beside ``out`` stay listed in model.json
    while their files are there.
    """
    if description is None:
        description = ModelDescription(**fields)
    elif fields:
        raise TypeError(f"write_model takes a description or its fields, not both: {', '.join(fields)}")
    others = dict(others or {})
    labels_path, sidecar_path = sidecar_paths(out)
    formats: dict[str, Any] = {}
    if graph is not None:
        formats["pb"] = {"file": out.name, "inputs": [IMAGE_BYTES, INPUT]}
    for kind, (_, details) in others.items():
        formats[kind] = {"file": out.with_suffix(SUFFIXES[kind]).name, "inputs": [INPUT], **details}
    if saved_model is not None:
        formats["saved_model"] = {"file": out.with_suffix(SUFFIXES["saved_model"]).name,
                                  "inputs": [IMAGE_BYTES, INPUT]}  # fmt: skip
    sidecar = _description(description)
    sidecar["formats"] = {**_earlier_formats(out, sidecar), **formats}
    files = []
    if graph is not None:
        files.append((out, graph))
    files += [(out.with_suffix(SUFFIXES[kind]), data) for kind, (data, _) in others.items()]
    files += [
        (sidecar_path, _json_bytes(sidecar)),  # the model files are entered first, so renamed last
        (labels_path, _labels_text(description.classes).encode()),
    ]
    with contextlib.ExitStack() as renames:
        for path, content in files:
            temporary = renames.enter_context(replacing(path))
            temporary.write_bytes(content)
    if saved_model is not None:
        write_saved_model(out.with_suffix(SUFFIXES["saved_model"]), saved_model, sidecar, replace=True)
    return labels_path, sidecar_path


def write_saved_model(
    directory: Path, build: Callable[[Path], None], sidecar: dict[str, Any], *, replace: bool
) -> None:
    """Writes a SavedModel folder with its model.json and labels in assets.extra/, then moves it into place.

    ``build`` fills a temporary folder beside ``directory``; the finished folder is renamed onto the final
    name, so that name never holds a half-written SavedModel. With ``replace`` an existing folder there is
    moved aside first and removed after (for a moment the name is absent, never partial); without it an
    existing folder is an error.
    """
    directory = Path(directory)
    if directory.exists() and not replace:
        raise FinetuneError(f"--saved-model {directory} already exists; remove it or choose another folder")
    temporary = directory.with_name(f".{directory.name}.{os.getpid()}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        build(temporary)
        labels_path, sidecar_path = sidecar_paths(temporary)
        sidecar_path.parent.mkdir(parents=True, exist_ok=True)
        sidecar = {**sidecar, "formats": {"saved_model": {"file": directory.name, "inputs": [IMAGE_BYTES, INPUT]}}}
        sidecar_path.write_bytes(_json_bytes(sidecar))
        labels_path.write_bytes(_labels_text(sidecar["classes"]).encode())
        old = directory.with_name(f".{directory.name}.{os.getpid()}.old")
        if directory.exists():
            os.replace(directory, old)
        os.replace(temporary, directory)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _json_bytes(values: dict[str, Any]) -> bytes:
    return (json.dumps(values, indent=2) + "\n").encode()


def _earlier_formats(out: Path, sidecar: dict[str, Any]) -> dict[str, Any]:
    """Formats the model.json already beside ``out`` lists for the same checkpoint and precision whose files
    are still there: exporting a .tflite after the .pb keeps the .pb usable. Anything else is dropped."""
    try:
        earlier = json.loads(sidecar_paths(out)[1].read_text(encoding="utf-8"))
        same = all(earlier.get(key) == sidecar[key]
                   for key in ("checkpoint", "global_step", "precision", "classes", "image_size"))  # fmt: skip
        formats = _formats(earlier, out) if same else {}
        return {kind: entry for kind, entry in formats.items()
                if kind in SUFFIXES and (out.parent / entry["file"]).exists()}  # fmt: skip
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def _description(model: ModelDescription) -> dict[str, Any]:
    """model.json's contents, but for ``formats``."""
    return {
        "format": FORMAT,
        _VERSION_KEY: FORMAT_VERSION,
        "inputs": {
            IMAGE_BYTES: {"dtype": "string", "shape": [None], "what": "encoded JPEG, PNG, GIF or BMP files"},
            INPUT: {"dtype": "float32", "shape": [None, model.image_size, model.image_size, 3],
                    "what": "images preprocessed into [-1, 1]"},
        },  # fmt: skip
        "outputs": {
            PROBABILITIES: {"dtype": "float32", "shape": [None, len(model.classes)], "also": SLIM_OUTPUT},
            LOGITS: {"dtype": "float32", "shape": [None, len(model.classes)]},
        },
        "image_size": model.image_size,
        "precision": model.precision,
        "compute_dtype": model.compute_dtype,
        "preprocessing": {
            "central_crop_fraction": EVAL_CENTRAL_FRACTION,
            "resize": "bilinear",
            "scale": "x / 255 * 2 - 1, into [-1, 1]",
        },
        "classes": list(model.classes),
        "checkpoint": model.checkpoint,
        "global_step": model.global_step,
        "dataset": model.dataset,
        "dataset_fingerprint": model.dataset_fingerprint,
        "pretrained_from": model.pretrained_from,
        # probabilities = softmax(logits / temperature), fitted on the validation split; None: uncalibrated.
        "temperature": model.temperature,
        # "flip": probabilities (and logits) are the means over each image and its mirror image (2x compute).
        "test_time_augmentation": model.tta,
        "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "finetune_version": __version__,
    }
