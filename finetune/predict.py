"""Label image files with an exported model and its sidecars alone (no checkpoint, no dataset, no tf-slim).

A .pb or SavedModel takes the files as raw bytes through ``image_bytes`` and decodes, crops and resizes them
as evaluation does; a .tflite or .onnx gets the same decoding from TensorFlow first (finetune/runtimes.py). A
file that cannot be read or decoded gets its own error row and the others go on.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from finetune.config import PredictConfig
from finetune.errors import FinetuneError
from finetune.network import EXIF_ORIENTATION, JPEG_QUALITY
from finetune.paths import NotReadable, read_regular_file, walk_files

# What a folder scan picks up; a file named on the command line is tried whatever its name.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]] | None  # (class, probability), best first; None when the file failed
    error: str | None = None


def find_images(paths: tuple[str, ...]) -> Iterator[tuple[Path, str | None]]:
    """Files named directly, and image files anywhere below named folders (sorted, hidden ones skipped)."""
    for name in paths:
        path = Path(name)
        if path.is_dir():  # walked without recursion: any depth; links to folders followed once
            for found, problem in walk_files(path):
                if problem is not None and problem.startswith("unreadable folder"):
                    yield Path(found), problem
                elif found.lower().endswith(IMAGE_SUFFIXES):
                    yield Path(found), None  # an odd entry is refused, by name, when it is read
        elif path.exists() or path.is_symlink():
            yield path, None
        else:
            yield path, "no such file or folder"


def _upright_bytes(data: bytes) -> bytes:
    """The file's bytes, or for a JPEG with an EXIF rotation, the picture turned upright and re-encoded.

    build-dataset stores rotated photos upright; applying the same turn here keeps predictions consistent.
    """
    if not data.startswith(b"\xff\xd8"):
        return data
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.getexif().get(EXIF_ORIENTATION, 1) in (1, None):
                return data
            upright = ImageOps.exif_transpose(image).convert("RGB")
    except Exception:  # an unreadable JPEG: let TensorFlow's decoder report it
        return data
    buffer = io.BytesIO()
    upright.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _reason(message: str) -> str:
    """The informative line of a TensorFlow op error ("Unknown image file format. ..."), without node tags."""
    for line in (part.strip() for part in message.splitlines()):
        if line and not line.startswith("[[") and line != "Graph execution error:":
            return line
    return "not an image TensorFlow can decode"


class Predictor:
    """An exported model (.pb, SavedModel, .tflite or .onnx) with its class names; ``run`` maps encoded files
    to probabilities."""

    def __init__(self, model_path: Path):
        from finetune.compat import tf
        from finetune.runtimes import open_runner

        self.runner = open_runner(model_path)
        self.model = self.runner.info
        self.classes = list(self.model.classes)
        self._errors = tf.errors.OpError

    def run(self, encoded: list[bytes]) -> np.ndarray:
        return self.runner.run_encoded(encoded)

    def run_each(self, encoded: list[bytes]) -> list[np.ndarray | str]:
        """Runs the batch; when one file breaks it, runs them one by one to tell which."""
        try:
            return list(self.run(encoded))
        except self._errors:
            results: list[np.ndarray | str] = []
            for data in encoded:
                try:
                    results.append(self.run([data])[0])
                except self._errors as exc:
                    results.append(f"cannot decode: {_reason(exc.message)}")
            return results

    def close(self) -> None:
        self.runner.close()


def predict(config: PredictConfig) -> Iterator[Prediction]:
    """Yields one Prediction per file, in the order found, batch by batch."""
    model_path = Path(config.model)
    if not model_path.exists():
        raise FinetuneError(f"--model {model_path}: no such file; run `finetune export` first")
    from finetune.precision import check_frozen_precision

    predictor = Predictor(model_path)
    try:
        check_frozen_precision(predictor.model.precision, config.precision, str(model_path))
    except BaseException:
        predictor.close()
        raise
    top_k = min(config.top_k, len(predictor.classes))
    try:
        pending: list[tuple[Path, bytes]] = []

        def flush() -> Iterator[Prediction]:
            if not pending:
                return
            outcomes = predictor.run_each([data for _, data in pending])
            for (path, _), outcome in zip(pending, outcomes):
                if isinstance(outcome, str):
                    yield Prediction(str(path), None, outcome)
                else:
                    best = np.argsort(-outcome)[:top_k]
                    yield Prediction(str(path), [(predictor.classes[i], float(outcome[i])) for i in best])
            pending.clear()

        for path, problem in find_images(config.paths):
            if problem is None:
                try:  # regular files only, never blocking: a FIFO here once made predict wait forever
                    pending.append((path, _upright_bytes(read_regular_file(path))))
                except NotReadable as exc:
                    problem = f"cannot read: {exc}"
            if problem is not None:
                yield from flush()
                yield Prediction(str(path), None, problem)
            elif len(pending) >= config.batch_size:
                yield from flush()
        yield from flush()
    finally:
        predictor.close()
