"""The generated stand-ins: a learnable image folder and a checkpoint shaped like the published one."""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

from finetune import synthetic
from finetune.compat import tf


def _digest(folder):
    return {p.relative_to(folder.root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for paths in folder.files.values() for p in paths}


def test_image_folder_has_the_asked_classes_formats_and_sizes(tmp_path):
    folder = synthetic.make_image_folder(tmp_path / "photos", num_classes=3, images_per_class=12, seed=4)
    assert folder.classes == ("discs", "squares", "triangles")
    assert sorted(p.name for p in (tmp_path / "photos").iterdir()) == list(folder.classes)
    assert folder.count == 36
    formats, sizes = set(), set()
    for paths in folder.files.values():
        for path in paths:
            with Image.open(path) as image:
                formats.add(image.format)
                sizes.add(image.size)
                assert image.mode == "RGB"
                assert 96 <= min(image.size) and max(image.size) <= 320
    assert formats == {"JPEG", "PNG"}
    assert len(sizes) > 20  # varied sizes and aspect ratios


def test_image_folder_is_deterministic_per_seed(tmp_path):
    a = synthetic.make_image_folder(tmp_path / "a", num_classes=2, images_per_class=4, seed=9)
    b = synthetic.make_image_folder(tmp_path / "b", num_classes=2, images_per_class=4, seed=9)
    c = synthetic.make_image_folder(tmp_path / "c", num_classes=2, images_per_class=4, seed=10)
    assert _digest(a) == _digest(b) != _digest(c)


def test_classes_differ_in_colour_that_a_classifier_can_use(tmp_path):
    folder = synthetic.make_image_folder(tmp_path / "p", num_classes=4, images_per_class=10, seed=2)

    def mean_hue(path):
        with Image.open(path) as image:
            hsv = np.asarray(image.convert("HSV"), dtype=np.float64)
        saturated = hsv[..., 1] > 120
        return np.median(hsv[..., 0][saturated])

    hues = {name: np.median([mean_hue(p) for p in paths]) for name, paths in folder.files.items()}
    values = sorted(hues.values())
    assert min(np.diff(values)) > 10  # class hues are well apart on PIL's 0-255 hue circle


def test_class_names_stay_unique_past_the_shape_list():
    names = synthetic.class_names(20)
    assert len(set(names)) == 20 and names[8] == "discs_1"


def test_standin_checkpoint_matches_the_published_layout(standin_checkpoint):
    assert standin_checkpoint.suffix == ".ckpt" and standin_checkpoint.is_file()
    assert not standin_checkpoint.with_name(standin_checkpoint.name + ".index").exists()  # V1: one file
    reader = tf.compat.v1.train.NewCheckpointReader(str(standin_checkpoint))
    shapes = reader.get_variable_to_shape_map()
    assert len(shapes) == 388
    assert sum(int(np.prod(s)) for s in shapes.values()) == 27_182_194
    assert shapes["InceptionV3/Logits/Conv2d_1c_1x1/weights"] == [1, 1, 2048, 1001]
    assert shapes["InceptionV3/AuxLogits/Conv2d_2b_1x1/weights"] == [1, 1, 768, 1001]
    assert shapes["InceptionV3/AuxLogits/Conv2d_2a_5x5/weights"] == [5, 5, 128, 768]
    assert not any(name.endswith("gamma") for name in shapes)
    # Moving statistics are calibrated (not the fresh 0 and 1) and differ per channel, as in a trained net.
    for layer in ("Conv2d_1a_3x3", "Mixed_7c/Branch_0/Conv2d_0a_1x1"):
        mean = reader.get_tensor(f"InceptionV3/{layer}/BatchNorm/moving_mean")
        variance = reader.get_tensor(f"InceptionV3/{layer}/BatchNorm/moving_variance")
        assert variance.min() > 0 and np.abs(variance - 1).max() > 0.1 and variance.std() > 0
        assert np.abs(mean).max() > 0.01 and mean.std() > 0
