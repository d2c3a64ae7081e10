"""The network's vocabulary and limits, in one place that does not import TensorFlow.

Scope names and presets, the input sizes slim's InceptionV3 accepts, the eval crop, the default learning
rates by depth, and the image constants build-dataset and predict share. config.py's help text reads them
here, and model.py, preprocessing.py, dataset.py and predict.py use them, so every module states the same
numbers without loading TensorFlow to learn them.
"""

from __future__ import annotations

ROOT = "InceptionV3"
# Every variable-holding block of slim's InceptionV3, input to output (the two max pools hold none).
BLOCKS = (
    "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
    "Mixed_5b", "Mixed_5c", "Mixed_5d",
    "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
    "Mixed_7a", "Mixed_7b", "Mixed_7c",
    "AuxLogits", "Logits",
)  # fmt: skip
SCOPES = tuple(f"{ROOT}/{block}" for block in BLOCKS)
LOGITS_SCOPE = f"{ROOT}/Logits"
AUX_SCOPE = f"{ROOT}/AuxLogits"
HEAD_SCOPES = (LOGITS_SCOPE, AUX_SCOPE)
_MIXED_7 = tuple(f"{ROOT}/Mixed_7{c}" for c in "abc")
_MIXED_6 = tuple(f"{ROOT}/Mixed_6{c}" for c in "abcde")
# Named groups of scopes for --trainable, shallowest first.
PRESETS = {
    "logits": HEAD_SCOPES,
    "mixed_7": HEAD_SCOPES + _MIXED_7,
    "mixed_6": HEAD_SCOPES + _MIXED_7 + _MIXED_6,
    "all": (ROOT,),
}

# The ImageNet checkpoint's head: 1000 classes plus "background" at index 0.
CHECKPOINT_CLASSES = 1001
# The input size the ImageNet checkpoint was trained at.
DEFAULT_IMAGE_SIZE = 299
# Mixed_7a's 3x3 VALID conv needs Mixed_6 to be at least 3x3, hence 75. tf-slim 1.1.0's final pool is at most
# 8x8 (no global_pool option), so above 330 pixels the logits stop being 1x1 and cannot be squeezed.
MIN_IMAGE_SIZE = 75
MAX_IMAGE_SIZE = 330
FEATURE_SIZE = 2048  # values after the final average pool, which feed the Logits layer

# slim's eval preprocessing keeps the central 87.5% of each side before resizing; the exported graph too.
EVAL_CENTRAL_FRACTION = 0.875

# The EXIF tag that says how a photo is turned; build-dataset and predict both store/feed it upright.
EXIF_ORIENTATION = 0x0112
# Images re-encoded to JPEG (converted files, photos turned upright) are re-encoded once: close to lossless.
JPEG_QUALITY = 95

# Default learning rates by optimizer and by the depth of the layers trained (a preset name). Adam is the
# default: its steps do not depend on the scale of the features, so one rate suits a new head on any backbone
# (Keras's transfer-learning recipe: 1e-3 for the head, 1e-5 for the whole network). The RMSProp row is
# slim's flowers recipe (epsilon 1.0: 0.01 for the head, 0.0001 for everything); presets in between are
# interpolated.
DEFAULT_LEARNING_RATES = {
    "adam": {"logits": 0.001, "mixed_7": 0.0001, "mixed_6": 0.00005, "all": 0.00001},
    "rmsprop": {"logits": 0.01, "mixed_7": 0.001, "mixed_6": 0.0005, "all": 0.0001},
    "momentum": {"logits": 0.01, "mixed_7": 0.001, "mixed_6": 0.0005, "all": 0.0001},
    "sgd": {"logits": 0.1, "mixed_7": 0.01, "mixed_6": 0.005, "all": 0.001},
}
