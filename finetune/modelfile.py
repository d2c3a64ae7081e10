"""The exported model: the one module that reads and writes a `.pb` and the two sidecars beside it.

``finetune export --out model.pb`` writes three files::

    model.pb            the frozen GraphDef (tensors below), runnable by plain TensorFlow
    model.json          what a client needs to run it: classes, image size, tensors, preprocessing, precision,
                        and where it came from (checkpoint, step, dataset); with a format version
    model.labels.txt    the class names, one a line, in output order

model.json versions: 1 is every file written so far (files from before the version field count as 1).
A model.json or labels file this code cannot use (unreadable, truncated, not the expected shape, classes
that disagree, or written by a newer finetune) is a FinetuneError naming the file and the fix.
"""

from __future__ import annotations

import contextlib
import datetime
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune import __version__
from finetune.config import PRECISIONS
from finetune.errors import FinetuneError
from finetune.files import replacing
from finetune.network import EVAL_CENTRAL_FRACTION

# The graph's tensors. `input` takes images already preprocessed into [-1, 1]; `image_bytes` takes whole
# encoded files and preprocesses them in the graph. slim's usual output name is kept as another name of the
# probabilities.
INPUT = "input"
IMAGE_BYTES = "image_bytes"
PROBABILITIES = "probabilities"
LOGITS = "logits"
SLIM_OUTPUT = "InceptionV3/Predictions/Reshape_1"

FORMAT = "finetune frozen InceptionV3"
FORMAT_VERSION = 1
_VERSION_KEY = "format_version"


@dataclass(frozen=True)
class ModelInfo:
    """An exported model's model.json, checked: what running and evaluating it need, and the whole file."""

    path: Path  # the .pb
    sidecar: Path  # its model.json
    classes: tuple[str, ...]
    image_size: int
    precision: str  # "fp32" or "bf16", frozen into the graph
    dataset: str | None  # the dataset it was trained on
    values: dict[str, Any]


def sidecar_paths(model_path: str | Path) -> tuple[Path, Path]:
    """The labels file and JSON sidecar that sit beside a .pb: model.labels.txt and model.json."""
    model_path = Path(model_path)
    return model_path.with_suffix(".labels.txt"), model_path.with_suffix(".json")


def _reexport(model_path: Path) -> str:
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
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise FinetuneError(f"{path} is unreadable or truncated ({reason}); {_reexport(model_path)}") from None
    if not isinstance(values, dict):
        problem = f"{path} is not a finetune model description (not a JSON object)"
        raise FinetuneError(f"{problem}; {_reexport(model_path)}")
    version = values.get(_VERSION_KEY, 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise FinetuneError(f"{path} has a bad {_VERSION_KEY} ({version!r}); {_reexport(model_path)}")
    if version > FORMAT_VERSION:
        raise FinetuneError(
            f"{path} is exported-model format version {version}, newer than this finetune ({__version__}) "
            f"reads (up to {FORMAT_VERSION}); upgrade finetune to use this model"
        )
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
    return ModelInfo(
        path=model_path,
        sidecar=path,
        classes=tuple(classes),
        image_size=values["image_size"],
        precision=precision,
        dataset=dataset,
        values=values,
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


def load_graph_def(model_path: str | Path, flag: str = "--model"):
    """Reads a frozen GraphDef, with a FinetuneError that names the file when it is not one."""
    from finetune.compat import tf

    try:
        data = Path(model_path).read_bytes()
    except OSError as exc:
        raise FinetuneError(f"{flag} {model_path}: cannot read ({exc.strerror}); run `finetune export` first")
    graph_def = tf.compat.v1.GraphDef()
    try:
        graph_def.ParseFromString(data)
    except Exception:  # protobuf's DecodeError, whose module path varies between protobuf builds
        raise FinetuneError(f"{flag} {model_path}: not a TensorFlow GraphDef; pass the .pb `finetune export` wrote")
    names = {node.name for node in graph_def.node}
    if not {INPUT, PROBABILITIES} <= names:
        raise FinetuneError(
            f"{flag} {model_path}: a GraphDef without '{INPUT}' and '{PROBABILITIES}' nodes; "
            "pass a .pb written by `finetune export`"
        )
    return graph_def


def write_model(
    out: Path,
    graph: bytes,
    *,
    classes: list[str],
    image_size: int,
    precision: str,
    compute_dtype: str,
    checkpoint: str,
    global_step: int | None,
    dataset: str,
    dataset_fingerprint: str,
    pretrained_from: str | None,
    temperature: float | None = None,
) -> tuple[Path, Path]:
    """Writes the .pb and its two sidecars; returns (labels path, model.json path).

    All three are written under temporary names first and renamed together, the .pb last, so an interrupted
    export leaves the previous set whole.
    """
    labels_path, sidecar_path = sidecar_paths(out)
    sidecar = {
        "format": FORMAT,
        _VERSION_KEY: FORMAT_VERSION,
        "inputs": {
            IMAGE_BYTES: {"dtype": "string", "shape": [None], "what": "encoded JPEG, PNG, GIF or BMP files"},
            INPUT: {"dtype": "float32", "shape": [None, image_size, image_size, 3],
                    "what": "images preprocessed into [-1, 1]"},
        },  # fmt: skip
        "outputs": {
            PROBABILITIES: {"dtype": "float32", "shape": [None, len(classes)], "also": SLIM_OUTPUT},
            LOGITS: {"dtype": "float32", "shape": [None, len(classes)]},
        },
        "image_size": image_size,
        "precision": precision,
        "compute_dtype": compute_dtype,
        "preprocessing": {
            "central_crop_fraction": EVAL_CENTRAL_FRACTION,
            "resize": "bilinear",
            "scale": "x / 255 * 2 - 1, into [-1, 1]",
        },
        "classes": list(classes),
        "checkpoint": checkpoint,
        "global_step": global_step,
        "dataset": dataset,
        "dataset_fingerprint": dataset_fingerprint,
        "pretrained_from": pretrained_from,
        # probabilities = softmax(logits / temperature), fitted on the validation split; None: uncalibrated.
        "temperature": temperature,
        "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "finetune_version": __version__,
    }
    files = [
        (out, graph),  # entered first, so renamed last
        (sidecar_path, (json.dumps(sidecar, indent=2) + "\n").encode()),
        (labels_path, _labels_text(classes).encode()),
    ]
    with contextlib.ExitStack() as renames:
        for path, content in files:
            temporary = renames.enter_context(replacing(path))
            temporary.write_bytes(content)
    return labels_path, sidecar_path
