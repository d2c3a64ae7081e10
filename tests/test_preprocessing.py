"""slim's inception train and eval transforms: shapes, ranges, the crop rules, determinism, graph mode."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from finetune import preprocessing
from finetune.compat import tf


def _encode(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def _photo(height: int = 90, width: int = 120, seed: int = 0) -> tf.Tensor:
    return tf.constant(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_decode_image_gives_three_channels_for_any_format():
    grey = Image.fromarray(np.full((20, 30), 77, np.uint8), "L")
    rgba = Image.new("RGBA", (30, 20), (10, 200, 30, 128))
    frames = [Image.new("RGB", (30, 20), colour) for colour in ((250, 0, 0), (0, 0, 250))]
    for data in (
        _encode(grey, "PNG"),
        _encode(grey, "JPEG"),
        _encode(rgba, "PNG"),
        _encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        _encode(frames[0], "BMP"),
    ):
        image = preprocessing.decode_image(tf.constant(data))
        assert image.dtype == tf.uint8 and image.shape == (20, 30, 3)
    first_frame = preprocessing.decode_image(tf.constant(_encode(frames[0], "GIF", save_all=True,
                                                                 append_images=frames[1:])))  # fmt: skip
    assert first_frame.numpy()[..., 0].mean() > 200


def test_eval_transform_scales_into_minus_one_to_one():
    for value, expected in ((0, -1.0), (255, 1.0), (51, 51 / 255 * 2 - 1)):
        image = tf.fill([50, 70, 3], tf.constant(value, tf.uint8))
        result = preprocessing.preprocess_for_eval(image, 75)
        assert result.shape == (75, 75, 3) and result.dtype == tf.float32
        np.testing.assert_allclose(result.numpy(), expected, atol=1e-6)


def test_eval_transform_keeps_the_central_seven_eighths():
    image = np.zeros((160, 160, 3), np.uint8)  # black frame 9 px wide: outside the central 87.5% (10 px)
    image[9:-9, 9:-9] = 255
    result = preprocessing.preprocess_for_eval(tf.constant(image), 80).numpy()
    assert result.min() == pytest.approx(1.0)
    whole = preprocessing.preprocess_for_eval(tf.constant(image), 80, central_fraction=1.0).numpy()
    assert whole.min() < 0  # with the whole image the frame shows


def test_train_without_augmentation_is_exactly_eval():
    image = _photo()
    np.testing.assert_array_equal(
        preprocessing.preprocess_for_train(image, 99, augment=False).numpy(),
        preprocessing.preprocess_for_eval(image, 99).numpy(),
    )


def test_train_transform_follows_slims_crop_rules_and_stays_in_range():
    image = _photo(120, 160)
    flips, areas = [], []
    for index in range(40):
        result, box, flipped = preprocessing.random_train_transform(image, 75, tf.constant([7, index]))
        values = result.numpy()
        assert values.shape == (75, 75, 3) and -1.0 <= values.min() and values.max() <= 1.0
        ymin, xmin, ymax, xmax = box.numpy()
        assert 0 <= ymin < ymax <= 1 and 0 <= xmin < xmax <= 1
        area = (ymax - ymin) * (xmax - xmin)
        aspect = (xmax - xmin) * 160 / ((ymax - ymin) * 120)
        whole_image = area == pytest.approx(1.0)  # the fallback when no sample fits
        assert whole_image or (area >= 0.1 - 0.02 and 0.75 - 0.05 <= aspect <= 1.33 + 0.05)
        flips.append(bool(flipped))
        areas.append(area)
    assert 5 < sum(flips) < 35  # mirrored about half the time
    assert min(areas) < 0.5 < max(areas)  # crops of many sizes


def test_train_transform_is_a_function_of_image_and_seed():
    image = _photo(seed=1)
    first = preprocessing.random_train_transform(image, 80, tf.constant([1, 2], tf.int64))
    again = preprocessing.random_train_transform(image, 80, tf.constant([1, 2], tf.int64))
    other = preprocessing.random_train_transform(image, 80, tf.constant([1, 3], tf.int64))
    np.testing.assert_array_equal(first[0].numpy(), again[0].numpy())
    np.testing.assert_array_equal(first[1].numpy(), again[1].numpy())
    assert not np.array_equal(first[0].numpy(), other[0].numpy())


def test_transforms_build_in_a_tf1_graph_as_export_needs():
    encoded = _encode(Image.fromarray(_photo(60, 80).numpy()), "JPEG")
    with tf.Graph().as_default() as graph:
        data = tf.compat.v1.placeholder(tf.string, [], name="jpeg")
        image = preprocessing.decode_image(data)
        evaluated = preprocessing.preprocess_for_eval(image, 75)
        trained = preprocessing.preprocess_for_train(image, 75, seed=3)
        assert {op.type for op in graph.get_operations()}.isdisjoint({"PyFunc", "EagerPyFunc"})
        with tf.compat.v1.Session() as session:
            first = session.run([evaluated, trained], {data: encoded})
            second = session.run([evaluated, trained], {data: encoded})
    assert first[0].shape == first[1].shape == (75, 75, 3)
    np.testing.assert_array_equal(first[0], second[0])  # eval is deterministic
    assert not np.array_equal(first[1], second[1])  # train draws a new crop each run
    assert -1.0 <= first[1].min() and first[1].max() <= 1.0
