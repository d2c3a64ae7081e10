"""`finetune preview`: a few training examples as the network will see them, each beside its original.

Each pair shows the stored image with the crop that slim's train transform sampled drawn on it in yellow, and
the result of the whole train transform (crop, resize, flip, colour distortion) rescaled from [-1, 1] to
pixels. It runs the same function as the training input pipeline (``preprocessing.random_train_transform``),
so what the picture shows is what training does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from finetune.config import PreviewConfig
from finetune.dataset import load_dataset, record_features
from finetune.errors import FinetuneError
from finetune.files import replacing

PAIRS_PER_ROW = 2
PADDING = 8  # pixels between cells
CAPTION_HEIGHT = 16
BACKGROUND = (40, 40, 40)
BOX_COLOUR = (255, 225, 0)  # yellow inside a black edge: visible on light and dark pictures
CAPTION_COLOUR = (230, 230, 230)


@dataclass(frozen=True)
class PreviewResult:
    """What preview_dataset drew."""

    out: Path
    count: int  # examples shown
    image_size: int
    paths: tuple[str, ...]  # the examples' source files, relative to IMAGE_DIR


def _image_format(out: Path) -> str:
    """Pillow's format name for the file's extension; refuses an extension Pillow cannot write."""
    from PIL import Image

    fmt = Image.registered_extensions().get(out.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise FinetuneError(f"--out {out}: cannot write a {out.suffix or 'extensionless'} file; use .png or .jpg")
    return fmt


def preview_dataset(config: PreviewConfig) -> PreviewResult:
    """Draws ``config.count`` training examples (picked with ``config.seed``) into one image at ``config.out``.

    Raises:
        DataError: the dataset is missing or has no train split.
        FinetuneError: --out has an extension Pillow cannot write.
    """
    out = Path(config.out)
    image_format = _image_format(out)
    info = load_dataset(config.dataset, flag="DATASET")
    files = [str(path) for path in info.files("train")]

    import numpy as np  # after the checks above: a mistake is reported without waiting for TensorFlow
    from PIL import Image, ImageDraw, ImageOps

    from finetune import preprocessing
    from finetune.compat import tf

    records = tf.data.TFRecordDataset(files).shuffle(min(info.split_counts["train"], 256), seed=config.seed)
    features = record_features()
    size = config.image_size
    cell = size + PADDING
    pairs = []
    for index, record in enumerate(records.take(config.count)):
        parsed = tf.io.parse_single_example(record, features)
        original = preprocessing.decode_image(parsed["image/encoded"])
        seed = tf.constant([config.seed, index], tf.int64)
        seen, box, flipped = preprocessing.random_train_transform(original, size, seed)
        pixels = np.clip((seen.numpy() + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
        label = int(parsed["image/class/label"])
        path = parsed["image/filename"].numpy().decode("utf-8")
        caption = f"{path} ({info.classes[label]}{', flipped' if bool(flipped) else ''})"
        pairs.append((Image.fromarray(original.numpy()), box.numpy(), Image.fromarray(pixels), caption, path))

    rows = math.ceil(len(pairs) / PAIRS_PER_ROW)
    columns = min(len(pairs), PAIRS_PER_ROW)
    canvas = Image.new(
        "RGB", (PADDING + columns * 2 * cell, PADDING + rows * (cell + CAPTION_HEIGHT)), BACKGROUND
    )
    draw = ImageDraw.Draw(canvas)
    for number, (original, box, seen, caption, _) in enumerate(pairs):
        left = PADDING + (number % PAIRS_PER_ROW) * 2 * cell
        top = PADDING + (number // PAIRS_PER_ROW) * (cell + CAPTION_HEIGHT)
        shown = ImageOps.contain(original, (size, size))  # small originals scaled up too
        x0, y0 = left + (size - shown.width) // 2, top + (size - shown.height) // 2
        canvas.paste(shown, (x0, y0))
        ymin, xmin, ymax, xmax = box
        corners = (x0 + xmin * shown.width, y0 + ymin * shown.height,
                   x0 + xmax * shown.width - 1, y0 + ymax * shown.height - 1)  # fmt: skip
        line = max(2, size // 100)
        draw.rectangle(corners, outline=(0, 0, 0), width=line + 2)
        draw.rectangle(tuple(c + d for c, d in zip(corners, (1, 1, -1, -1))), outline=BOX_COLOUR, width=line)
        canvas.paste(seen, (left + cell, top))
        while caption and draw.textlength(caption) > 2 * size:
            caption = caption[:-2] + "…"
        draw.text((left, top + size + 2), caption, fill=CAPTION_COLOUR)

    out.parent.mkdir(parents=True, exist_ok=True)
    with replacing(out) as partial:
        canvas.save(partial, format=image_format)
    return PreviewResult(out=out, count=len(pairs), image_size=size, paths=tuple(pair[4] for pair in pairs))
