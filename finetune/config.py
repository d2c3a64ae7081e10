"""One frozen dataclass per command: its options, their defaults and their help text, written once.

The CLI builds each subcommand's flags from these fields (``--some-name`` for ``some_name``, booleans as
``--x/--no-x``), and library code constructs the same dataclasses directly. Validation that needs no files
happens in ``__post_init__`` and raises a FinetuneError in one shape: ``--flag VALUE: problem`` (and the fix
where the problem does not make it plain).
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field
from typing import Any, NoReturn, Sequence

from finetune import network
from finetune.errors import FinetuneError
from finetune.pretrained import DEFAULT_MODEL, PRETRAINED


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    positional: bool = False,
    flag: str | None = None,
    choices: Sequence[str] | None = None,
    metavar: str | None = None,
) -> Any:
    """A config field with what the CLI needs to offer it as a flag.

    Args:
        default: the default (omit for a required option or a positional argument).
        help: one line for --help; the CLI appends the default.
        positional: offer it as a positional argument; a tuple-typed one takes one or more values.
        flag: the flag's name when ``--field-name`` will not do.
        choices: the values allowed.
        metavar: how --help writes the value.
    """
    metadata = {
        "help": help,
        "positional": positional,
        "flag": flag,
        "choices": tuple(choices) if choices else None,
        "metavar": metavar,
    }
    return field(default=default, metadata=metadata)


def _fail(flag: str, value: Any, problem: str) -> NoReturn:
    """Refuses a flag's value: ``--flag VALUE: problem``, the shape every config check uses."""
    raise FinetuneError(f"{flag} {value}: {problem}")


# fp32: float32 everywhere. bf16: the network computes in bfloat16 (float16 on GPUs without bfloat16) while
# variables, logits, softmax and loss stay float32; see finetune/precision.py.
PRECISIONS = ("fp32", "bf16")
# What `finetune export --format` writes (finetune/modelfile.py owns the files) and how a .tflite is quantized.
EXPORT_FORMATS = ("pb", "saved_model", "tflite", "onnx")
QUANTIZATIONS = ("none", "float16", "dynamic", "int8")
TTA_MODES = ("none", "flip", "crops")  # evaluate's test-time augmentation; export bakes in none or flip
_SIZE_RANGE = f"{network.MIN_IMAGE_SIZE} to {network.MAX_IMAGE_SIZE}"  # the input sizes slim's InceptionV3 takes


def check_precision(value: str | None, flag: str = "--precision") -> str | None:
    """Returns the precision; refuses an unknown one in one line (library callers bypass argparse's choices)."""
    if value is not None and value not in PRECISIONS:
        _fail(flag, value, f"unknown; choose one of {', '.join(PRECISIONS)}")
    return value


@dataclass(frozen=True)
class BuildDatasetConfig:
    """`finetune build-dataset`: a class-per-folder tree of images to sharded TFRecords."""

    image_dir: str = option(
        help="folder with one subfolder of images per class", positional=True, metavar="IMAGE_DIR"
    )
    out: str = option(help="dataset folder to write, e.g. datasets/flowers", metavar="DIR")
    # slim held out about 10% of flowers (350 of 3,670) for validation.
    validation_fraction: float = option(
        0.1, help="share of each class held out for validation", metavar="FRACTION"
    )
    test_fraction: float = option(
        0.0, help="share of each class held out for a final test", metavar="FRACTION"
    )
    # The split depends only on an image's bytes and this seed, so it survives adding images.
    seed: int = option(0, help="seed of the split; the same seed gives the same split")
    # None: one shard per ~100 MB of images, so a split reads in parallel without thousands of small files.
    shards: int | None = option(
        None, help="TFRecord files per split (default: one per ~100 MB of images)", metavar="N"
    )
    # None: images keep their size; decoding huge photos then dominates training input time.
    max_side: int | None = option(
        None, help="downsize images whose longer side exceeds this (default: off)", metavar="PIXELS"
    )
    # None: every core this process may use.
    workers: int | None = option(
        None, help="processes decoding and checking images (default: all cores)", metavar="N"
    )
    overwrite: bool = option(False, help="replace a dataset already at --out")
    # on: resized, re-encoded, slightly cropped, PNG or grey copies of a photo share its split (finetune/phash.py)
    near_duplicates: str = option(
        "on", help="keep near-duplicate images (perceptual hash) in one split", choices=("on", "off")
    )

    def __post_init__(self) -> None:
        fractions = {"--validation-fraction": self.validation_fraction, "--test-fraction": self.test_fraction}
        for flag, value in fractions.items():
            if not 0.0 <= value < 1.0:
                _fail(flag, value, "must be at least 0 and below 1")
        if self.validation_fraction + self.test_fraction >= 1.0:
            _fail(
                "--validation-fraction", self.validation_fraction,
                f"plus --test-fraction {self.test_fraction} must stay below 1 to leave images for training",
            )  # fmt: skip
        counts = (("--shards", self.shards), ("--max-side", self.max_side), ("--workers", self.workers))
        for flag, value in counts:
            if value is not None and value < 1:
                _fail(flag, value, "must be at least 1")


@dataclass(frozen=True)
class PreviewConfig:
    """`finetune preview`: training examples after train preprocessing, beside their originals."""

    dataset: str = option(
        help="dataset folder written by build-dataset", positional=True, metavar="DATASET"
    )
    out: str = option("preview.png", help="image file to write (.png or .jpg)", metavar="FILE")
    count: int = option(8, help="training examples to show", metavar="N")
    image_size: int = option(
        network.DEFAULT_IMAGE_SIZE, help="network input size the examples are preprocessed to", metavar="PIXELS"
    )
    seed: int = option(0, help="picks the examples and their random crops")

    def __post_init__(self) -> None:
        if not 1 <= self.count <= 64:
            _fail("--count", self.count, "must be between 1 and 64")
        if self.image_size < 32:
            _fail("--image-size", self.image_size, "must be at least 32 pixels")


_SHA256_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class DownloadConfig:
    """Options of `finetune download`: which pretrained checkpoint, from where, and into which folder."""

    dest: str = option("checkpoints", help="folder for the checkpoint and its manifest", metavar="DIR")
    # Not --model: in evaluate and predict that names an exported .pb; here it is a checkpoint's name.
    pretrained: str = option(DEFAULT_MODEL, help="which pretrained checkpoint", choices=tuple(PRETRAINED))
    url: str | None = option(
        None,
        help="fetch from this mirror URL instead of the published ones, or unpack this local tarball "
        "(one downloaded by hand)",
        metavar="URL|PATH",
    )
    sha256: str | None = option(
        None, help="the tarball's expected sha256; a download that differs is refused", metavar="HEX"
    )
    force: bool = option(False, help="download again even when a verified checkpoint is present")
    # 30 s is long for a healthy server and short enough that a dead connection is noticed.
    timeout: float = option(
        30.0, help="seconds to wait for a connection, or for more data, before a try fails", metavar="SECONDS"
    )
    # Four retries with backoff (1, 2, 4, 8 s) ride out a brief outage without hiding a real one.
    retries: int = option(
        4, help="tries after the first on connection errors, timeouts and HTTP 5xx", metavar="N"
    )

    def __post_init__(self) -> None:
        if self.pretrained not in PRETRAINED:
            _fail("--pretrained", self.pretrained, f"unknown; choose one of {', '.join(PRETRAINED)}")
        if self.sha256 is not None:
            digest = self.sha256.strip().lower()
            if len(digest) != 64 or not set(digest) <= _SHA256_HEX:
                _fail("--sha256", self.sha256,
                      "not a sha256 digest; give the 64 hex digits that `sha256sum FILE` prints")  # fmt: skip
            object.__setattr__(self, "sha256", digest)
        if not self.timeout > 0:
            _fail("--timeout", self.timeout, "must be more than 0 seconds")
        if self.retries < 0:
            _fail("--retries", self.retries, "must be 0 or more")


OPTIMIZERS = tuple(network.DEFAULT_LEARNING_RATES)  # the default rate of each is in finetune/network.py


@dataclass(frozen=True)
class TrainConfig:
    """`finetune train`: fine-tune the chosen layers on a built dataset."""

    dataset: str = option(help="dataset folder written by `finetune build-dataset`")
    train_dir: str = option(help="folder for checkpoints, config.json and TensorBoard events")
    checkpoint: str = option(
        "checkpoints/inception_v3.ckpt",
        help="weights to start from: a .ckpt file, an earlier train dir, or 'none' for random weights",
    )
    trainable: str = option(
        "logits", help=f"layers to train: a preset ({', '.join(network.PRESETS)}) or comma-separated scopes"
    )
    exclude: str | None = option(
        None, help="scopes not restored from --checkpoint (default: the head when the class count differs)"
    )
    # None: derived from the data and the path (finetune/schedule.py): a cached head trains to convergence
    # (100 passes, 2,000 to 20,000 steps), the whole network about 10 passes, fewer for large splits.
    epochs: float | None = option(None, help="passes over the training split (default: derived from the data)")
    steps: int | None = option(None, help="training steps; overrides --epochs")
    batch_size: int = option(32, help="images per step, split evenly across devices")
    optimizer: str = option("adam", help="update rule", choices=OPTIMIZERS)
    learning_rate: float | None = option(
        None, help="initial rate (default: searched on cached features, else by optimizer and depth, e.g. "
        f"{network.DEFAULT_LEARNING_RATES['adam']['logits']:g} for adam on logits)",
    )  # fmt: skip
    # None: cosine, unless a --decay-* flag asks for slim's staircase.
    schedule: str | None = option(
        None, help="learning rate over the run: cosine to zero, step (slim's staircase) or constant "
        "(default: cosine; step when a --decay-* flag is given)", choices=("cosine", "step", "constant"),
    )  # fmt: skip
    decay_rate: float | None = option(None, help="with --schedule step: multiplier per period (default: 0.94)")
    decay_epochs: float | None = option(None, help="with --schedule step: epochs per period (default: 2)")
    warmup_epochs: float | None = option(
        None, help="epochs of linear warm-up from zero (default: a twentieth of the run, at most 1,000 steps)"
    )
    # None: slim's 0.00004, or the search's choice when it runs.
    weight_decay: float | None = option(
        None, help="L2 penalty on the trained weights only (default: 0.00004, or searched with the rate)"
    )
    # auto: a cached head's rate and weight decay come from trial runs on a held-out part of the training
    # split (never the validation or test split), unless --learning-rate is given.
    lr_search: str = option(
        "auto", help="choose the learning rate and weight decay by short trial runs on held-out training "
        "images: auto searches when the head trains on cached features and no --learning-rate is given",
        choices=("auto", "on", "off"),
    )  # fmt: skip
    label_smoothing: float = option(0.0, help="share of each label spread over the other classes")
    dropout_keep: float = option(0.8, help="keep probability of the dropout before the logits")
    augment: bool | None = option(
        None, help="random crops, flips and colour changes (default: off for logits, on for deeper)"
    )
    class_weights: str = option(
        "none", help="'auto' weighs each class by its inverse frequency", choices=("none", "auto")
    )
    # natural: each training image once an epoch. balanced: each class equally often an epoch (rare classes'
    # images repeat, common ones' take turns), the other answer to imbalance than --class-weights auto.
    sampling: str = option(
        "natural", help="how training draws images: as the split holds them, or each class equally often per "
        "epoch (balanced)", choices=("natural", "balanced"),
    )  # fmt: skip
    feature_cache: str = option(
        "auto", help="train the head on cached features: auto uses them when only the head trains on "
        "unaugmented (or --augment-views) images", choices=("auto", "on", "off"),
    )  # fmt: skip
    augment_views: int = option(
        0, help="with the feature cache, cache this many augmented views of each training image (turns --augment on)"
    )
    cache_dir: str | None = option(None, help="feature cache folder (default: $XDG_CACHE_HOME/finetune/features)")
    image_size: int = option(network.DEFAULT_IMAGE_SIZE, help=f"square input size in pixels, {_SIZE_RANGE}")
    seed: int = option(0, help="seed for shuffling, augmentation and new weights")
    device: str = option(
        "auto", help="auto, cpu, gpu, gpu:N (N GPUs), or cpu:N (N CPU towers, to test the multi-device path)"
    )
    precision: str = option(
        "fp32", help="compute precision; bf16 keeps variables, logits and loss in float32", choices=PRECISIONS
    )
    save_every: int | None = option(None, help="steps between checkpoints (default: one epoch)")
    save_minutes: float = option(10.0, help="also save when this many minutes passed since the last save")
    keep_checkpoints: int = option(3, help="checkpoints kept in the train dir")
    eval_every: int | None = option(
        None, help="steps between validation passes (default: one epoch; 0 turns them off)"
    )
    overwrite: bool = option(False, help="start over in a train dir that holds another run")
    # A step's all-reduce waits for the slowest worker, so the bound must exceed the slowest step.
    worker_timeout: float = option(
        300.0, help="with TF_CONFIG (several workers): seconds to wait for a silent worker before stopping"
    )
    # None: accuracy, when there are validation passes; the best pass's checkpoint is kept in TRAIN_DIR/best/.
    select_by: str | None = option(
        None, help="validation metric that picks the best checkpoint, kept apart from rotation "
        "(default: accuracy)", choices=("accuracy", "loss"),
    )  # fmt: skip
    # None: off. A decay d averages over about the last 1 / (1 - d) steps; docs/best-model.md suggests one per
    # preset from the derived schedule's length (slim's 0.9999 suits runs of 100,000 steps and more).
    ema: float | None = option(
        None, help="keep an exponential moving average of the trained weights with this decay, e.g. 0.995; "
        "validation, evaluate and export use it (default: off)", metavar="DECAY",
    )  # fmt: skip
    # None: train to the end; Keras's and timm's patience is counted in validation passes, as here.
    early_stop: int | None = option(
        None, help="stop after this many validation passes without improvement (default: off)", metavar="N"
    )

    def __post_init__(self) -> None:
        checks = [  # (holds, flag, value, problem)
            (self.worker_timeout > 0, "--worker-timeout", self.worker_timeout, "must be positive"),
            (self.batch_size >= 1, "--batch-size", self.batch_size, "must be at least 1"),
            (self.epochs is None or self.epochs > 0, "--epochs", self.epochs, "must be positive"),
            (self.steps is None or self.steps >= 1, "--steps", self.steps, "must be at least 1"),
            (self.learning_rate is None or self.learning_rate > 0, "--learning-rate", self.learning_rate,
             "must be positive"),
            (self.decay_rate is None or 0 < self.decay_rate <= 1, "--decay-rate", self.decay_rate,
             "must be in (0, 1]"),
            (self.decay_epochs is None or self.decay_epochs > 0, "--decay-epochs", self.decay_epochs,
             "must be positive"),
            (self.warmup_epochs is None or self.warmup_epochs >= 0, "--warmup-epochs", self.warmup_epochs,
             "must be zero or more"),
            (self.weight_decay is None or self.weight_decay >= 0, "--weight-decay", self.weight_decay,
             "must be zero or more"),
            (self.schedule in (None, "step") or (self.decay_rate is None and self.decay_epochs is None),
             "--schedule", self.schedule, "is not slim's staircase, which --decay-rate and --decay-epochs shape; "
             "drop them or use --schedule step"),
            (0 <= self.label_smoothing < 1, "--label-smoothing", self.label_smoothing, "must be in [0, 1)"),
            (0 < self.dropout_keep <= 1, "--dropout-keep", self.dropout_keep, "must be in (0, 1]"),
            (self.keep_checkpoints >= 1, "--keep-checkpoints", self.keep_checkpoints, "must be at least 1"),
            (self.save_every is None or self.save_every >= 1, "--save-every", self.save_every, "must be at least 1"),
            (self.eval_every is None or self.eval_every >= 0, "--eval-every", self.eval_every,
             "must be zero or more"),
            (self.save_minutes > 0, "--save-minutes", self.save_minutes, "must be positive"),
            (self.early_stop is None or self.early_stop >= 1, "--early-stop", self.early_stop, "must be at least 1"),
            (self.ema is None or 0 < self.ema < 1, "--ema", self.ema,
             "must be in (0, 1), e.g. 0.995 (see docs/best-model.md)"),
            (self.sampling in ("natural", "balanced"), "--sampling", self.sampling,
             "unknown; choose natural or balanced"),
            (self.augment_views >= 0, "--augment-views", self.augment_views, "must be zero or more"),
            (not (self.augment_views and self.augment is False), "--augment-views", self.augment_views,
             "caches augmented views, which --no-augment turns off; drop --no-augment or the views"),
        ]  # fmt: skip
        for holds, flag, value, problem in checks:
            if not holds:
                _fail(flag, value, problem)
        check_precision(self.precision)


# How `finetune train --help` and docs/cli.md group TrainConfig's flags: title -> field names, in the order
# shown. Every field belongs to exactly one group (tests/test_cli.py checks); a name that is not (yet) a field
# is skipped, so a group can name a field before it lands.
TRAIN_OPTION_GROUPS: dict[str, tuple[str, ...]] = {
    "data and run dir": ("dataset", "train_dir", "overwrite"),
    "layers and weights": ("checkpoint", "trainable", "exclude", "image_size"),
    "schedule and optimizer": (
        "epochs", "steps", "batch_size", "optimizer", "learning_rate", "lr_search", "schedule", "decay_rate",
        "decay_epochs", "warmup_epochs",
    ),  # fmt: skip
    "regularisation and augmentation": (
        "weight_decay", "label_smoothing", "dropout_keep", "augment", "class_weights", "sampling", "seed",
    ),  # fmt: skip
    "feature cache": ("feature_cache", "augment_views", "cache_dir"),
    "devices and precision": ("device", "precision", "worker_timeout"),
    "checkpoints and validation": (
        "save_every", "save_minutes", "keep_checkpoints", "eval_every", "select_by", "early_stop", "ema",
    ),  # fmt: skip
}


@dataclass(frozen=True)
class EvaluateConfig:
    """`finetune evaluate`: measure a train dir's checkpoint or an exported .pb on a held-out split."""

    train_dir: str | None = option(None, help="a training run: evaluates its best checkpoint, or its newest")
    model: str | None = option(
        None, help="an exported model to evaluate instead of a train dir: .pb, SavedModel folder, .tflite or .onnx"
    )
    split: str = option("validation", help="which split", choices=("validation", "test", "train"))
    checkpoint: str | None = option(
        None, help="newest, best, or a checkpoint path (default: the best when the run kept one, else the newest)",
        metavar="newest|best|PATH",
    )  # fmt: skip
    dataset: str | None = option(None, help="dataset folder (default: the one the run or model was trained on)")
    batch_size: int = option(50, help="images per batch")
    # None: fp32 for a checkpoint; an exported .pb runs at the precision it was exported with.
    precision: str | None = option(
        None,
        help="compute precision of a checkpoint (default: fp32); a .pb runs at the one it was exported with",
        choices=PRECISIONS,
    )
    mistakes: int = option(10, help="how many of the most confident mistakes to list")
    watch: bool = option(False, help="evaluate each new checkpoint as training writes it")
    watch_minutes: float = option(30.0, help="with --watch, stop after this long without a new checkpoint")
    # The HTML report: one self-contained file beside the JSON (see finetune/report.py).
    html: bool = option(True, help="also write eval-<split>.html: mistakes as pictures with Grad-CAM, curves")
    correct_examples: int = option(
        2, help="correct examples per class shown in the HTML report, beside the mistakes", metavar="N"
    )
    # none: one pass. flip: each image and its mirror image (2x compute); crops: those two and the four corner
    # and the centre crops of 87.5% of the side, resized back (7x). The report gives top-1 without it too.
    tta: str = option(
        "none", help="test-time augmentation: average the probabilities over a horizontal flip, or over the "
        "flip and five crops", choices=TTA_MODES,
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            _fail("--batch-size", self.batch_size, "must be at least 1")
        if self.mistakes < 0:
            _fail("--mistakes", self.mistakes, "must be zero or more")
        if self.correct_examples < 0:
            _fail("--correct-examples", self.correct_examples, "must be zero or more")
        if self.tta not in TTA_MODES:
            _fail("--tta", self.tta, f"unknown; choose one of {', '.join(TTA_MODES)}")
        check_precision(self.precision)


@dataclass(frozen=True)
class ExportConfig:
    """`finetune export`: freeze a run's checkpoint into a .pb for inference."""

    train_dir: str = option(help="the training run to export")
    out: str | None = option(None, help="the .pb to write (default: TRAIN_DIR/model.pb); sidecars go beside it")
    checkpoint: str | None = option(
        None, help="newest, best, or a checkpoint path (default: the best when the run kept one, else the newest)",
        metavar="newest|best|PATH",
    )  # fmt: skip
    saved_model: str | None = option(None, help="also write a SavedModel (serving_default) into this new folder")
    # fp32 by default: a float32 .pb runs anywhere; a bf16 one is fast only on CPUs and GPUs with bfloat16.
    precision: str = option(
        "fp32", help="compute precision frozen into the .pb (recorded in its model.json)", choices=PRECISIONS
    )
    # The .pb alone by default: it needs nothing beyond TensorFlow. The others take --out's stem.
    format: tuple[str, ...] = option(
        ("pb",), help="files to write, one or more: .pb, SavedModel folder, LiteRT .tflite, .onnx",
        choices=EXPORT_FORMATS,
    )
    # none: float32 weights and compute, the same answers as the .pb; int8 is the smallest and fastest on CPUs.
    quantize: str = option(
        "none", help="TFLite quantization: float16 or dynamic-range weights, or full int8", choices=QUANTIZATIONS
    )
    dataset: str | None = option(
        None, help="dataset whose training split calibrates --quantize int8 (default: the run's)", metavar="DIR"
    )
    # A hundred images settle the int8 ranges of InceptionV3's activations; more costs export time, not size.
    calibration_images: int = option(
        100, help="training images --quantize int8 calibrates on (a seeded random sample)", metavar="N"
    )
    calibration_seed: int = option(0, help="seed of the calibration sample", metavar="N")
    # On: a user who thresholds "confidence > 0.9" gets probabilities that mean it; argmax is unchanged.
    calibrate: bool = option(
        True, help="fold the temperature fitted on the validation split into `probabilities` (see model.json)"
    )
    # none: one pass per image. flip: the graph runs each image and its mirror image and averages (2x compute).
    tta: str = option(
        "none", help="bake test-time augmentation into the .pb and SavedModel: the mean over each image and "
        "its horizontal flip (2x compute)", choices=TTA_MODES[:2],
    )  # fmt: skip

    def __post_init__(self) -> None:
        check_precision(self.precision)
        for name in self.format:
            if name not in EXPORT_FORMATS:
                _fail("--format", name, f"unknown; choose from {', '.join(EXPORT_FORMATS)}")
        if self.quantize not in QUANTIZATIONS:
            _fail("--quantize", self.quantize, f"unknown; choose one of {', '.join(QUANTIZATIONS)}")
        if self.quantize != "none" and "tflite" not in self.format:
            _fail("--quantize", self.quantize, "quantizes the .tflite; add --format tflite")
        if self.precision != "fp32" and {"tflite", "onnx"} & set(self.format):
            _fail("--precision", self.precision,
                  "the .tflite and .onnx are converted from the float32 graph; export them at --precision fp32 "
                  "(--quantize float16 makes a half-size .tflite)")  # fmt: skip
        if self.calibration_images < 1:
            _fail("--calibration-images", self.calibration_images, "must be at least 1")
        if self.tta not in TTA_MODES[:2]:
            _fail("--tta", self.tta, "unknown for export; choose none or flip (evaluate --tta crops measures more)")


@dataclass(frozen=True)
class PredictConfig:
    """`finetune predict`: label image files with an exported .pb."""

    paths: tuple[str, ...] = option(help="image files, or folders searched recursively", positional=True,
                                    metavar="IMAGE_OR_FOLDER")  # fmt: skip
    model: str = option(help="a model `finetune export` wrote: .pb, SavedModel folder, .tflite or .onnx "
                             "(model.json and model.labels.txt beside it)")
    top_k: int = option(5, help="classes listed per image")
    batch_size: int = option(32, help="images per batch")
    # The precision is frozen into the .pb at export; this only checks that it is the expected one.
    precision: str | None = option(
        None, help="refuse a .pb exported at another precision (default: run it at its own)", choices=PRECISIONS
    )

    def __post_init__(self) -> None:
        if self.top_k < 1:
            _fail("--top-k", self.top_k, "must be at least 1")
        if self.batch_size < 1:
            _fail("--batch-size", self.batch_size, "must be at least 1")
        check_precision(self.precision)


@dataclass(frozen=True)
class QuickstartConfig:
    """`finetune quickstart`: every stage, from nothing to a working model, on generated photos."""

    # The current folder by default, so the artefacts land where the walk-through's commands expect them:
    # ./checkpoints, ./datasets and ./runs.
    workdir: str = option(".", help="folder for checkpoints/, datasets/ and runs/", metavar="DIR")
    # 5 classes x 60 = 300 photos: enough for a validation split of about 60 and a result worth reading.
    images_per_class: int = option(60, help="generated photos per class (5 classes)", metavar="N")
    # The size the network was pretrained at; the whole quickstart takes about a minute on 2 cores.
    image_size: int = option(network.DEFAULT_IMAGE_SIZE, help=f"network input size, {_SIZE_RANGE}", metavar="PIXELS")
    # None: the schedule `finetune train` derives, with its learning-rate search: the plain command's result.
    epochs: float | None = option(None, help="passes over the training split (default: derived, as in train)")
    steps: int | None = option(None, help="training steps; overrides --epochs", metavar="N")
    batch_size: int = option(32, help="images per training step", metavar="N")
    url: str | None = option(
        None,
        help="fetch the pretrained checkpoint from this mirror, or unpack this tarball downloaded by hand "
        "(default: the published URLs)",
        metavar="URL|PATH",
    )

    def __post_init__(self) -> None:
        # 20 per class leaves each class a few images in the 20% validation split.
        if self.images_per_class < 20:
            _fail("--images-per-class", self.images_per_class, "must be at least 20")
        if self.epochs is not None and not self.epochs > 0:
            _fail("--epochs", self.epochs, "must be positive")
        if self.steps is not None and self.steps < 1:
            _fail("--steps", self.steps, "must be at least 1")
        if self.batch_size < 1:
            _fail("--batch-size", self.batch_size, "must be at least 1")


@dataclass(frozen=True)
class ExplainConfig:
    """`finetune explain`: Grad-CAM heat maps of where the network looked, for given images."""

    paths: tuple[str, ...] = option(help="image files, or folders searched recursively", positional=True,
                                    metavar="IMAGE_OR_FOLDER")  # fmt: skip
    model: str | None = option(None, help="an exported .pb (TFLite and ONNX files have no gradients to use)")
    train_dir: str | None = option(None, help="a training run instead of --model: its newest checkpoint")
    checkpoint: str | None = option(None, help="with --train-dir, a specific checkpoint (default: the newest)")
    out: str = option("explanations", help="folder for the overlays, one <image>.gradcam.jpg each", metavar="DIR")
    class_name: str | None = option(None, help="explain this class instead of the predicted one", flag="--class",
                                    metavar="NAME")  # fmt: skip


@dataclass(frozen=True)
class AuditConfig:
    """`finetune audit`: likely label errors and near-duplicates across classes in a built dataset."""

    dataset: str = option(help="dataset folder written by build-dataset", positional=True, metavar="DATASET")
    checkpoint: str = option(
        "checkpoints/inception_v3.ckpt",
        help="the backbone whose features judge the images: the pretrained checkpoint or a train dir",
    )
    # None: DATASET-audit beside the dataset (the dataset folder itself belongs to build-dataset).
    out: str | None = option(None, help="folder for audit.json and audit.html (default: DATASET-audit)", metavar="DIR")
    # 5 folds: each head trains on 80% of the images, and every image is judged once by a head that never saw it.
    folds: int = option(5, help="heads trained, each judging the images the others train on", metavar="K")
    top: int = option(50, help="likely label errors shown in audit.html (all are in audit.json)", metavar="N")
    image_size: int = option(network.DEFAULT_IMAGE_SIZE, help=f"network input size, {_SIZE_RANGE}", metavar="PIXELS")
    cache_dir: str | None = option(None, help="feature cache folder (default: $XDG_CACHE_HOME/finetune/features)")
    seed: int = option(0, help="seed of the folds and the heads")

    def __post_init__(self) -> None:
        if self.folds < 2:
            _fail("--folds", self.folds, "must be at least 2")
        if self.top < 0:
            _fail("--top", self.top, "must be zero or more")
        if not network.MIN_IMAGE_SIZE <= self.image_size <= network.MAX_IMAGE_SIZE:
            _fail("--image-size", self.image_size, f"must be {_SIZE_RANGE}")
