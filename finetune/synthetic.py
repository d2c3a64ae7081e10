"""Generated stand-ins for the things this machine cannot download: photos and the pretrained checkpoint.

``make_image_folder`` writes a flower-style tree (one subfolder per class) of JPEG and PNG files whose classes
differ in shape, colour and texture, so a classifier has something real to learn. ``write_standin_checkpoint``
writes an InceptionV3 checkpoint with the real variable names and shapes (1001 classes, V1 single-file format,
like the published one) and random values. Quickstart, the benchmarks and the tests use both.
"""

from __future__ import annotations

import colorsys
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from finetune.files import replacing

SHAPES = ("discs", "squares", "triangles", "stars", "rings", "crosses", "diamonds", "hexagons")
TEXTURES = ("plain", "stripes", "dots")


@dataclass(frozen=True)
class ImageFolder:
    """What make_image_folder wrote."""

    root: Path
    classes: tuple[str, ...]
    files: dict[str, list[Path]] = field(default_factory=dict)  # class name -> files

    @property
    def count(self) -> int:
        return sum(len(paths) for paths in self.files.values())


def class_names(num_classes: int) -> tuple[str, ...]:
    """Readable, sorted-stable names: the shape, with a suffix once shapes repeat."""
    names = []
    for index in range(num_classes):
        shape = SHAPES[index % len(SHAPES)]
        names.append(shape if index < len(SHAPES) else f"{shape}_{index // len(SHAPES)}")
    return tuple(names)


def _polygon(shape: str, cx: float, cy: float, r: float, turn: float) -> list[tuple[float, float]]:
    def ring(count: int, radii: tuple[float, ...]) -> list[tuple[float, float]]:
        points = []
        for i in range(count * len(radii)):
            angle = turn + 2 * math.pi * i / (count * len(radii))
            radius = r * radii[i % len(radii)]
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points

    return {
        "squares": ring(4, (1.0,)),
        "triangles": ring(3, (1.0,)),
        "stars": ring(5, (1.0, 0.42)),
        "diamonds": [(cx, cy - r), (cx + 0.55 * r, cy), (cx, cy + r), (cx - 0.55 * r, cy)],
        "hexagons": ring(6, (1.0,)),
        "crosses": ring(4, (1.0, 0.3, 0.3)),
    }[shape]


def _draw_image(rng: np.random.Generator, index: int, width: int, height: int) -> Image.Image:
    shape = SHAPES[index % len(SHAPES)]
    texture = TEXTURES[index % len(TEXTURES)]
    hue = (index * 0.618034) % 1.0
    # Background: a soft two-colour gradient with noise, unrelated to the class.
    top, bottom = rng.uniform(0, 255, size=(2, 3))
    ramp = np.linspace(0, 1, height)[:, None, None]
    background = top * (1 - ramp) + bottom * ramp + rng.normal(0, 12, size=(height, width, 3))
    image = Image.fromarray(np.clip(background * 0.6 + 40, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    side = min(width, height)
    for _ in range(int(rng.integers(1, 4))):
        h = (hue + rng.normal(0, 0.03)) % 1.0
        r, g, b = colorsys.hsv_to_rgb(h, rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0))
        colour = (int(r * 255), int(g * 255), int(b * 255))
        radius = side * rng.uniform(0.15, 0.35)
        cx, cy = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        if shape == "discs":
            draw.ellipse(box, fill=colour)
        elif shape == "rings":
            draw.ellipse(box, outline=colour, width=max(2, int(radius * 0.3)))
        else:
            draw.polygon(_polygon(shape, cx, cy, radius, rng.uniform(0, 2 * math.pi)), fill=colour)
        dark = tuple(c // 3 for c in colour)
        if texture == "stripes":
            step = max(3, int(radius / 4))
            for x in range(int(box[0]), int(box[2]), step):
                draw.line([(x, box[1]), (x, box[3])], fill=dark, width=max(1, step // 3))
        elif texture == "dots":
            step = max(4, int(radius / 3))
            for x in range(int(box[0]), int(box[2]), step):
                for y in range(int(box[1]), int(box[3]), step):
                    draw.ellipse((x, y, x + step // 3, y + step // 3), fill=dark)
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.2)))


def make_image_folder(
    root: str | os.PathLike,
    num_classes: int = 5,
    images_per_class: int = 40,
    *,
    seed: int = 0,
    min_side: int = 96,
    max_side: int = 320,
    png_fraction: float = 0.25,
    jpeg_quality: int = 90,
) -> ImageFolder:
    """Writes ``root/<class>/<class>_NNNN.{jpg,png}``: varied sizes and aspect ratios, seeded.

    Args:
        root: folder to create (it may exist; files of the same name are replaced).
        num_classes: how many class folders; each class has its own shape, hue and texture.
        images_per_class: files per class.
        seed: the same seed writes the same bytes.
        min_side, max_side: bounds of each image's sides; aspect ratios vary between about 3:5 and 5:3.
        png_fraction: share of files written as PNG rather than JPEG.
        jpeg_quality: JPEG quality of the rest.
    """
    if num_classes < 1 or images_per_class < 1:
        raise ValueError("num_classes and images_per_class must be at least 1")
    rng = np.random.default_rng(seed)
    root = Path(root)
    names = class_names(num_classes)
    files: dict[str, list[Path]] = {}
    for index, name in enumerate(names):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        files[name] = []
        for number in range(images_per_class):
            width = int(rng.integers(min_side, max_side + 1))
            aspect = rng.uniform(0.6, 1.67)
            height = int(np.clip(round(width / aspect), min_side, max_side))
            image = _draw_image(rng, index, width, height)
            if rng.random() < png_fraction:
                path = folder / f"{name}_{number:04d}.png"
                image.save(path, format="PNG")
            else:
                path = folder / f"{name}_{number:04d}.jpg"
                image.save(path, format="JPEG", quality=jpeg_quality)
            files[name].append(path)
    return ImageFolder(root=root, classes=names, files=files)


def _calibration_images(count: int, size: int, seed: int) -> np.ndarray:
    """Generated pictures of every class shape, scaled into [-1, 1] as the network expects."""
    rng = np.random.default_rng(seed)
    pictures = [np.asarray(_draw_image(rng, index, size, size), np.float32) for index in range(count)]
    return np.stack(pictures) / 127.5 - 1.0


def write_standin_checkpoint(
    path: str | os.PathLike, *, num_classes: int = 1001, seed: int = 0, version: int = 1
) -> Path:
    """Writes an InceptionV3 checkpoint with slim's variable names and shapes and random weights.

    Weights come from slim's seeded initialisers, biases and batch-norm betas are drawn at random, and each
    batch norm's moving statistics are set to the statistics one pass over generated pictures produces, as
    in a trained network. Without that calibration random statistics wash the features out. Every value
    differs from a fresh initialisation, so a restore that silently kept fresh values would show.
    ``version=1`` writes the V1 single file, as inside the published tarball; ``version=2`` a V2 prefix.
    Either way no file under its final name is ever half written.
    """
    from finetune import model
    from finetune.compat import tf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    size = model.DEFAULT_IMAGE_SIZE
    with tf.Graph().as_default() as graph:
        tf.compat.v1.set_random_seed(seed)
        images = tf.constant(_calibration_images(16, size, seed))
        model.build(images, num_classes, train_scopes=model.PRESETS["all"])
        variables = model.model_variables()
        by_name = {v.op.name: v for v in variables}
        randomise = []
        for variable in variables:
            if variable.op.name.endswith(("beta", "biases")):
                value = rng.normal(0.0, 0.1, variable.shape.as_list()).astype(np.float32)
                randomise.append(variable.assign(value))
        # Each fused batch norm's second and third outputs are its batch mean and variance.
        calibrate = []
        for op in graph.get_operations():
            if op.type.startswith("FusedBatchNorm") and not op.type.endswith("Grad"):
                # Op names repeat the root ("InceptionV3/InceptionV3/...": slim reopens its variable scope
                # inside a name scope); the variable's name is the op's layer path from the second root on.
                layer = op.name.rsplit("/", 1)[0]
                layer = layer[layer.index(model.ROOT + "/", 1):] if layer.count(model.ROOT + "/") > 1 else layer
                calibrate.append(by_name[f"{layer}/moving_mean"].assign(op.outputs[1]))
                calibrate.append(by_name[f"{layer}/moving_variance"].assign(op.outputs[2]))
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            session.run(randomise)
            session.run(calibrate)
            saver = tf.compat.v1.train.Saver(
                variables, write_version=tf.compat.v1.train.SaverDef.V1 if version == 1 else 2
            )
            if version != 1:  # TensorFlow writes a V2 checkpoint's files under temporary names itself
                return Path(saver.save(session, str(path), write_meta_graph=False, write_state=False))
            # V1 is one file, written in place: through a temporary name, so a killed run leaves no part.
            with replacing(path) as temporary:
                saver.save(session, str(temporary), write_meta_graph=False, write_state=False)
    return path
