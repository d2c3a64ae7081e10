"""Freeze a trained run into one `.pb` that plain TensorFlow can run, with its labels and a JSON sidecar.

The exported graph is rebuilt for inference (batch norm on moving statistics, no dropout, no aux head, no
training ops) with the chosen checkpoint's values (the best, else the newest; their averages with --ema) as
constants. It has two entry points into one network:

- ``input``: float32 [N, S, S, 3], images already preprocessed into [-1, 1] (slim's convention);
- ``image_bytes``: string [N], whole JPEG, PNG, GIF or BMP files, decoded, centre-cropped and resized in the
  graph, so any TensorFlow client can send raw files.

Outputs: ``probabilities`` [N, C] and ``logits`` [N, C]; slim's usual ``InceptionV3/Predictions/Reshape_1``
names the probabilities too. By default (``--calibrate``) ``probabilities`` is softmax(logits / T) with the
temperature fitted on the validation split; slim's node then keeps the network's own, uncalibrated softmax.

``--format`` adds other files of the same network, each converted from the frozen graph's ``input`` path (the
decoding branch is cut off: those runtimes get preprocessed images, as model.json says):

- ``tflite``: TensorFlow's own converter; ``--quantize float16`` or ``dynamic`` shrinks the weights, ``int8``
  makes every op 8-bit, calibrated on a seeded sample of the training split under eval preprocessing.
  Inputs and outputs stay float32, so one client runs every variant.
- ``onnx``: tf2onnx (the ``finetune[onnx]`` extra), at :data:`ONNX_OPSET`; the class names ride in its metadata.
- ``saved_model``: the frozen graph as a SavedModel folder, with both entry points as signatures.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from finetune import modelfile
from finetune.config import ExportConfig
from finetune.errors import FinetuneError, translates_tf_errors

# The tensor names belong to the exported model's format, which finetune/modelfile.py reads and writes.
from finetune.modelfile import IMAGE_BYTES, INPUT, LOGITS, PROBABILITIES, SLIM_OUTPUT
from finetune.network import EVAL_CENTRAL_FRACTION

log = logging.getLogger("finetune")


@dataclass
class ExportResult:
    model: str
    labels: str
    sidecar: str
    saved_model: str | None
    checkpoint: str
    global_step: int | None
    classes: list[str]
    image_size: int
    size_bytes: int
    precision: str = "fp32"
    files: dict[str, str] = field(default_factory=dict)  # format -> the file (or folder) written
    sizes: dict[str, int] = field(default_factory=dict)  # format -> bytes
    quantize: str = "none"
    checkpoint_choice: str | None = None  # "best (step 40, validation accuracy 0.9300)", "newest (step 60)", "given"
    temperature: float | None = None  # folded into `probabilities` (--calibrate); None: uncalibrated
    tta: str = "none"  # "flip": the graph averages each image and its horizontal flip (--tta)


# ONNX opset the .onnx is written at: 17 is read by onnxruntime 1.14 and later and covers every op of this graph.
ONNX_OPSET = 17
ONNX_INSTALL = "pip install 'finetune[onnx]'"


def build_serving_graph(checkpoint, num_classes: int, image_size: int, compute_dtype: str = "float32",
                        temperature: float | None = None, tta: str = "none"):  # fmt: skip
    """Builds the inference network with both entry points in the current graph, its weights the values of
    ``checkpoint`` (a model.Checkpoint) as constants (model.build's ``values_from``); returns the outputs.

    ``input`` and the outputs are float32 whatever ``compute_dtype``; a 16-bit graph casts inside. With a
    ``temperature``, ``probabilities`` is softmax(logits / temperature) (calibrated; the same argmax) while
    ``logits`` and slim's own output node stay the network's. With ``tta="flip"`` the network runs each
    image and its horizontal flip as one batch of 2N; ``probabilities`` and ``logits`` are the means of the
    two passes (slim's node then holds the 2N rows of the uncalibrated passes, originals first).
    """
    from finetune import model
    from finetune.compat import tf
    from finetune.preprocessing import decode_image, preprocess_for_eval

    image_bytes = tf.compat.v1.placeholder(tf.string, [None], name=IMAGE_BYTES)
    decoded = tf.map_fn(
        lambda encoded: preprocess_for_eval(decode_image(encoded), image_size, central_fraction=EVAL_CENTRAL_FRACTION),
        image_bytes,
        fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32),
        name="preprocess",
    )
    # Feeding `input` cuts the decoding branch off; feeding `image_bytes` computes `input` from the files.
    images = tf.compat.v1.placeholder_with_default(decoded, [None, image_size, image_size, 3], name=INPUT)
    views = 2 if tta == "flip" else 1
    both = tf.concat([images, tf.reverse(images, axis=[2])], 0, name="tta_flip") if views == 2 else images
    net = model.build(both, num_classes, compute_dtype=compute_dtype, values_from=checkpoint)
    scores = net.probabilities if temperature is None else tf.nn.softmax(net.logits / temperature)

    def per_image(values):  # [views * N, C] -> the mean over the views, [N, C]
        return values if views == 1 else tf.reduce_mean(tf.reshape(values, [views, -1, num_classes]), axis=0)

    probabilities = tf.identity(per_image(scores), name=PROBABILITIES)
    logits = tf.identity(per_image(net.logits), name=LOGITS)
    graph = tf.compat.v1.get_default_graph()
    if SLIM_OUTPUT not in {op.name for op in graph.get_operations()}:
        tf.identity(net.probabilities, name=SLIM_OUTPUT)
    return probabilities, logits


def _saved_model_writer(graph_def):
    """Writes the frozen graph as a SavedModel: `serving_default` taking image bytes, `preprocessed` input."""
    from finetune.compat import tf

    def write(directory: Path) -> None:
        with tf.Graph().as_default() as graph, tf.compat.v1.Session(graph=graph) as session:
            tf.compat.v1.import_graph_def(graph_def, name="")
            tensor = graph.get_tensor_by_name
            outputs = {PROBABILITIES: tensor(f"{PROBABILITIES}:0"), LOGITS: tensor(f"{LOGITS}:0")}
            signature = tf.compat.v1.saved_model.signature_def_utils.predict_signature_def
            builder = tf.compat.v1.saved_model.Builder(str(directory))
            builder.add_meta_graph_and_variables(
                session,
                [tf.compat.v1.saved_model.tag_constants.SERVING],
                signature_def_map={
                    "serving_default": signature({IMAGE_BYTES: tensor(f"{IMAGE_BYTES}:0")}, outputs),
                    "preprocessed": signature({INPUT: tensor(f"{INPUT}:0")}, outputs),
                },
            )
            builder.save()

    return write


def input_path_graph(graph_def, image_size: int):
    """The frozen graph cut at ``input``: a float32 [N, S, S, 3] placeholder in, ``probabilities`` and
    ``logits`` out, without the decoding branch (which the TFLite and ONNX converters cannot take)."""
    from finetune.compat import tf

    with tf.Graph().as_default() as graph:
        images = tf.compat.v1.placeholder(tf.float32, [None, image_size, image_size, 3], name=INPUT)
        probabilities, logits = tf.compat.v1.import_graph_def(
            graph_def, input_map={f"{INPUT}:0": images}, return_elements=[f"{PROBABILITIES}:0", f"{LOGITS}:0"],
            name="frozen",
        )  # fmt: skip
        tf.identity(probabilities, name=PROBABILITIES)
        tf.identity(logits, name=LOGITS)
    return tf.compat.v1.graph_util.extract_sub_graph(graph.as_graph_def(), [PROBABILITIES, LOGITS])


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _unsupported_ops(message: str) -> list[str]:
    """Op names in a converter's complaint ("... ops are not supported: Foo, Bar" or "'tf.Foo' op ...")."""
    import re

    return sorted(set(re.findall(r"'tf\.(\w+)' op", message)))


def calibration_images(config: ExportConfig, run, image_size: int):
    """A seeded random sample of the run's training split under eval preprocessing, as float32 [N, S, S, 3].

    Returns (images, what model.json records about them). Raises FinetuneError naming --dataset when there is
    no dataset to calibrate on.
    """
    import numpy as np

    from finetune.compat import tf
    from finetune.dataset import load_dataset, read_dataset

    root = config.dataset or run.dataset
    flag = "--dataset" if config.dataset else "the run's dataset"
    if not root or not Path(root).is_dir():
        raise FinetuneError(
            f"--quantize int8 calibrates on a sample of the training split, but {flag} {root or '(none)'} is not "
            "there; pass --dataset DIR (the dataset the run was trained on), or use --quantize dynamic, which "
            "needs no data"
        )
    info = load_dataset(root, flag="--dataset")
    if list(info.classes) != list(run.classes):
        raise FinetuneError(
            f"--dataset {info.root} has classes {list(info.classes)}, but the run was trained on "
            f"{list(run.classes)}; pass the dataset it was trained on to calibrate --quantize int8"
        )
    available = info.split_counts.get("train", 0)
    if not available:
        raise FinetuneError(f"--dataset {info.root} has no training split to calibrate --quantize int8 on")
    count = min(config.calibration_images, available)
    with tf.Graph().as_default():
        batches = read_dataset(info, "train", batch_size=count, image_size=image_size, training=False,
                               shuffle=True, seed=config.calibration_seed)  # fmt: skip
        batch = tf.compat.v1.data.make_one_shot_iterator(batches).get_next()
        with tf.compat.v1.Session() as session:
            images = session.run(batch["image"])
    recorded = {"dataset": str(info.root), "split": "train", "images": int(len(images)),
                "seed": config.calibration_seed, "preprocessing": "eval"}  # fmt: skip
    return np.asarray(images, dtype=np.float32), recorded


def _tflite(cut_graph, config: ExportConfig, calibration) -> tuple[bytes, dict]:
    """The ``input`` path as a LiteRT flatbuffer, quantized as --quantize says; returns (bytes, details).

    ``calibration`` is :func:`calibration_images`'s answer for int8, else None.
    """
    from finetune.compat import tf

    # Labels stay in the sidecar: writing TFLite metadata needs tflite-support, which no longer installs.
    details: dict = {"quantize": config.quantize, "converter": f"tensorflow {tf.__version__}",
                     "labels": "model.labels.txt beside it"}  # fmt: skip
    if calibration is not None:
        calibration, details["calibration"] = calibration
    with tf.Graph().as_default() as graph, tf.compat.v1.Session(graph=graph) as session:
        tf.compat.v1.import_graph_def(cut_graph, name="")
        tensor = graph.get_tensor_by_name
        converter = tf.compat.v1.lite.TFLiteConverter.from_session(
            session, [tensor(f"{INPUT}:0")], [tensor(f"{PROBABILITIES}:0"), tensor(f"{LOGITS}:0")]
        )
        if config.quantize != "none":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if config.quantize == "float16":
            converter.target_spec.supported_types = [tf.float16]
        if calibration is not None:
            converter.representative_dataset = lambda: ([image[None]] for image in calibration)
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            # Inputs and outputs stay float32: the converter quantizes at the edges, clients need not.
        try:
            data = converter.convert()
        except Exception as exc:  # ConverterError, whose message lists the ops it could not take
            ops = _unsupported_ops(str(exc))
            what = f"unsupported ops {', '.join(ops)}" if ops else _first_line(exc)
            raise FinetuneError(
                f"--format tflite (--quantize {config.quantize}): TensorFlow's converter cannot convert this "
                f"graph: {what}; the .pb (--format pb) runs it"
                + ("" if config.quantize == "none" else ", and so may --quantize none")
            ) from None
    details["inputs_dtype"] = details["outputs_dtype"] = "float32"
    return data, details


def _check_onnx_installed() -> None:
    try:
        import onnx  # noqa: F401
        import tf2onnx  # noqa: F401
    except ImportError as exc:
        raise FinetuneError(f"--format onnx needs tf2onnx and onnx ({exc.name} is not installed): {ONNX_INSTALL}")


@contextlib.contextmanager
def _optimizer_errors_raised() -> Iterator[None]:
    """tf2onnx's graph optimizers run without its safety copies: by default it deep-copies the whole graph,
    100 MB of weights included, before each of its dozen optimizers so that one that fails can be skipped;
    that was 40% of converting InceptionV3 (a .pb + .onnx export at 75 px: 16.7 s -> 13.4 s here). A failing
    optimizer then fails the export with its message (the FinetuneError below) instead of shipping a less
    optimized model silently.
    TF2ONNX_CATCH_ERRORS is tf2onnx's own switch for this (any value but "true" turns the copies off)."""
    name = "TF2ONNX_CATCH_ERRORS"
    before = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _onnx(cut_graph, classes: list[str], image_size: int) -> tuple[bytes, dict]:
    """The ``input`` path converted by tf2onnx; returns (bytes, details). Unsupported ops are an error."""
    import tf2onnx

    complaints: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            complaints.append(record.getMessage())

    logger = logging.getLogger("tf2onnx")
    handler, level = Collect(logging.ERROR), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.ERROR)  # its INFO lines would bury ours
    try:
        names = [f"{name}:0" for name in (INPUT, PROBABILITIES, LOGITS)]
        with _optimizer_errors_raised():
            model, _ = tf2onnx.convert.from_graph_def(
                cut_graph, input_names=names[:1], output_names=names[1:], opset=ONNX_OPSET,
                tensors_to_rename={name: name[:-2] for name in names},
            )  # fmt: skip
    except Exception as exc:
        raise FinetuneError(
            f"--format onnx: tf2onnx {tf2onnx.__version__} cannot convert this graph: {_first_line(exc)}; "
            "--format tflite or the .pb runs it"
        ) from None
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    unsupported = [c for c in complaints if "Unsupported ops" in c]  # logged, not raised, by tf2onnx
    if unsupported:
        import re

        ops = ", ".join(sorted(set(re.findall(r"'(\w+)'", unsupported[0])))) or unsupported[0]
        raise FinetuneError(
            f"--format onnx: tf2onnx {tf2onnx.__version__} at opset {ONNX_OPSET} cannot convert this graph: "
            f"unsupported ops {ops}; --format tflite or the .pb runs it"
        )
    for key, value in {"classes": json.dumps(classes), "image_size": str(image_size),
                       "preprocessing": "central crop 0.875, bilinear resize, x / 255 * 2 - 1"}.items():  # fmt: skip
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model.SerializeToString(), {"opset": ONNX_OPSET, "converter": f"tf2onnx {tf2onnx.__version__}",
                                       "labels": "also in the ONNX metadata, key 'classes' (JSON)"}  # fmt: skip


@translates_tf_errors  # TensorFlow's errors about damaged files, as FinetuneErrors naming the file
def export(config: ExportConfig) -> ExportResult:
    """Freezes the run's newest checkpoint (or --checkpoint) into a .pb with its labels and sidecar."""
    from finetune import model, precision, rundir

    train_dir = Path(config.train_dir)
    run = rundir.read_run_config(train_dir)
    classes, image_size = list(run.classes), run.image_size
    chosen = rundir.choose_checkpoint(train_dir, config.checkpoint)
    checkpoint = model.open_checkpoint(chosen.path)
    out = Path(config.out) if config.out else train_dir / "model.pb"
    if out.suffix != ".pb":
        raise FinetuneError(
            f"--out {out}: name the file with a .pb suffix, e.g. model.pb (other formats take its stem)"
        )
    if "onnx" in config.format:
        _check_onnx_installed()  # before the minutes of freezing, not after
    calibration = calibration_images(config, run, image_size) if config.quantize == "int8" else None
    out.parent.mkdir(parents=True, exist_ok=True)

    # The type is frozen into the graph, not chosen per machine: bf16 is bfloat16 wherever the .pb runs.
    bf16 = config.precision == "bf16"
    compute_dtype = precision.BFLOAT16 if bf16 else precision.FLOAT32
    own_step = rundir.run_step(train_dir, checkpoint.path)  # None: not a checkpoint of this run
    temperature = _temperature(train_dir, own_step) if config.calibrate else None
    frozen = _freeze(checkpoint, len(classes), image_size, compute_dtype, temperature, config.tta)
    if config.calibrate and temperature is None:  # said once the checkpoint froze: an error would make it moot
        log.warning(_uncalibrated(train_dir, checkpoint.path, own_step))
    cut = input_path_graph(frozen, image_size) if {"tflite", "onnx"} & set(config.format) else None
    formats = list(dict.fromkeys(config.format))
    data = frozen.SerializeToString()
    others: dict[str, tuple[bytes, dict]] = {}
    if "tflite" in formats:
        others["tflite"] = _tflite(cut, config, calibration)
    if "onnx" in formats:
        others["onnx"] = _onnx(cut, classes, image_size)
    step = rundir.checkpoint_step(checkpoint.path)
    description = modelfile.ModelDescription(
        classes=classes, image_size=image_size, precision=config.precision, compute_dtype=compute_dtype,
        checkpoint=str(Path(checkpoint.path).resolve()), global_step=step, dataset=run.dataset,
        dataset_fingerprint=run.dataset_fingerprint, pretrained_from=run.checkpoint, temperature=temperature,
        tta=config.tta,
    )  # fmt: skip
    labels_path, sidecar_path = modelfile.write_model(
        out, data if "pb" in formats else None, description, others=others,
        saved_model=_saved_model_writer(frozen) if "saved_model" in formats else None,
    )
    files = {kind: str(out.with_suffix(modelfile.SUFFIXES[kind])) for kind in formats}
    main = "pb" if "pb" in formats else formats[0]
    if config.saved_model:
        sidecar = modelfile.read_model(files[main]).values
        modelfile.write_saved_model(Path(config.saved_model), _saved_model_writer(frozen), sidecar, replace=False)
    sizes = {kind: _size(Path(path)) for kind, path in files.items()}
    return ExportResult(
        model=files[main],
        labels=str(labels_path),
        sidecar=str(sidecar_path),
        saved_model=config.saved_model,
        checkpoint=checkpoint.path,
        global_step=step,
        classes=classes,
        image_size=image_size,
        size_bytes=sizes[main],
        precision=config.precision,
        files=files,
        sizes=sizes,
        quantize=config.quantize,
        checkpoint_choice=chosen.which,
        temperature=temperature,
        tta=config.tta,
    )


def _freeze(checkpoint, num_classes: int, image_size: int, compute_dtype: str, temperature: float | None,
            tta: str):  # fmt: skip
    """The serving graph with the checkpoint's values (its averages, from --ema) as constants: a GraphDef
    of the outputs alone."""
    from finetune.compat import tf

    with tf.Graph().as_default() as graph:
        build_serving_graph(checkpoint, num_classes, image_size, compute_dtype, temperature, tta)
        return tf.compat.v1.graph_util.extract_sub_graph(graph.as_graph_def(), [PROBABILITIES, LOGITS, SLIM_OUTPUT])


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def _uncalibrated(train_dir: Path, checkpoint: str, step: int | None) -> str:
    """The warning for an export without a temperature: why there is none, and what to do."""
    if step is None:
        return (f"{checkpoint} is not a checkpoint of {train_dir}, so no temperature this run fitted applies: "
                "exporting uncalibrated probabilities; export it with its own run's --train-dir to calibrate, "
                "or pass --no-calibrate to silence this")  # fmt: skip
    return (f"no temperature fitted for step {step} of {train_dir}: exporting uncalibrated probabilities; "
            "training fits one for the checkpoint it ends on when it has validation passes; pass --no-calibrate "
            "to silence this")  # fmt: skip


def _temperature(train_dir: Path, step: int | None) -> float | None:
    """The temperature fitted for the exported step, or None when none was."""
    from finetune import rundir

    fit = rundir.read_calibration(train_dir, step)
    return None if fit is None else float(fit["temperature"])
