"""Grad-CAM: where in the last Inception block the network found the class it chose.

For an image and a class, the gradient of that class's logit with respect to the output of
``InceptionV3/Mixed_7c`` (2048 channels on an 8x8 grid at 299 pixels), averaged over the grid, weighs each
channel; the weighted sum of the channels with its negative part cut off is the heat map (Grad-CAM,
Selvaraju et al. 2017). It is computed for the predicted class unless another is asked for, and drawn over
the picture exactly as the network saw it (eval crop and resize), so map and pixels line up.

Which models can be explained:

- a train dir's checkpoint, rebuilt as the inference graph;
- an exported ``.pb``: its frozen graph is imported and differentiated (variables became constants, and
  every op on the way from Mixed_7c to the logits has a gradient);
- not a TFLite or ONNX file: their runtimes run a model forward only and expose no gradients, and their
  converters fuse and rename the inner layers, so Mixed_7c's output is not a tensor one can ask for. Explain
  the ``.pb`` exported beside them, or the train dir.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune.config import ExplainConfig
from finetune.errors import FinetuneError
from finetune.files import replacing
from finetune.network import ROOT

CAM_BLOCK = f"{ROOT}/Mixed_7c"  # the last Inception block: the finest grid that still sees whole objects


HEAT_MAPS = "finetune_gradcam_heat_maps"  # graph collection: the heat-map tensor evaluate fetches per batch


def heat_map_tensor(block, logits, target=None):
    """Grad-CAM maps [N, h, w] (not yet scaled) of ``target`` classes (default: the predicted ones).

    The gradient runs from the logits back to the block only (the final pool and the 1x1 Logits conv), so
    it costs almost nothing beside the forward pass that computed the block.
    """
    from finetune.compat import tf

    if target is None:
        target = tf.argmax(logits, axis=1, output_type=tf.int32)
    chosen = tf.reduce_sum(logits * tf.one_hot(target, tf.shape(logits)[1], dtype=logits.dtype))
    (gradient,) = tf.gradients(chosen, [block])
    weights = tf.reduce_mean(tf.cast(gradient, tf.float32), axis=[1, 2])  # [N, channels]
    return tf.nn.relu(tf.einsum("nhwc,nc->nhw", tf.cast(block, tf.float32), weights))


def frozen_block(graph, flag: str = "--model", model_path: str | Path = ""):
    """Mixed_7c's output in an imported frozen graph."""
    blocks = [op for op in graph.get_operations() if op.name.endswith("Mixed_7c/concat")]
    if len(blocks) != 1:
        raise FinetuneError(f"{flag} {model_path}: no single {CAM_BLOCK} output in the graph; "
                            "pass a .pb written by `finetune export`")  # fmt: skip
    return blocks[0].outputs[0]


def scale(heat: np.ndarray) -> np.ndarray:
    """Each map divided by its maximum, so maps read alike whatever the logit's scale (all-zero stays zero)."""
    peak = heat.reshape(len(heat), -1).max(axis=1) if len(heat) else np.zeros(0)
    return (heat / np.where(peak > 0, peak, 1.0)[:, None, None]).astype(np.float32)


class GradCam:
    """A graph that maps preprocessed images to probabilities and Grad-CAM heat maps, with its session."""

    def __init__(self, graph, session, images, block, logits, probabilities, classes: list[str]):
        from finetune.compat import tf

        self.graph, self.session, self.images, self.classes = graph, session, images, classes
        with graph.as_default():
            predicted = tf.argmax(logits, axis=1, output_type=tf.int32)
            self.target = tf.compat.v1.placeholder_with_default(predicted, [None], name="gradcam_target")
            self.heat = heat_map_tensor(block, logits, self.target)
            self.probabilities = probabilities

    def run(self, images: np.ndarray, targets: np.ndarray | None = None, batch_size: int = 16):
        """Probabilities [N, classes] and heat maps [N, h, w] scaled to [0, 1] for preprocessed images.

        ``targets`` (class indices, one per image) chooses the class each map explains; by default the
        predicted one.
        """
        probabilities, heats = [], []
        for start in range(0, len(images), batch_size):
            feed = {self.images: images[start : start + batch_size]}
            if targets is not None:
                feed[self.target] = np.asarray(targets[start : start + batch_size], np.int32)
            p, h = self.session.run([self.probabilities, self.heat], feed)
            probabilities.append(p)
            heats.append(h)
        if not probabilities:
            return np.zeros((0, len(self.classes)), np.float32), np.zeros((0, 1, 1), np.float32)
        return np.concatenate(probabilities), scale(np.concatenate(heats))

    def close(self) -> None:
        self.session.close()


def from_checkpoint(checkpoint_path: str, classes: list[str], image_size: int, compute_dtype: str = "float32"):
    """A GradCam over a checkpoint, rebuilt as the inference graph (as `finetune evaluate` runs it)."""
    from finetune import model
    from finetune.compat import tf
    from finetune.runtime import session_config

    checkpoint = model.open_checkpoint(checkpoint_path)
    graph = tf.Graph()
    with graph.as_default():
        images = tf.compat.v1.placeholder(tf.float32, [None, image_size, image_size, 3], name="images")
        net = model.build(images, len(classes), compute_dtype=compute_dtype, restored=True)
        session = tf.compat.v1.Session(graph=graph, config=session_config())
        try:
            model.restore(session, model.model_variables(), checkpoint, flag="--checkpoint")
        except BaseException:
            session.close()
            raise
        return GradCam(graph, session, images, net.end_points["Mixed_7c"], net.logits, net.probabilities, classes)


def from_frozen(model_path: str | Path, flag: str = "--model"):
    """A GradCam over an exported .pb: its frozen graph imported and differentiated."""
    from finetune.compat import tf
    from finetune.modelfile import INPUT, LOGITS, PROBABILITIES, load_graph_def, read_model
    from finetune.runtime import session_config

    check_explainable(model_path, flag)
    info = read_model(model_path, flag)
    graph_def = load_graph_def(model_path, flag)
    graph = tf.Graph()
    with graph.as_default():
        size = info.image_size
        images = tf.compat.v1.placeholder(tf.float32, [None, size, size, 3], name="images")
        logits, probabilities = tf.compat.v1.import_graph_def(
            graph_def, input_map={f"{INPUT}:0": images}, return_elements=[f"{LOGITS}:0", f"{PROBABILITIES}:0"],
            name="model",
        )  # fmt: skip
        block = frozen_block(graph, flag, model_path)
        session = tf.compat.v1.Session(graph=graph, config=session_config())
        return GradCam(graph, session, images, block, logits, probabilities, list(info.classes))


def check_explainable(model_path: str | Path, flag: str = "--model") -> None:
    """Refuses a model file Grad-CAM cannot use (anything but a frozen .pb), saying why and what to pass."""
    suffix = Path(model_path).suffix.lower()
    if suffix in (".tflite", ".onnx"):
        raise FinetuneError(
            f"{flag} {model_path}: Grad-CAM needs gradients, and a {suffix[1:].upper()} runtime runs the model "
            f"forward only (its converter also fuses away the {CAM_BLOCK} output); pass the .pb exported beside "
            "it, or --train-dir"
        )
    if suffix != ".pb":
        raise FinetuneError(f"{flag} {model_path}: not a .pb; Grad-CAM works on an exported .pb or a --train-dir")


# ------------------------------------------------------------------------------------------------ pictures


def to_pixels(image: np.ndarray) -> np.ndarray:
    """A preprocessed image ([-1, 1] float) back to uint8 RGB."""
    return np.clip((np.asarray(image, np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def upsample(heat: np.ndarray, size: int) -> np.ndarray:
    """A heat map on the block's grid, resized bilinearly to ``size`` x ``size`` pixels (values in [0, 1])."""
    from PIL import Image

    grid = Image.fromarray(np.asarray(heat, np.float32), mode="F")
    return np.asarray(grid.resize((size, size), Image.BILINEAR), np.float32)


def _colours(values: np.ndarray) -> np.ndarray:
    """Heat to colour: dark blue through cyan, yellow, to red (a jet-like ramp), uint8 [..., 3]."""
    stops = np.array([[0, 0, 128], [0, 96, 255], [0, 230, 230], [255, 230, 0], [255, 64, 0], [200, 0, 0]], float)
    position = np.clip(values, 0, 1) * (len(stops) - 1)
    low = np.floor(position).astype(int).clip(0, len(stops) - 2)
    share = (position - low)[..., None]
    return (stops[low] * (1 - share) + stops[low + 1] * share).astype(np.uint8)


def overlay(image: np.ndarray, heat: np.ndarray, size: int):
    """The picture (preprocessed, [-1, 1]) at ``size`` pixels with the heat map blended over it; a PIL image."""
    from PIL import Image

    picture = np.asarray(Image.fromarray(to_pixels(image)).resize((size, size), Image.BILINEAR), np.float32)
    heat = upsample(heat, size)
    alpha = (0.25 + 0.45 * heat)[..., None]  # hot places show the colour most, cold ones the picture
    blended = picture * (1 - alpha) + _colours(heat).astype(np.float32) * alpha
    return Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8))


def thumbnail(image: np.ndarray, size: int):
    """The picture (preprocessed, [-1, 1]) as the network saw it, at ``size`` pixels; a PIL image."""
    from PIL import Image

    return Image.fromarray(to_pixels(image)).resize((size, size), Image.BILINEAR)


def side_by_side(image: np.ndarray, heat: np.ndarray, size: int):
    """The picture as the network saw it and the same with its heat map, side by side; a PIL image."""
    from PIL import Image

    both = Image.new("RGB", (2 * size + 4, size), "white")
    both.paste(Image.fromarray(to_pixels(image)).resize((size, size), Image.BILINEAR), (0, 0))
    both.paste(overlay(image, heat, size), (size + 4, 0))
    return both


def jpeg_bytes(picture, quality: int = 82) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------- finetune explain


@dataclass
class Explanation:
    path: str
    predicted: str | None  # the predicted class
    probability: float | None
    explained: str | None  # the class the heat map explains
    top: list[tuple[str, float]] | None
    overlay: str | None  # the file written
    error: str | None = None


def _preprocess_files(paths: list[Path], image_size: int) -> list[np.ndarray | str]:
    """Each file decoded and put through the eval transform, or the reason it cannot be.

    The bytes go to TensorFlow's decoder as `finetune predict` sends them (turned upright first when EXIF
    says so), so an explanation sees the same pixels, and gives the same probabilities, as a prediction.
    """
    from finetune.compat import tf
    from finetune.predict import _upright_bytes
    from finetune.preprocessing import decode_image, preprocess_for_eval

    results: list[np.ndarray | str] = []
    with tf.Graph().as_default():
        encoded = tf.compat.v1.placeholder(tf.string, [])
        prepared = preprocess_for_eval(decode_image(encoded), image_size)
        with tf.compat.v1.Session() as session:
            for path in paths:
                try:
                    results.append(session.run(prepared, {encoded: _upright_bytes(path.read_bytes())}))
                except OSError as exc:
                    results.append(f"cannot read ({exc.strerror})")
                except tf.errors.OpError:
                    results.append("cannot decode: not an image TensorFlow can read")
    return results


def explain(config: ExplainConfig) -> list[Explanation]:
    """Writes a Grad-CAM overlay (picture | heat map) per image into ``config.out``; one Explanation each."""
    from finetune import rundir

    if (config.train_dir is None) == (config.model is None):
        raise FinetuneError("pass --train-dir (a training run) or --model (an exported .pb), one of them")
    if config.model:
        if config.checkpoint:
            raise FinetuneError("--checkpoint goes with --train-dir; an exported --model holds its own weights")
        check_explainable(config.model)
        if not Path(config.model).exists():
            raise FinetuneError(f"--model {config.model}: no such file; run `finetune export` first")
        cam = from_frozen(config.model)
        from finetune.modelfile import read_model

        image_size = read_model(config.model).image_size
    else:
        run = rundir.read_run_config(Path(config.train_dir))
        source = config.checkpoint or rundir.newest_checkpoint(Path(config.train_dir))
        if not source:
            raise FinetuneError(f"--train-dir {config.train_dir} holds no checkpoint yet; run `finetune train` first")
        image_size = run.image_size
        cam = from_checkpoint(source, list(run.classes), image_size)
    try:
        target = None
        if config.class_name is not None:
            if config.class_name not in cam.classes:
                raise FinetuneError(
                    f"--class {config.class_name}: not a class of this model; choose one of {', '.join(cam.classes)}"
                )
            target = cam.classes.index(config.class_name)
        from finetune.predict import find_images

        found = list(find_images(config.paths))
        prepared = _preprocess_files([path for path, problem in found if problem is None], image_size)
        out = Path(config.out)
        out.mkdir(parents=True, exist_ok=True)
        results, used_names = [], set()
        ready = iter(prepared)
        for path, problem in found:
            outcome = problem if problem is not None else next(ready)
            if isinstance(outcome, str):
                results.append(Explanation(str(path), None, None, None, None, None, outcome))
                continue
            targets = None if target is None else np.array([target])
            probabilities, heat = cam.run(outcome[None], targets)
            best = np.argsort(-probabilities[0])[: min(3, len(cam.classes))]
            explained = int(best[0]) if target is None else target
            name = f"{path.stem}.gradcam.jpg"
            count = 1
            while name in used_names:
                count += 1
                name = f"{path.stem}-{count}.gradcam.jpg"
            used_names.add(name)
            written = out / name
            with replacing(written) as temporary:
                side_by_side(outcome, heat[0], max(image_size, 224)).save(temporary, format="JPEG", quality=90)
            results.append(Explanation(
                str(path), cam.classes[best[0]], float(probabilities[0, best[0]]), cam.classes[explained],
                [(cam.classes[i], float(probabilities[0, i])) for i in best], str(written),
            ))  # fmt: skip
        return results
    finally:
        cam.close()
