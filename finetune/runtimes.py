"""Running an exported model, whatever its format: one small interface over TensorFlow, LiteRT and onnxruntime.

``open_runner(path)`` picks the runtime from the file (see finetune/modelfile.py for the formats):

- ``.pb`` or a SavedModel folder: a TensorFlow session on the frozen graph;
- ``.tflite``: the standalone LiteRT interpreter (``ai-edge-litert``) when installed, else TensorFlow's own
  ``tf.lite.Interpreter``;
- ``.onnx``: onnxruntime on the CPU (the ``finetune[onnx]`` extra).

Every runner maps images preprocessed into [-1, 1] (float32 [N, S, S, 3], as evaluation makes them) to
probabilities, and encoded files to probabilities (``run_encoded``): the TensorFlow graphs decode in the graph,
the others get the very same TensorFlow decode, crop and resize first, so every format sees the same pixels.
LiteRT and onnxruntime use one thread per core the process may run on.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from finetune.errors import FinetuneError
from finetune.modelfile import IMAGE_BYTES, INPUT, PROBABILITIES, ModelInfo, load_graph_def, model_kind, read_model

LITERT_INSTALL = "pip install 'finetune[tflite]'"
ONNX_INSTALL = "pip install 'finetune[onnx]'"


def cores() -> int:
    """The cores this process may run on (its CPU affinity), the thread count of LiteRT and onnxruntime."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class Runner:
    """An exported model ready to run; subclasses hold one runtime each."""

    runtime = ""  # which runtime runs it, e.g. "onnxruntime 1.32.0"

    def __init__(self, info: ModelInfo):
        self.info = info
        self.classes = list(info.classes)
        self.image_size = info.image_size
        self._decoder: _Decoder | None = None

    def run(self, images: np.ndarray) -> np.ndarray:
        """Probabilities [N, C] of preprocessed images, float32 [N, S, S, 3] in [-1, 1]."""
        raise NotImplementedError

    def run_encoded(self, encoded: list[bytes]) -> np.ndarray:
        """Probabilities [N, C] of whole image files, decoded and preprocessed as evaluation does.

        Raises tf.errors.OpError when a file cannot be decoded.
        """
        if self._decoder is None:
            self._decoder = _Decoder(self.image_size)
        return self.run(self._decoder(encoded))

    def close(self) -> None:
        if self._decoder is not None:
            self._decoder.close()


class _Decoder:
    """Files to preprocessed images with the ops the exported graph decodes with (finetune.preprocessing)."""

    def __init__(self, image_size: int):
        from finetune.compat import tf
        from finetune.network import EVAL_CENTRAL_FRACTION
        from finetune.preprocessing import decode_image, preprocess_for_eval
        from finetune.runtime import session_config

        self.graph = tf.Graph()
        with self.graph.as_default():
            self.encoded = tf.compat.v1.placeholder(tf.string, [None])
            self.images = tf.map_fn(
                lambda data: preprocess_for_eval(
                    decode_image(data), image_size, central_fraction=EVAL_CENTRAL_FRACTION
                ),
                self.encoded,
                fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32),
            )
        self.session = tf.compat.v1.Session(graph=self.graph, config=session_config())

    def __call__(self, encoded: list[bytes]) -> np.ndarray:
        return self.session.run(self.images, {self.encoded: np.array(encoded, dtype=object)})

    def close(self) -> None:
        self.session.close()


class TensorFlowRunner(Runner):
    """A frozen .pb or a SavedModel folder in a TensorFlow session."""

    def __init__(self, info: ModelInfo, flag: str):
        super().__init__(info)
        from finetune.compat import tf
        from finetune.runtime import session_config

        graph_def = load_graph_def(info.path, flag)
        self.graph = tf.Graph()
        with self.graph.as_default():
            tf.compat.v1.import_graph_def(graph_def, name="")
        self.session = tf.compat.v1.Session(graph=self.graph, config=session_config())
        self.image_bytes = self.graph.get_tensor_by_name(f"{IMAGE_BYTES}:0")
        self.input = self.graph.get_tensor_by_name(f"{INPUT}:0")
        self.probabilities = self.graph.get_tensor_by_name(f"{PROBABILITIES}:0")
        self.runtime = f"tensorflow {tf.__version__}"

    def run(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(self.probabilities, {self.input: images})

    def run_encoded(self, encoded: list[bytes]) -> np.ndarray:
        return self.session.run(self.probabilities, {self.image_bytes: np.array(encoded, dtype=object)})

    def close(self) -> None:
        self.session.close()
        super().close()


class LiteRTRunner(Runner):
    """A .tflite in ai-edge-litert's interpreter, or TensorFlow's when ai-edge-litert is not installed."""

    def __init__(self, info: ModelInfo, flag: str):
        super().__init__(info)
        try:
            from ai_edge_litert.interpreter import Interpreter

            from importlib.metadata import version

            self.runtime = f"ai-edge-litert {version('ai-edge-litert')}"
        except ImportError:
            from finetune.compat import tf

            Interpreter = tf.lite.Interpreter
            self.runtime = f"tensorflow.lite {tf.__version__} (install ai-edge-litert: {LITERT_INSTALL})"
        try:
            with warnings.catch_warnings():  # TensorFlow's interpreter warns that it will move to LiteRT
                warnings.simplefilter("ignore")
                self.interpreter = Interpreter(model_path=str(info.path), num_threads=cores())
        except (ValueError, RuntimeError) as exc:
            raise FinetuneError(f"{flag} {info.path}: not a TFLite model ({exc}); export it again with --format tflite")
        (self.input,) = self.interpreter.get_input_details()
        outputs = self.interpreter.get_output_details()
        named = [o for o in outputs if o["name"] == PROBABILITIES]
        self.output = (named or outputs)[0]
        self.batch = None

    def run(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.float32)
        if self.batch != len(images):  # the batch dimension is free: resize once per new batch size
            self.interpreter.resize_tensor_input(self.input["index"], list(images.shape))
            self.interpreter.allocate_tensors()
            self.batch = len(images)
        self.interpreter.set_tensor(self.input["index"], images)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output["index"]).copy()


class OnnxRunner(Runner):
    """An .onnx in onnxruntime, on the CPU."""

    def __init__(self, info: ModelInfo, flag: str):
        super().__init__(info)
        try:
            import onnxruntime
        except ImportError:
            raise FinetuneError(
                f"{flag} {info.path}: running an .onnx needs onnxruntime, which is not installed: {ONNX_INSTALL}"
            )
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = cores()
        options.log_severity_level = 3  # errors only
        try:
            self.session = onnxruntime.InferenceSession(str(info.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's own exception types live in a private module
            raise FinetuneError(f"{flag} {info.path}: not an ONNX model onnxruntime can load ({exc}); export it again")
        self.runtime = f"onnxruntime {onnxruntime.__version__}"

    def run(self, images: np.ndarray) -> np.ndarray:
        return self.session.run([PROBABILITIES], {INPUT: np.asarray(images, dtype=np.float32)})[0]


def open_runner(model_path: str | Path, flag: str = "--model") -> Runner:
    """The runner for an exported model, by its format; its model.json (or the SavedModel's) is checked first.

    Raises:
        FinetuneError: no such file, not a format finetune runs, sidecars missing or bad, or the runtime the
            format needs is not installed (with the pip command).
    """
    model_path = Path(model_path)
    if not model_path.exists():
        raise FinetuneError(f"{flag} {model_path}: no such file; run `finetune export` first")
    kind = model_kind(model_path, flag)
    info = read_model(model_path, flag)
    if kind == "tflite":
        return LiteRTRunner(info, flag)
    if kind == "onnx":
        return OnnxRunner(info, flag)
    return TensorFlowRunner(info, flag)
