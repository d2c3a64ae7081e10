"""Slim's InceptionV3 image transforms, for training and for evaluation, at any input size.

Written from slim's published parameters (see ../shared/FACTS.md, "Inception preprocessing"):

- eval: central crop of 87.5% of each side, bilinear resize to the network size, values into [-1, 1];
- train: a random crop from ``sample_distorted_bounding_box`` (the crop covers at least 10% of the image, its
  aspect ratio is 3:4 to 4:3, its area 5% to 100%), resize, random left-right flip, colour distortion
  (brightness, saturation, hue, contrast, in slim's order), clip, values into [-1, 1].

Everything here is plain TensorFlow ops on one image, with no Python-side randomness and no tf-slim, so the
same functions run inside ``tf.data`` pipelines, inside ``tf.compat.v1`` graphs, and inside a frozen graph
built by ``export``. Random choices use TensorFlow's *stateless* ops driven by a seed tensor: the same image
and seed always give the same result, however many parallel calls the input pipeline makes.

Resizing uses TF1's bilinear kernel (``half_pixel_centers=False``), as slim did when the ImageNet checkpoint
was trained, so fine-tuning sees the pixels the pretrained network saw.
"""

from __future__ import annotations

from finetune.compat import tf
from finetune.network import EVAL_CENTRAL_FRACTION

# slim's inception_preprocessing, as published.
MIN_OBJECT_COVERED = 0.1  # the crop keeps at least this share of the image
ASPECT_RATIO_RANGE = (0.75, 1.33)  # crop width / height
AREA_RANGE = (0.05, 1.0)  # crop area / image area
MAX_ATTEMPTS = 100  # after this many rejected samples the whole image is used
BRIGHTNESS_DELTA = 32.0 / 255.0
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 0.2
CONTRAST_RANGE = (0.5, 1.5)


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
    """Decodes JPEG, PNG, GIF (first frame) or BMP bytes to a uint8 [H, W, 3] image.

    Grayscale images are repeated to three channels and alpha is dropped, so every image fits the network.
    """
    image = tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def _check_size(image_size: int) -> None:
    if int(image_size) < 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")


def _resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Bilinear resize of a float [H, W, 3] image to [S, S, 3], with TF1's (slim's) pixel alignment."""
    batch = image[tf.newaxis]
    resized = tf.compat.v1.image.resize_bilinear(batch, [image_size, image_size], align_corners=False)
    return tf.reshape(resized, [image_size, image_size, 3])


def _to_signed(image: tf.Tensor) -> tf.Tensor:
    """[0, 1] -> [-1, 1], the range InceptionV3 was trained on."""
    return (image - 0.5) * 2.0


def preprocess_for_eval(
    image: tf.Tensor, image_size: int, *, central_fraction: float = EVAL_CENTRAL_FRACTION
) -> tf.Tensor:
    """slim's eval transform: uint8 [H, W, 3] -> float32 [S, S, 3] in [-1, 1].

    Crops the central ``central_fraction`` of each side (1.0 keeps the whole image), resizes bilinearly to
    ``image_size`` square and scales the values into [-1, 1]. Deterministic.
    """
    _check_size(image_size)
    if not 0.0 < central_fraction <= 1.0:
        raise ValueError(f"central_fraction must be in (0, 1], got {central_fraction}")
    image = tf.image.convert_image_dtype(image, tf.float32)
    if central_fraction < 1.0:
        image = tf.image.central_crop(image, central_fraction)
    return _to_signed(_resize(image, image_size))


def _distort_colour(image: tf.Tensor, seeds: tf.Tensor) -> tf.Tensor:
    """Random brightness, saturation, hue and contrast (slim's first ordering), then clip to [0, 1]."""
    image = tf.image.stateless_random_brightness(image, BRIGHTNESS_DELTA, seed=seeds[0])
    image = tf.image.stateless_random_saturation(image, *SATURATION_RANGE, seed=seeds[1])
    image = tf.image.stateless_random_hue(image, HUE_DELTA, seed=seeds[2])
    image = tf.image.stateless_random_contrast(image, *CONTRAST_RANGE, seed=seeds[3])
    return tf.clip_by_value(image, 0.0, 1.0)


def random_train_transform(
    image: tf.Tensor, image_size: int, seed: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """slim's train transform with augmentation, driven by a stateless seed.

    Args:
        image: uint8 [H, W, 3].
        image_size: side of the square output.
        seed: int32 or int64 [2]; the same image and seed always give the same output.

    Returns:
        ``(image, box, flipped)``: the float32 [S, S, 3] result in [-1, 1]; the sampled crop as
        ``[ymin, xmin, ymax, xmax]`` fractions of the input (``preview`` draws it); whether it was mirrored.
    """
    _check_size(image_size)
    seeds = tf.random.experimental.stateless_split(seed, num=6)
    image = tf.image.convert_image_dtype(image, tf.float32)
    whole_image = tf.constant([[[0.0, 0.0, 1.0, 1.0]]])
    begin, size, boxes = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=whole_image,
        seed=seeds[0],
        min_object_covered=MIN_OBJECT_COVERED,
        aspect_ratio_range=ASPECT_RATIO_RANGE,
        area_range=AREA_RANGE,
        max_attempts=MAX_ATTEMPTS,
        use_image_if_no_bounding_boxes=True,
    )
    crop = _resize(tf.slice(image, begin, size), image_size)
    flipped = tf.random.stateless_uniform([], seed=seeds[1]) < 0.5
    crop = tf.cond(flipped, lambda: tf.image.flip_left_right(crop), lambda: crop)
    crop = _distort_colour(crop, seeds[2:])
    return _to_signed(crop), tf.reshape(boxes, [4]), flipped


def preprocess_for_train(
    image: tf.Tensor, image_size: int, *, augment: bool = True, seed: int | None = None
) -> tf.Tensor:
    """slim's train transform: uint8 [H, W, 3] -> float32 [S, S, 3] in [-1, 1].

    With ``augment=False`` this is exactly :func:`preprocess_for_eval`, so a model trained without
    augmentation sees what evaluation will show it. With augmentation each call draws a fresh stateless seed
    from a random op seeded by ``seed`` (an op-level seed: a fixed sequence for a fixed graph). Input
    pipelines that want reproducible augmentation per example call :func:`random_train_transform` with
    their own seed instead, as ``finetune.dataset.read_dataset`` does.
    """
    if not augment:
        return preprocess_for_eval(image, image_size)
    stateless_seed = tf.random.uniform([2], maxval=tf.int64.max, dtype=tf.int64, seed=seed)
    return random_train_transform(image, image_size, stateless_seed)[0]
