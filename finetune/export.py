"""Freeze a trained run into one `.pb` that plain TensorFlow can run, with its labels and a JSON sidecar.

The exported graph is rebuilt for inference (batch norm on moving statistics, no dropout, no aux head, no
training ops), loaded with the run's newest checkpoint, and its variables turned into constants. It has two
entry points into one network:

- ``input``: float32 [N, S, S, 3], images already preprocessed into [-1, 1] (slim's convention);
- ``image_bytes``: string [N], whole JPEG, PNG, GIF or BMP files, decoded, centre-cropped and resized in the
  graph, so any TensorFlow client can send raw files.

Outputs: ``probabilities`` [N, C] and ``logits`` [N, C]; slim's usual ``InceptionV3/Predictions/Reshape_1``
names the probabilities too. By default (``--calibrate``) ``probabilities`` is softmax(logits / T) with the
temperature fitted on the validation split; slim's node then keeps the network's own, uncalibrated softmax.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from finetune import modelfile
from finetune.config import ExportConfig
from finetune.errors import FinetuneError

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
    checkpoint_choice: str | None = None  # "best (step 40, validation accuracy 0.9300)", "newest (step 60)", "given"
    temperature: float | None = None  # folded into `probabilities` (--calibrate); None: uncalibrated


def build_serving_graph(num_classes: int, image_size: int, compute_dtype: str = "float32",
                        temperature: float | None = None):  # fmt: skip
    """Builds the inference network with both entry points in the current graph; returns the outputs.

    ``input`` and the outputs are float32 whatever ``compute_dtype``; a 16-bit graph casts inside. With a
    ``temperature``, ``probabilities`` is softmax(logits / temperature) (calibrated; the same argmax) while
    ``logits`` and slim's own output node stay the network's.
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
    net = model.build(images, num_classes, compute_dtype=compute_dtype)
    scores = net.probabilities if temperature is None else tf.nn.softmax(net.logits / temperature)
    probabilities = tf.identity(scores, name=PROBABILITIES)
    logits = tf.identity(net.logits, name=LOGITS)
    graph = tf.compat.v1.get_default_graph()
    if SLIM_OUTPUT not in {op.name for op in graph.get_operations()}:
        tf.identity(net.probabilities, name=SLIM_OUTPUT)
    return probabilities, logits


def _write_saved_model(graph_def, directory: Path, image_size: int, num_classes: int) -> None:
    """A SavedModel of the frozen graph, `serving_default` taking image bytes, `preprocessed` taking input."""
    from finetune.compat import tf

    if directory.exists():
        raise FinetuneError(f"--saved-model {directory} already exists; remove it or choose another folder")
    temporary = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    with tf.Graph().as_default() as graph, tf.compat.v1.Session(graph=graph) as session:
        tf.compat.v1.import_graph_def(graph_def, name="")
        tensor = graph.get_tensor_by_name
        outputs = {PROBABILITIES: tensor(f"{PROBABILITIES}:0"), LOGITS: tensor(f"{LOGITS}:0")}
        signature = tf.compat.v1.saved_model.signature_def_utils.predict_signature_def
        builder = tf.compat.v1.saved_model.Builder(str(temporary))
        builder.add_meta_graph_and_variables(
            session,
            [tf.compat.v1.saved_model.tag_constants.SERVING],
            signature_def_map={
                "serving_default": signature({IMAGE_BYTES: tensor(f"{IMAGE_BYTES}:0")}, outputs),
                "preprocessed": signature({INPUT: tensor(f"{INPUT}:0")}, outputs),
            },
        )
        builder.save()
    os.replace(temporary, directory)


def export(config: ExportConfig) -> ExportResult:
    """Freezes the run's newest checkpoint (or --checkpoint) into a .pb with its labels and sidecar."""
    from finetune import model, precision, rundir
    from finetune.compat import tf

    train_dir = Path(config.train_dir)
    run = rundir.read_run_config(train_dir)
    classes, image_size = list(run.classes), run.image_size
    chosen = rundir.choose_checkpoint(train_dir, config.checkpoint)
    checkpoint = model.open_checkpoint(chosen.path)
    out = Path(config.out) if config.out else train_dir / "model.pb"
    if out.suffix != ".pb":
        raise FinetuneError(f"--out {out}: name the file with a .pb suffix, e.g. model.pb")
    out.parent.mkdir(parents=True, exist_ok=True)

    # The type is frozen into the graph, not chosen per machine: bf16 is bfloat16 wherever the .pb runs.
    bf16 = config.precision == "bf16"
    compute_dtype = precision.BFLOAT16 if bf16 else precision.FLOAT32
    temperature = _temperature(train_dir, chosen.step) if config.calibrate else None
    with tf.Graph().as_default() as graph:
        build_serving_graph(len(classes), image_size, compute_dtype, temperature)
        variables = model.model_variables()
        model.check_restorable(variables, checkpoint, flag="--checkpoint")
        saver = tf.compat.v1.train.Saver(var_list={v.op.name: v for v in variables})
        with tf.compat.v1.Session(graph=graph) as session:
            saver.restore(session, checkpoint.path)
            frozen = tf.compat.v1.graph_util.convert_variables_to_constants(
                session, graph.as_graph_def(), [PROBABILITIES, LOGITS, SLIM_OUTPUT]
            )
    data = frozen.SerializeToString()
    step = rundir.checkpoint_step(checkpoint.path)
    labels_path, sidecar_path = modelfile.write_model(
        out,
        data,
        classes=classes,
        image_size=image_size,
        precision=config.precision,
        compute_dtype=compute_dtype,
        checkpoint=str(Path(checkpoint.path).resolve()),
        global_step=step,
        dataset=run.dataset,
        dataset_fingerprint=run.dataset_fingerprint,
        pretrained_from=run.checkpoint,
        temperature=temperature,
    )
    if config.saved_model:
        _write_saved_model(frozen, Path(config.saved_model), image_size, len(classes))
    return ExportResult(
        model=str(out),
        labels=str(labels_path),
        sidecar=str(sidecar_path),
        saved_model=config.saved_model,
        checkpoint=checkpoint.path,
        global_step=step,
        classes=classes,
        image_size=image_size,
        size_bytes=len(data),
        precision=config.precision,
        checkpoint_choice=chosen.which,
        temperature=temperature,
    )


def _temperature(train_dir: Path, step: int | None) -> float | None:
    """The temperature fitted for the exported step, or None (with a warning) when none was."""
    from finetune import rundir

    fit = rundir.read_calibration(train_dir, step)
    if fit is None:
        log.warning(f"no temperature fitted for step {step} of {train_dir}: exporting uncalibrated probabilities; "
                    "training fits one for the checkpoint it ends on when it has validation passes; pass "
                    "--no-calibrate to silence this")  # fmt: skip
        return None
    return float(fit["temperature"])
