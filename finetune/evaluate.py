"""Measure a trained model on a held-out split: every example exactly once, through the inference graph.

``evaluate`` runs either a train dir's checkpoint (rebuilt as the inference graph: batch norm on its moving
statistics, eval preprocessing, no dropout, no aux head) or an exported ``.pb`` over the split, then derives
everything from the predictions in NumPy: top-1 and top-5 accuracy, per-class precision, recall, F1 and
support, the confusion matrix (also drawn as a PNG), and the most confidently misclassified files.
``watch`` does the same for each new checkpoint while training runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from finetune import rundir
from finetune.config import EvaluateConfig
from finetune.errors import FinetuneError, translates_tf_errors
from finetune.files import replacing, write_text_atomically

log = logging.getLogger("finetune")


@dataclass
class ClassScore:
    name: str
    precision: float
    recall: float
    f1: float
    support: int


@dataclass
class Mistake:
    path: str
    label: str
    predicted: str
    confidence: float


@dataclass
class ExamplePrediction:
    path: str
    label: str
    predicted: str
    confidence: float


@dataclass
class Evaluation:
    """The measurements of one model on one split; saved as eval-<split>.json."""

    split: str
    examples: int
    top1: float
    top5: float | None  # only with more than 5 classes
    classes: list[str]
    per_class: list[ClassScore]
    confusion: list[list[int]]  # rows: true class, columns: predicted class
    most_confident_mistakes: list[Mistake]
    predictions: list[ExamplePrediction]  # every example, in the split's file order
    source: str  # the checkpoint or .pb evaluated
    global_step: int | None
    dataset: str
    dataset_fingerprint: str
    seconds: float
    images_per_second: float
    precision: str = "fp32"  # the compute precision the model ran at
    report: str | None = None  # the JSON file written
    confusion_png: str | None = None
    warnings: list[str] = field(default_factory=list)
    html: str | None = None  # the HTML report written (see finetune/report.py), unless --no-html
    html_bytes: int | None = None
    html_seconds: float | None = None  # time spent building it (pictures, Grad-CAM, curves)
    runtime: str | None = None  # what ran an exported .tflite or .onnx (LiteRT, onnxruntime), with its version
    checkpoint_choice: str | None = None  # which of a train dir's checkpoints: "best (step 40, ...)", "newest (...)"
    # Expected calibration error of the probabilities as they are (finetune/calibration.py: 15 equal-width
    # bins of the top-class confidence); the HTML report shows the same number.
    ece: float | None = None
    temperature: float | None = None  # the run's fitted temperature for this checkpoint (fitted here on validation)
    ece_calibrated: float | None = None  # the ECE of softmax(logits / temperature)
    reliability_png: str | None = None
    tta: str = "none"  # test-time augmentation (--tta): top1 and the rest are of the averaged probabilities
    top1_without_tta: float | None = None  # the same pass's top-1 on the plain images alone


# -------------------------------------------------------------------------------------------------- metrics


def score(
    probabilities: np.ndarray, labels: np.ndarray, paths: list[str], classes: list[str], mistakes: int = 10
) -> dict:
    """Accuracy, per-class scores, confusion matrix and the most confident mistakes, from predictions."""
    count, num_classes = probabilities.shape
    predicted = probabilities.argmax(axis=1)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    per_class = []
    for index, name in enumerate(classes):
        true_positive = int(confusion[index, index])
        predicted_count = int(confusion[:, index].sum())
        support = int(confusion[index].sum())
        precision = true_positive / predicted_count if predicted_count else 0.0
        recall = true_positive / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class.append(ClassScore(name, precision, recall, f1, support))
    top5 = None
    if num_classes > 5:
        best5 = np.argsort(-probabilities, axis=1)[:, :5]
        top5 = float((best5 == labels[:, None]).any(axis=1).mean())
    every = [
        ExamplePrediction(paths[i], classes[labels[i]], classes[predicted[i]], float(probabilities[i, predicted[i]]))
        for i in range(count)
    ]
    wrong = np.flatnonzero(predicted != labels)
    wrong = wrong[np.argsort(-probabilities[wrong, predicted[wrong]], kind="stable")][:mistakes]
    return {
        "examples": int(count),
        "top1": float((predicted == labels).mean()) if count else 0.0,
        "top5": top5,
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "most_confident_mistakes": [
            Mistake(paths[i], classes[labels[i]], classes[predicted[i]], float(probabilities[i, predicted[i]]))
            for i in wrong
        ],
        "predictions": every,
    }


# ------------------------------------------------------------------------------------------------ the PNG


def draw_confusion(confusion: list[list[int]], classes: list[str], path: Path) -> Path:
    """Draws the confusion matrix with Pillow: rows true, columns predicted, class names on both axes."""
    from PIL import Image, ImageDraw, ImageFont

    matrix = np.asarray(confusion)
    n = len(classes)
    font = ImageFont.load_default(size=14)
    cell = max(36, 9 * len(str(int(matrix.max(initial=0)))) + 12)
    label_width = max(int(font.getlength(name)) for name in classes) + 16
    top, left = label_width + 28, label_width + 28
    image = Image.new("RGB", (left + n * cell + 16, top + n * cell + 16), "white")
    draw = ImageDraw.Draw(image)
    rows = matrix.sum(axis=1, keepdims=True).clip(min=1)
    for row in range(n):
        for column in range(n):
            share = matrix[row, column] / rows[row, 0]
            shade = int(255 - 200 * share)
            colour = (shade, shade, 255) if row == column else (255, shade, shade)
            box = (left + column * cell, top + row * cell, left + (column + 1) * cell, top + (row + 1) * cell)
            draw.rectangle(box, fill=colour, outline=(180, 180, 180))
            text = str(int(matrix[row, column]))
            draw.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), text, fill="black", font=font, anchor="mm")
        draw.text((left - 8, top + row * cell + cell / 2), classes[row], fill="black", font=font, anchor="rm")
    # Column names run upward: drawn on a strip, rotated, pasted above the columns.
    strip = Image.new("RGB", (label_width, n * cell), "white")
    strip_draw = ImageDraw.Draw(strip)
    for column in range(n):
        strip_draw.text((8, column * cell + cell / 2), classes[column], fill="black", font=font, anchor="lm")
    image.paste(strip.rotate(90, expand=True), (left, top - label_width - 4))
    draw.text((left, 4), "predicted", fill="black", font=font)
    axis = Image.new("RGB", (80, 20), "white")
    ImageDraw.Draw(axis).text((0, 2), "true", fill="black", font=font)
    image.paste(axis.rotate(90, expand=True), (2, top))
    with replacing(path) as temporary:
        image.save(temporary, format="PNG")
    return path


# ------------------------------------------------------------------------------------------- predictions


def predict_split(info, split: str, batch_size: int, image_size: int, build_probabilities, restore,
                  extras: dict | None = None):  # fmt: skip
    """Runs the split once through a graph; returns probabilities, labels, paths, seconds.

    ``build_probabilities`` maps the batch of preprocessed images to the tensor fetched per batch (from
    :func:`checkpoint_source` or :func:`frozen_source`, or any other function of the images);
    ``restore(session)`` loads its weights. The split is read with eval preprocessing, every example once,
    in its file order: the pass :func:`evaluate` scores. When the builder also made Grad-CAM maps
    (``heat_maps=True``), they are fetched too and put in ``extras`` under "heat_maps" ([N, h, w], each
    scaled to a maximum of 1).
    """
    from finetune.gradcam import HEAT_MAPS
    from finetune.compat import tf
    from finetune.dataset import read_dataset
    from finetune.runtime import session_config

    extras = {} if extras is None else extras

    with tf.Graph().as_default():
        with tf.device("/cpu:0"):
            batches = read_dataset(info, split, batch_size=batch_size, image_size=image_size, training=False)
            batch = tf.compat.v1.data.make_one_shot_iterator(batches).get_next()
        probabilities = build_probabilities(batch["image"])
        heat = tf.compat.v1.get_collection(HEAT_MAPS)[:1]
        plain = tf.compat.v1.get_collection(PLAIN_PROBABILITIES)[:1]  # with_tta's first view
        with tf.compat.v1.Session(config=session_config()) as session:
            restore(session)
            outputs, started = [], time.monotonic()
            from finetune.progress import Progress

            with Progress(f"evaluate {split}", info.split_counts.get(split)) as progress:
                while True:
                    try:
                        result = session.run([probabilities, batch["label"], batch["path"], *heat, *plain])
                    except tf.errors.OutOfRangeError:
                        break
                    outputs.append(result)
                    progress.advance(len(result[1]))
            seconds = time.monotonic() - started
    if not outputs:
        raise FinetuneError(f"the {split} split of {info.root} yielded no examples; rebuild the dataset")
    probabilities = np.concatenate([o[0] for o in outputs])
    labels = np.concatenate([o[1] for o in outputs]).astype(np.int64)
    # For reports and messages only; a file name that is not UTF-8 shows its odd bytes as U+FFFD.
    paths = [p.decode("utf-8", "replace") for o in outputs for p in o[2]]
    if heat:
        from finetune.gradcam import scale

        extras["heat_maps"] = scale(np.concatenate([o[3] for o in outputs]))
    if plain:
        extras["plain_probabilities"] = np.concatenate([o[3 + len(heat)] for o in outputs])
    return probabilities, labels, paths, seconds


# ------------------------------------------------------------------------------- test-time augmentation

PLAIN_PROBABILITIES = "finetune_plain_probabilities"  # graph collection: the un-augmented view's probabilities
TTA_CROP_FRACTION = 0.875  # side of each of the five crops, as a share of the (already centre-cropped) input


def tta_views(images, mode: str) -> list:
    """The views of a preprocessed batch that ``--tta`` averages over, the images themselves first.

    flip: the images and their horizontal mirror images. crops: those two, then the four corner crops and
    the centre crop of TTA_CROP_FRACTION of the side, each resized back (bilinear) to the input size.
    """
    from finetune.compat import tf

    views = [images, tf.reverse(images, axis=[2])]
    if mode == "crops":
        size = int(images.shape[1])
        crop = int(round(size * TTA_CROP_FRACTION))
        far, middle = size - crop, (size - crop) // 2
        for top, left in ((0, 0), (0, far), (far, 0), (far, far), (middle, middle)):
            window = images[:, top:top + crop, left:left + crop, :]
            views.append(tf.image.resize(window, [size, size], method="bilinear"))
    return views


def with_tta(build, mode: str):
    """A graph builder (as :func:`predict_split` takes) that averages ``build``'s probabilities over the
    views of :func:`tta_views`, run as one batch of views x N; ``mode`` "none" returns ``build`` itself.
    The plain view's probabilities go to the PLAIN_PROBABILITIES collection (the report's "without"), and
    Grad-CAM maps, when built, are the plain view's."""
    if mode == "none":
        return build
    from finetune.compat import tf
    from finetune.gradcam import HEAT_MAPS

    def build_averaged(images):
        views = tta_views(images, mode)
        probabilities = build(tf.concat(views, 0))
        per_view = tf.reshape(probabilities, [len(views), tf.shape(images)[0], -1])
        tf.compat.v1.add_to_collection(PLAIN_PROBABILITIES, per_view[0])
        heat = tf.compat.v1.get_collection_ref(HEAT_MAPS)
        if heat:
            heat[0] = heat[0][: tf.shape(images)[0]]
        return tf.reduce_mean(per_view, axis=0)

    return build_averaged


def checkpoint_source(checkpoint_path: str, num_classes: int, compute_dtype: str = "float32",
                      heat_maps: bool = False):  # fmt: skip
    """Graph builder and restore function for a checkpoint rebuilt as the inference graph.

    With ``heat_maps`` the builder also adds Grad-CAM maps of the predicted classes to the graph (see
    :func:`predict_split`).
    """
    from finetune import model
    from finetune.compat import tf

    checkpoint = model.open_checkpoint(checkpoint_path)

    def build(images):
        net = model.build(images, num_classes, compute_dtype=compute_dtype, restored=True)
        if heat_maps:
            from finetune.gradcam import HEAT_MAPS, heat_map_tensor

            tf.compat.v1.add_to_collection(HEAT_MAPS, heat_map_tensor(net.end_points["Mixed_7c"], net.logits))
        return net.probabilities

    def restore(session):
        # A run trained with --ema is evaluated on its averaged weights (model.restore takes them).
        model.restore(session, model.model_variables(), checkpoint, flag="--checkpoint")

    return build, restore


def frozen_source(model_path: Path, heat_maps: bool = False):
    """Graph builder for an exported .pb, fed through its preprocessed `input` tensor (Grad-CAM as above)."""
    from finetune.compat import tf
    from finetune.modelfile import load_graph_def

    graph_def = load_graph_def(model_path)

    def build(images):
        if heat_maps:
            from finetune.gradcam import HEAT_MAPS, frozen_block, heat_map_tensor

            probabilities, logits = tf.compat.v1.import_graph_def(
                graph_def, input_map={"input:0": images}, return_elements=["probabilities:0", "logits:0"],
                name="model",
            )  # fmt: skip
            block = frozen_block(tf.compat.v1.get_default_graph(), "--model", model_path)
            tf.compat.v1.add_to_collection(HEAT_MAPS, heat_map_tensor(block, logits))
            return probabilities
        (probabilities,) = tf.compat.v1.import_graph_def(
            graph_def, input_map={"input:0": images}, return_elements=["probabilities:0"], name="model"
        )
        return probabilities

    return build, lambda session: None


def runner_source(runner):
    """Graph builder for an exported .tflite or .onnx: each batch goes through its runtime (finetune.runtimes)
    from inside the evaluation graph, so the split is read and preprocessed exactly as for a .pb."""
    from finetune.compat import tf

    def build(images):
        probabilities = tf.numpy_function(runner.run, [images], tf.float32, stateful=True, name="runtime")
        probabilities.set_shape([None, len(runner.classes)])
        return probabilities

    return build, lambda session: None


# -------------------------------------------------------------------------------------------- entry points


def _resolve(config: EvaluateConfig):
    """What to evaluate (checkpoint or .pb), on which dataset, at which size; where to write the report."""
    from finetune import modelfile
    from finetune.dataset import load_dataset

    if (config.train_dir is None) == (config.model is None):
        raise FinetuneError("pass --train-dir (a training run) or --model (an exported .pb), one of them")
    if config.model:
        exported = modelfile.read_model(config.model)
        dataset = config.dataset or exported.dataset
        if not dataset:
            raise FinetuneError(f"--model {config.model}: its sidecar names no dataset; pass --dataset")
        info = load_dataset(dataset, flag="--dataset")
        if info.classes != exported.classes:
            raise FinetuneError(
                f"--model {config.model} was exported for classes {list(exported.classes)}, but {dataset} has "
                f"{list(info.classes)}; pass the --dataset it was trained on"
            )
        out_dir = Path(config.model).parent
        # model.eval-validation.json for model.pb; model.tflite.eval-validation.json beside the same stem
        name = Path(config.model).stem if exported.kind == "pb" else Path(config.model).name
        report = out_dir / f"{name}.eval-{config.split}.json"
        return info, exported.image_size, None, report
    train_dir = Path(config.train_dir)
    run = rundir.read_run_config(train_dir)
    info = load_dataset(config.dataset or run.dataset, flag="--dataset")
    if info.classes != run.classes:
        raise FinetuneError(
            f"--dataset {info.root} has classes {list(info.classes)}, but {train_dir} was trained on "
            f"{list(run.classes)}; pass the dataset it was trained on"
        )
    return info, run.image_size, train_dir, train_dir / f"eval-{config.split}.json"


@translates_tf_errors  # TensorFlow's errors about damaged files, as FinetuneErrors naming the file
def evaluate(config: EvaluateConfig, checkpoint: str | None = None) -> Evaluation:
    """Evaluates a train dir's newest checkpoint (or --checkpoint), or an exported .pb, on one split."""
    from finetune import precision

    info, image_size, train_dir, report = _resolve(config)
    if config.split not in info.split_counts or not info.split_counts[config.split]:
        raise FinetuneError(
            f"--split {config.split}: {info.root} has no such split (it has "
            f"{', '.join(s for s, n in info.split_counts.items() if n)}); rebuild it with that fraction"
        )
    classes = list(info.classes)
    closing = contextlib.ExitStack()
    runtime = None  # TensorFlow, unless a .tflite or .onnx names its runtime
    if config.model:
        from finetune import modelfile
        from finetune.modelfile import read_model

        source = str(Path(config.model).resolve())
        used = precision.check_frozen_precision(read_model(config.model).precision, config.precision, config.model)
        if modelfile.model_kind(config.model) in ("tflite", "onnx"):
            from finetune.runtimes import open_runner

            runner = open_runner(config.model)
            closing.callback(runner.close)
            runtime = runner.runtime
            build, restore = runner_source(runner)
        else:
            build, restore = frozen_source(Path(config.model), heat_maps=config.html)
    else:
        from finetune import model

        chosen = rundir.choose_checkpoint(train_dir, checkpoint or config.checkpoint)
        source = model.open_checkpoint(chosen.path).path  # a folder or an .index file given: its prefix
        compute = precision.resolve(config.precision or "fp32")
        used = compute.precision
        build, restore = checkpoint_source(source, len(classes), compute.dtype, heat_maps=config.html)
        if chosen.which != "given":
            log.info(f"evaluating the {chosen.which} checkpoint: {source}")
    extras: dict = {}
    with closing:
        probabilities, labels, paths, seconds = predict_split(
            info, config.split, config.batch_size, image_size, with_tta(build, config.tta), restore, extras
        )
    expected = info.split_counts[config.split]
    if len(labels) != expected:
        raise FinetuneError(
            f"the {config.split} split of {info.root} yielded {len(labels)} examples but dataset.json "
            f"counts {expected}; the dataset is damaged: rebuild it"
        )
    scores = score(probabilities, labels, paths, classes, mistakes=config.mistakes)
    evaluation = Evaluation(
        split=config.split,
        classes=classes,
        source=source,
        global_step=None if config.model else rundir.checkpoint_step(source),
        dataset=str(info.root),
        dataset_fingerprint=info.fingerprint,
        seconds=seconds,
        images_per_second=len(labels) / seconds if seconds else 0.0,
        precision=used,
        runtime=runtime,
        **scores,
    )
    evaluation.checkpoint_choice = None if config.model else chosen.which
    if config.tta != "none":
        evaluation.tta = config.tta
        evaluation.top1_without_tta = float((extras["plain_probabilities"].argmax(1) == labels).mean())
    own_step = None if config.model else rundir.run_step(train_dir, source)  # None: not a step of this run
    _add_calibration(evaluation, probabilities, labels, train_dir, report, own_step)
    png = report.with_suffix(".png")
    evaluation.confusion_png = str(draw_confusion(evaluation.confusion, classes, png))
    evaluation.report = str(report)
    if config.html:
        _write_html(evaluation, config, report.with_suffix(".html"), probabilities, labels, info, image_size,
                    extras.get("heat_maps"), train_dir)  # fmt: skip
    write_text_atomically(report, json.dumps(asdict(evaluation), indent=2) + "\n")
    return evaluation


def _write_html(evaluation: Evaluation, config: EvaluateConfig, path: Path, probabilities, labels, info,
                image_size: int, heat_maps, train_dir: Path | None) -> None:  # fmt: skip
    """Writes the HTML report beside the JSON and records where, its size and what it cost.

    The cost counts the report's own work and the Grad-CAM maps the evaluation pass computed for it.
    """
    from finetune import report

    written = report.write_report(path, evaluation, probabilities, labels, info, image_size, heat_maps,
                                  train_dir, config.correct_examples)  # fmt: skip
    evaluation.html, evaluation.html_bytes = str(written.path), written.size_bytes
    evaluation.html_seconds = written.seconds
    for warning in written.warnings:
        log.warning(warning)
    evaluation.warnings += written.warnings


def watch(config: EvaluateConfig, on_evaluation) -> int:
    """Evaluates each new checkpoint of a train dir as it appears, until training ends or nothing new comes.

    Writes ``eval/<split>_accuracy`` into the train dir's TensorBoard events and calls ``on_evaluation``
    with each result. Returns how many checkpoints it evaluated. Ctrl-C closes the events file and raises
    KeyboardInterrupt on to the caller.
    """
    from finetune.compat import tf

    if config.model or not config.train_dir:
        raise FinetuneError("--watch follows a training run: pass --train-dir, not --model")
    train_dir = Path(config.train_dir)
    seen: set[str] = set()
    writer = None
    waited_since = time.monotonic()
    log.info(f"watching {train_dir} for new checkpoints (Ctrl-C stops)")
    try:
        while True:
            latest = _newest_checkpoint(train_dir)
            if latest and latest not in seen:
                seen.add(latest)
                try:
                    evaluation = evaluate(config, checkpoint=latest)
                except FinetuneError as exc:
                    if _newest_checkpoint(train_dir) != latest:
                        continue  # removed by the trainer's rotation while we read it: take the newer one
                    raise exc
                if writer is None:
                    with tf.Graph().as_default():  # the v1 writer refuses to be made in eager mode
                        writer = tf.compat.v1.summary.FileWriter(str(train_dir), filename_suffix=".eval")
                summary = tf.compat.v1.Summary(
                    value=[tf.compat.v1.Summary.Value(tag=f"eval/{config.split}_accuracy",
                                                      simple_value=evaluation.top1)]
                )  # fmt: skip
                writer.add_summary(summary, evaluation.global_step or 0)
                writer.flush()
                on_evaluation(evaluation)
                waited_since = time.monotonic()
                if _training_finished(train_dir, evaluation.global_step):
                    break
            elif time.monotonic() - waited_since > config.watch_minutes * 60:
                log.info(f"no new checkpoint in {train_dir} for {config.watch_minutes:g} minutes; stopping")
                break
            else:
                time.sleep(2.0)
    finally:  # Ctrl-C goes on up: the CLI exits 130, as every command does
        if writer is not None:
            writer.close()
    return len(seen)


def _newest_checkpoint(train_dir: Path) -> str | None:
    """The train dir's newest checkpoint, if any; Ctrl-C during the look is held and raised after it.

    TensorFlow answers "no checkpoint yet" by raising and catching NotFoundError in C++; a Ctrl-C landing
    there comes out as a pybind11 RuntimeError with a traceback instead of KeyboardInterrupt.
    """
    with _interrupts_held():
        return rundir.newest_checkpoint(train_dir)


@contextlib.contextmanager
def _interrupts_held():
    """Defers SIGINT to the end of the block, then raises KeyboardInterrupt (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _training_finished(train_dir: Path, step: int | None) -> bool:
    return step is not None and step >= rundir.read_run_config(train_dir).total_steps


# ------------------------------------------------------------------------------------------------ calibration


def fit_and_record(train_dir: Path, probabilities: np.ndarray, labels: np.ndarray, step: int | None) -> dict:
    """Fits the temperature on a checkpoint's validation probabilities; records it and draws the reliability
    diagram (calibration-validation.png) in the train dir. Returns what calibration.json holds for the step."""
    from finetune import calibration

    logits = calibration.log_probabilities(probabilities)
    temperature = calibration.fit_temperature(logits, labels)
    calibrated = calibration.softmax(logits, temperature)
    fit = {
        "temperature": temperature, "split": "validation", "examples": int(len(labels)),
        "ece_before": calibration.expected_calibration_error(probabilities, labels),
        "ece_after": calibration.expected_calibration_error(calibrated, labels),
        "nll_before": calibration.negative_log_likelihood(logits, labels),
        "nll_after": calibration.negative_log_likelihood(logits, labels, temperature),
    }  # fmt: skip
    rundir.write_calibration(train_dir, step, fit)
    png = calibration.draw_reliability({
        f"as trained: ECE {fit['ece_before']:.3f}": (probabilities, labels),
        f"temperature {temperature:.2f}: ECE {fit['ece_after']:.3f}": (calibrated, labels),
    }, train_dir / "calibration-validation.png")  # fmt: skip
    return {**fit, "step": step, "reliability_png": str(png)}


def _add_calibration(evaluation: Evaluation, probabilities, labels, train_dir: Path | None, report: Path,
                     step: int | None) -> None:  # fmt: skip
    """The ECE, and for a train dir's checkpoint the temperature (fitted here on the validation split, else
    the one training recorded for ``step``, the run's step the checkpoint is) with the ECE it gives, and the
    reliability diagram."""
    from finetune import calibration

    evaluation.ece = calibration.expected_calibration_error(probabilities, labels)
    curves = {f"as is: ECE {evaluation.ece:.3f}": (probabilities, labels)}
    fit = None
    if train_dir is not None and evaluation.split == "validation":
        # Fitted and reported, not recorded: what export folds in is what training recorded for the step.
        temperature = calibration.fit_temperature(calibration.log_probabilities(probabilities), labels)
        fit = {"temperature": temperature}
    elif train_dir is not None:
        fit = rundir.read_calibration(train_dir, step)
    if fit:
        calibrated = calibration.softmax(calibration.log_probabilities(probabilities), fit["temperature"])
        evaluation.temperature = fit["temperature"]
        evaluation.ece_calibrated = calibration.expected_calibration_error(calibrated, labels)
        curves[f"temperature {fit['temperature']:.2f}: ECE {evaluation.ece_calibrated:.3f}"] = (calibrated, labels)
    png = report.with_name(report.stem + "-reliability.png")
    evaluation.reliability_png = str(calibration.draw_reliability(curves, png))
