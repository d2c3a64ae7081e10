"""`finetune quickstart`: every stage on generated photos, from nothing to a model that labels new files.

``quickstart`` reads top to bottom, one stage after another, each through the entry function its command
calls, with everything under one work folder:

1. download: the pretrained checkpoint into ``checkpoints/`` (nothing is fetched when a verified one is
   there). When it can be neither found nor fetched, one warning line says so and a calibrated random
   stand-in (``checkpoints/inception_v3_not_pretrained.ckpt``) takes its place: random weights, with batch-norm
   statistics that keep the features alive. Every result is then labelled "not pretrained".
2. photos: a generated flower-style folder, 5 classes, in ``datasets/quickstart-photos``, and two photos per
   class that no stage before predict sees, in ``datasets/quickstart-new-photos``.
3. build-dataset: ``datasets/quickstart``, 20% of each class held out for validation.
4. train: the new head, into ``runs/quickstart``.
5. evaluate: the validation split, ``runs/quickstart/eval-validation.json`` and its confusion matrix PNG.
6. export: ``runs/quickstart/model.pb`` with ``model.labels.txt`` and ``model.json``.
7. predict: the new photos, ``runs/quickstart/predictions.json``.

A rerun replaces what an earlier run wrote; a folder in those places that quickstart did not write is
refused, never overwritten.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from finetune.config import (
    BuildDatasetConfig,
    DownloadConfig,
    EvaluateConfig,
    ExportConfig,
    PredictConfig,
    QuickstartConfig,
    TrainConfig,
)
from finetune.errors import DownloadError, EmptySplitError, FinetuneError
from finetune.files import write_text_atomically

if TYPE_CHECKING:
    from finetune.dataset import BuildResult
    from finetune.synthetic import ImageFolder

log = logging.getLogger("finetune")

NUM_CLASSES = 5
NEW_PHOTOS_PER_CLASS = 2
VALIDATION_FRACTION = 0.2  # 12 of 60 photos per class: a validation accuracy that moves in steps of 1/60
PHOTOS_SEED, NEW_PHOTOS_SEED = 0, 1  # different seeds: the new photos are not copies of training ones
SPLIT_SEEDS = 10  # split seeds tried until every class has a validation photo (few photos per class)
# One quick try: offline, the answer comes at once (no name lookup, connection refused) or after this long;
# a healthy download never waits this long for data. `finetune download` retries patiently.
DOWNLOAD_TIMEOUT_SECONDS = 5.0
STANDIN_CHECKPOINT = "inception_v3_not_pretrained.ckpt"
MARKER = ".written-by-finetune-quickstart"  # hidden: build-dataset and predict skip it
STAGES = ("download", "photos", "build-dataset", "train", "evaluate", "export", "predict")

# The same pipeline on the user's own photos; printed at the end and shown in the README.
OWN_FOLDER_COMMANDS = (
    "finetune download",
    "finetune build-dataset PHOTOS --out datasets/mine",
    "finetune train --dataset datasets/mine --train-dir runs/mine",
    "finetune evaluate --train-dir runs/mine",
    "finetune export --train-dir runs/mine",
    "finetune predict --model runs/mine/model.pb NEW_PHOTOS",
)


@dataclass
class PhotoPrediction:
    """The model's answer for one new photo, beside the class it was drawn as."""

    path: str
    expected: str
    predicted: str
    probability: float


@dataclass
class QuickstartResult:
    """Where every artefact is and what the model scored; ``pretrained`` False labels every number."""

    workdir: str
    pretrained: bool
    not_pretrained_reason: str | None  # why the pretrained checkpoint was not used, when it was not
    checkpoint: str  # the weights training started from
    photos: str
    new_photos: str
    images: int
    classes: list[str]
    dataset: str
    split_counts: dict[str, int]
    train_dir: str
    train_checkpoint: str
    image_size: int
    steps: int
    train_accuracy: float | None
    validation_accuracy: float
    validation_examples: int
    eval_report: str
    confusion_png: str
    model: str
    labels: str
    sidecar: str
    predictions_file: str
    predictions: list[PhotoPrediction]
    seconds: float
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def correct_predictions(self) -> int:
        return sum(1 for p in self.predictions if p.predicted == p.expected)


@dataclass(frozen=True)
class _Layout:
    """The paths quickstart writes, all under the work folder."""

    workdir: Path
    checkpoints: Path
    photos: Path
    new_photos: Path
    dataset: Path
    train_dir: Path

    @classmethod
    def under(cls, workdir: Path) -> _Layout:
        datasets = workdir / "datasets"
        return cls(
            workdir=workdir,
            checkpoints=workdir / "checkpoints",
            photos=datasets / "quickstart-photos",
            new_photos=datasets / "quickstart-new-photos",
            dataset=datasets / "quickstart",
            train_dir=workdir / "runs" / "quickstart",
        )

    @property
    def predictions_file(self) -> Path:
        return self.train_dir / "predictions.json"


# ------------------------------------------------------------------------------------------------ helpers


class _Stages:
    """Announces each stage on stderr with a header line and times it."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str, what: str) -> Iterator[None]:
        log.info(f"[{STAGES.index(name) + 1}/{len(STAGES)}] {name}: {what}")
        started = time.monotonic()
        yield
        self.seconds[name] = round(time.monotonic() - started, 1)


def _refuse_foreign(folder: Path, mark: str, workdir: Path) -> None:
    """Refuses a non-empty folder without ``mark`` in it: someone else's files, which a rerun would replace."""
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not (folder / mark).exists())):
        raise FinetuneError(
            f"--workdir {workdir}: {folder} holds files that quickstart did not write, and a run would replace "
            "them; move them away or pass another --workdir"
        )


# ------------------------------------------------------------------------------------------------ stages


def _checkpoint(config: QuickstartConfig, layout: _Layout) -> tuple[Path, str | None]:
    """The pretrained checkpoint (verified, fetched if need be), or the random stand-in and why."""
    from finetune.download import download, is_web_address

    request = DownloadConfig(dest=str(layout.checkpoints), url=config.url, timeout=DOWNLOAD_TIMEOUT_SECONDS,
                             retries=0)  # fmt: skip
    try:
        return download(request).checkpoint, None
    except DownloadError as exc:
        if config.url and not is_web_address(config.url):
            raise  # a tarball the user named is a file that must be right, not a network to do without
        reason = exc.problem  # its fix names `finetune download`'s flags; quickstart's own follows
    log.warning(
        f"no pretrained checkpoint: {reason}; carrying on from random weights, so every result below is NOT "
        "PRETRAINED (`finetune download` fetches the checkpoint when this machine is online)"
    )
    return _standin_checkpoint(layout.checkpoints), reason


def _standin_checkpoint(folder: Path) -> Path:
    """The calibrated random checkpoint (written once, then reused): the real names and shapes, no training.

    Chosen over slim's fresh initialisation (``--checkpoint none``), whose batch-norm moving statistics (mean
    0, variance 1) fit no layer's real activations: in inference mode the frozen layers then wash the
    features out, and the head has little to learn from. The stand-in's statistics come from a pass over
    generated pictures, so its random features still tell the classes apart.
    """
    from finetune.synthetic import write_standin_checkpoint

    path = folder / STANDIN_CHECKPOINT
    if not path.is_file():
        write_standin_checkpoint(path, seed=0)
    return path


def _generate_photos(folder: Path, per_class: int, seed: int) -> ImageFolder:
    """Writes a fresh generated class folder, marked as quickstart's so that the next run may replace it."""
    from finetune.synthetic import make_image_folder

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / MARKER).write_text("written by `finetune quickstart`, which replaces this folder on every run\n")
    return make_image_folder(folder, NUM_CLASSES, per_class, seed=seed)


def _checked_layout(config: QuickstartConfig) -> _Layout:
    """The work folder's layout, after refusing a bad image size or a folder quickstart did not write."""
    from finetune import model
    from finetune.dataset import DATASET_JSON
    from finetune.rundir import CONFIG_FILE

    model.check_image_size(config.image_size)
    layout = _Layout.under(Path(config.workdir))
    for folder, mark in ((layout.photos, MARKER), (layout.new_photos, MARKER), (layout.dataset, DATASET_JSON),
                         (layout.train_dir, CONFIG_FILE)):  # fmt: skip
        _refuse_foreign(folder, mark, layout.workdir)
    return layout


def _train_head(config: QuickstartConfig, layout: _Layout, checkpoint: Path):
    """`finetune train` of the new head on the built dataset, from ``checkpoint``, into the train dir."""
    from finetune.train import train

    return train(TrainConfig(
        dataset=str(layout.dataset), train_dir=str(layout.train_dir), checkpoint=str(checkpoint),
        image_size=config.image_size, epochs=config.epochs, steps=config.steps, batch_size=config.batch_size,
        keep_checkpoints=1, overwrite=True,
    ))  # fmt: skip


def _build(config: QuickstartConfig, layout: _Layout) -> BuildResult:
    """Builds the dataset, trying split seeds until every class has a validation photo."""
    from finetune.dataset import build_dataset

    for seed in range(SPLIT_SEEDS):
        try:
            return build_dataset(BuildDatasetConfig(
                image_dir=str(layout.photos), out=str(layout.dataset), validation_fraction=VALIDATION_FRACTION,
                seed=seed, overwrite=True,
            ))  # fmt: skip
        except EmptySplitError as exc:
            log.debug(f"split seed {seed}: {exc}; trying seed {seed + 1}")
    raise FinetuneError(
        f"--images-per-class {config.images_per_class}: no split seed gave every class a validation photo; "
        "pass a larger number"
    )


def _write_predictions(path: Path, model: str, pretrained: bool, predictions: list[PhotoPrediction]) -> None:
    document = {"model": model, "pretrained": pretrained, "predictions": [asdict(p) for p in predictions]}
    write_text_atomically(path, json.dumps(document, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------- the run


def _length(config: QuickstartConfig) -> str:
    if config.steps:
        return f"{config.steps} steps"
    return f"{config.epochs:g} epochs" if config.epochs else "a schedule derived from the data"


def _predict_new_photos(layout: "_Layout", model_path: str) -> list[PhotoPrediction]:
    """The exported model's answer for each new photo, beside the class it was drawn as."""
    from finetune.predict import predict

    predictions = []
    for answer in predict(PredictConfig(paths=(str(layout.new_photos),), model=model_path)):
        if answer.error:  # generated files always decode; a failure here is a bug worth its traceback
            raise RuntimeError(f"{answer.path}: {answer.error}")
        name, probability = answer.top[0]
        predictions.append(PhotoPrediction(answer.path, Path(answer.path).parent.name, name, probability))
    return predictions


def quickstart(config: QuickstartConfig) -> QuickstartResult:
    """Runs download, build-dataset, train, evaluate, export and predict on generated photos.

    Raises:
        FinetuneError: a bad flag, a work folder holding files quickstart did not write, a --url tarball
            that does not verify, or any stage's own error.
        KeyboardInterrupt: training was stopped with Ctrl-C (its checkpoint is saved).
    """
    from finetune.evaluate import evaluate
    from finetune.export import export

    started = time.monotonic()
    layout = _checked_layout(config)
    stages = _Stages()

    with stages.stage("download", f"the pretrained InceptionV3 checkpoint into {layout.checkpoints}"):
        checkpoint, not_pretrained = _checkpoint(config, layout)
    pretrained = not_pretrained is None
    label = "" if pretrained else " (not pretrained)"
    count = NUM_CLASSES * config.images_per_class
    with stages.stage("photos", f"{count} generated flower-style photos of {NUM_CLASSES} classes in {layout.photos}"):
        photos = _generate_photos(layout.photos, config.images_per_class, PHOTOS_SEED)
        _generate_photos(layout.new_photos, NEW_PHOTOS_PER_CLASS, NEW_PHOTOS_SEED)

    with stages.stage("build-dataset", f"{layout.photos} -> {layout.dataset}"):
        built = _build(config, layout)

    start = "the pretrained checkpoint" if pretrained else "random weights, not pretrained"
    with stages.stage("train", f"the new head for {_length(config)} at {config.image_size} px from {start}"):
        trained = _train_head(config, layout, checkpoint)
    if trained.status == "interrupted":
        raise KeyboardInterrupt

    with stages.stage("evaluate", f"the validation split{label}"):
        evaluation = evaluate(EvaluateConfig(train_dir=str(layout.train_dir)))

    with stages.stage("export", f"{layout.train_dir} -> a frozen .pb"):
        exported = export(ExportConfig(train_dir=str(layout.train_dir)))

    with stages.stage("predict", f"the new photos in {layout.new_photos}{label}"):
        predictions = _predict_new_photos(layout, exported.model)
        _write_predictions(layout.predictions_file, exported.model, pretrained, predictions)

    return QuickstartResult(
        workdir=str(layout.workdir),
        pretrained=pretrained,
        not_pretrained_reason=not_pretrained,
        checkpoint=str(checkpoint),
        photos=str(layout.photos),
        new_photos=str(layout.new_photos),
        images=photos.count,
        classes=list(built.classes),
        dataset=str(layout.dataset),
        split_counts=dict(built.split_counts),
        train_dir=str(layout.train_dir),
        train_checkpoint=str(trained.checkpoint),
        image_size=config.image_size,
        steps=trained.global_step,
        train_accuracy=trained.train_accuracy,
        validation_accuracy=evaluation.top1,
        validation_examples=evaluation.examples,
        eval_report=str(evaluation.report),
        confusion_png=str(evaluation.confusion_png),
        model=exported.model,
        labels=exported.labels,
        sidecar=exported.sidecar,
        predictions_file=str(layout.predictions_file),
        predictions=predictions,
        seconds=round(time.monotonic() - started, 1),
        stage_seconds=stages.seconds,
    )
