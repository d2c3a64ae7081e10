"""Plan a training run: check every input and derive every number before TensorFlow does any work.

``plan_training`` turns a TrainConfig into a Plan: the dataset and its counts, the layers to train and to
restore, the devices, the schedule (finetune/schedule.py), whether the head trains on cached features and
whether its learning rate is searched. A user's mistake is reported here, before a graph is built. The Plan
is what config.json records (finetune/rundir.py writes it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from finetune import __version__, cluster, model, precision, schedule
from finetune.config import TrainConfig
from finetune.errors import FinetuneError
from finetune.features import default_cache_dir
from finetune.network import DEFAULT_LEARNING_RATES

# slim's L2 penalty on trained weights; the learning-rate search on cached features chooses among others.
DEFAULT_WEIGHT_DECAY = 0.00004
# Settings a resumed run must share with the run it continues: they shape the variables or the data.
RESUME_MUST_MATCH = (
    "dataset_fingerprint", "classes", "trainable_scopes", "image_size", "optimizer", "feature_cache",
)  # fmt: skip


@dataclass(frozen=True)
class Plan:
    """The resolved settings of a run; saved as config.json in the train dir."""

    dataset: str
    dataset_fingerprint: str
    classes: tuple[str, ...]
    split_counts: dict[str, int]
    train_class_counts: tuple[int, ...]
    checkpoint: str | None  # what the weights started from; None for random initialisation
    trainable_scopes: tuple[str, ...]
    exclude_scopes: tuple[str, ...]
    image_size: int
    batch_size: int
    steps_per_epoch: int
    total_steps: int
    optimizer: str
    learning_rate: float
    schedule: str  # the rate's shape over the run: cosine, step (slim's staircase) or constant
    decay_rate: float  # step only
    decay_steps: int  # step only
    warmup_steps: int
    weight_decay: float
    lr_search: str  # "on" when the cached head's rate and weight decay are searched, else "off (why)"
    label_smoothing: float
    dropout_keep: float
    augment: bool
    class_weights: tuple[float, ...] | None
    seed: int
    devices: tuple[str, ...]
    feature_cache: bool  # train the head on cached features (see finetune/features.py)
    feature_cache_reason: str  # why the cache is or is not used, for the summary
    augment_views: int
    cache_dir: str
    precision: str  # "fp32" or "bf16", as asked
    compute_dtype: str  # what the network computes in: float32, bfloat16 (or float16 on older GPUs)
    save_every: int
    save_minutes: float
    keep_checkpoints: int
    eval_every: int
    derived: tuple[str, ...] = ()  # which settings were derived from the data, and from what
    lr_search_result: dict | None = None  # what the search tried and chose (finetune/lr_search.py)
    finetune_version: str = __version__
    workers: int = 1  # processes training together (TF_CONFIG, finetune/cluster.py); batch_size is per worker
    select_by: str | None = None  # the validation metric that picks the best checkpoint; None without validation
    early_stop: int | None = None  # validation passes without improvement before the run stops; None: off
    sampling: str = "natural"  # "balanced": each class equally often per epoch (finetune/dataset.py)
    ema: float | None = None  # decay of the trained weights' moving average; None: off (finetune/graph.py)


def _feature_cache_decision(
    config: TrainConfig, trainable: tuple[str, ...], exclude: tuple[str, ...], pretrained: bool, augment: bool
) -> tuple[bool, str]:
    """Whether the head trains on cached features, and why (the start-up summary prints the reason)."""
    if config.feature_cache == "off":
        return False, "off (--feature-cache off)"
    problem = None
    if not (model.LOGITS_SCOPE in trainable and set(trainable) <= set(model.HEAD_SCOPES)):
        problem = "the trainable layers reach below the head, so the features change as it trains"
    elif not pretrained:
        problem = "--checkpoint none leaves the backbone random; there is nothing stable to cache"
    elif not all(model.in_scopes(scope, model.HEAD_SCOPES) for scope in exclude):
        problem = "--exclude leaves backbone layers freshly initialised"
    elif augment and not config.augment_views:
        problem = "augmentation is on; --augment-views K caches K augmented views of each image"
    if problem is None:
        views = f", {config.augment_views} augmented views per image" if config.augment_views else ""
        return True, f"on (only the head trains{views}; the aux head is left out on this path)"
    if config.feature_cache == "on":
        raise FinetuneError(f"--feature-cache on: {problem}; use --trainable logits without augmentation")
    return False, f"off ({problem})"


def _lr_search_decision(config: TrainConfig, use_cache: bool) -> str:
    """Whether the learning rate (and weight decay) are searched on the cached features, and if not why."""
    if config.lr_search == "off":
        return "off (--lr-search off)"
    problem = None
    if not use_cache:
        problem = "the head does not train on cached features, where trial runs are cheap"
    elif config.learning_rate is not None:
        problem = "--learning-rate is given"
    if problem is None:
        return "on"
    if config.lr_search == "on":
        raise FinetuneError(f"--lr-search on: {problem}; drop --lr-search on, or train the head alone on the cache")
    return f"off ({problem})"


def schedule_of(plan: Plan) -> schedule.Schedule:
    """The plan's schedule, as the graph builds its learning rate from it."""
    return schedule.Schedule(
        total_steps=plan.total_steps, steps_per_epoch=plan.steps_per_epoch, warmup_steps=plan.warmup_steps,
        shape=plan.schedule, decay_rate=plan.decay_rate, decay_steps=plan.decay_steps,
    )  # fmt: skip


def resolve_devices(spec: str) -> tuple[str, ...]:
    """Turns --device into TensorFlow device names: one tower per device.

    ``auto`` takes every GPU, or the CPU when there is none; ``gpu:N`` the first N GPUs; ``cpu:N`` N logical
    CPU devices, which exercises the multi-tower path on a machine without GPUs.
    """
    from finetune.compat import tf

    kind, _, count_text = spec.partition(":")
    if kind not in ("auto", "cpu", "gpu") or (count_text and (not count_text.isdigit() or int(count_text) < 1)):
        raise FinetuneError(f"--device {spec}: use auto, cpu, gpu, gpu:N or cpu:N with N at least 1")
    gpus = len(tf.config.list_physical_devices("GPU"))
    if kind == "auto":
        kind = "gpu" if gpus else "cpu"
    count = int(count_text) if count_text else (gpus if kind == "gpu" else 1)
    if kind == "gpu" and gpus < max(count, 1):
        raise FinetuneError(
            f"--device {spec}: TensorFlow sees {gpus} GPU(s); check the CUDA install with "
            "`python -c \"import tensorflow as tf; print(tf.config.list_physical_devices('GPU'))\"` "
            "or pass --device cpu"
        )
    return tuple(f"/{kind}:{index}" for index in range(count))


def _depth_preset(scopes: tuple[str, ...]) -> str:
    """The preset whose depth matches the deepest layer trained: picks default rates and augmentation."""
    blocks = [model.SCOPES.index(s) if s in model.SCOPES else 0 for s in scopes]  # the root counts as all
    deepest = model.BLOCKS[min(blocks)] if blocks else "Logits"
    if deepest in ("Logits", "AuxLogits"):
        return "logits"
    if deepest.startswith("Mixed_7"):
        return "mixed_7"
    if deepest.startswith("Mixed_6"):
        return "mixed_6"
    return "all"


def imbalance_warning(counts: tuple[int, ...], weighted: bool) -> str | None:
    """A warning when the largest class has over 3x the training examples of the smallest."""
    if not min(counts) or max(counts) <= 3 * min(counts):
        return None
    advice = "" if weighted else "; consider --class-weights auto"
    return (
        f"classes are imbalanced: the largest has {max(counts)} training examples, the smallest "
        f"{min(counts)}{advice}"
    )


def auto_class_weights(counts: list[int]) -> tuple[float, ...]:
    """Inverse class frequency, scaled so that the average example weighs 1."""
    total, present = sum(counts), sum(1 for c in counts if c)
    return tuple(total / (present * c) if c else 0.0 for c in counts)


def _cadence(config: TrainConfig, run: schedule.Schedule, use_cache: bool) -> tuple[int, int]:
    """Steps between validation passes and between checkpoints: an epoch, unless the flags say otherwise."""
    eval_every = config.eval_every if config.eval_every is not None else run.steps_per_epoch
    if use_cache and config.eval_every is None:
        # A cached pass over the data takes milliseconds: validating after each of hundreds would cost more
        # than training. Ten passes over the run show the curve.
        eval_every = max(run.steps_per_epoch, math.ceil(run.total_steps / 10))
    # A cached step takes milliseconds: saving every epoch would cost more than training, so the cached
    # path saves by time and at the end unless --save-every says otherwise.
    save_every = config.save_every or (run.total_steps if use_cache else run.steps_per_epoch)
    return eval_every, save_every


def _starting_weights(config: TrainConfig, num_classes: int) -> tuple[str | None, tuple[str, ...]]:
    """The checkpoint to start from (None for random weights) and the scopes not restored from it."""
    if config.checkpoint.lower() == "none":
        return None, ()
    checkpoint = model.open_checkpoint(config.checkpoint, flag="--checkpoint")
    if config.exclude is not None:
        return checkpoint.path, model.resolve_scopes(config.exclude, "--exclude")
    return checkpoint.path, tuple(model.default_exclusions(num_classes, checkpoint))


def plan_training(config: TrainConfig) -> Plan:
    """Checks the dataset, checkpoint, scopes and devices, and derives every number of the run.

    Everything a user can get wrong is reported here, before any graph is built.
    """
    info = _checked_dataset(config)
    train_count = info.split_counts["train"]
    model.check_image_size(config.image_size)
    trainable = _trainable_scopes(config)
    checkpoint_path, exclude = _starting_weights(config, len(info.classes))
    devices = _devices(config)
    compute = precision.resolve(config.precision, gpu=devices[0].startswith("/gpu"))
    depth = _depth_preset(trainable)
    augment = config.augment if config.augment is not None else (depth != "logits" or config.augment_views > 0)
    use_cache, cache_reason = _feature_cache_decision(config, trainable, tuple(exclude), checkpoint_path is not None, augment)
    # Several workers (TF_CONFIG) each take batch_size per step: steps come from the global batch. The
    # cached head trains on the chief alone.
    workers = 1 if use_cache else cluster.worker_count()
    run = _schedule(config, train_count, workers, use_cache)
    search = _lr_search_decision(config, use_cache)
    eval_every, save_every = _cadence(config, run, use_cache)
    learning_rate = config.learning_rate or DEFAULT_LEARNING_RATES[config.optimizer][depth]
    validates = bool(eval_every and info.split_counts.get("validation"))
    _check_selection(config, validates)
    derived = _derived_notes(config, run, learning_rate, depth, search)
    return Plan(
        dataset=str(Path(config.dataset).resolve()),
        dataset_fingerprint=info.fingerprint,
        classes=tuple(info.classes),
        split_counts=dict(info.split_counts),
        train_class_counts=tuple(info.class_counts["train"]),
        checkpoint=checkpoint_path and str(Path(checkpoint_path).resolve()),
        trainable_scopes=trainable,
        exclude_scopes=tuple(exclude),
        image_size=config.image_size,
        batch_size=config.batch_size,
        steps_per_epoch=run.steps_per_epoch,
        total_steps=run.total_steps,
        optimizer=config.optimizer,
        learning_rate=learning_rate,
        schedule=run.shape,
        decay_rate=run.decay_rate,
        decay_steps=run.decay_steps,
        warmup_steps=run.warmup_steps,
        weight_decay=config.weight_decay if config.weight_decay is not None else DEFAULT_WEIGHT_DECAY,
        lr_search=search,
        label_smoothing=config.label_smoothing,
        dropout_keep=config.dropout_keep,
        augment=augment,
        class_weights=auto_class_weights(info.class_counts["train"]) if config.class_weights == "auto" else None,
        seed=config.seed,
        devices=devices,
        feature_cache=use_cache,
        feature_cache_reason=cache_reason,
        augment_views=config.augment_views if use_cache else 0,
        cache_dir=str(Path(config.cache_dir).resolve()) if config.cache_dir else str(default_cache_dir()),
        precision=compute.precision,
        compute_dtype=compute.dtype,
        save_every=save_every,
        save_minutes=config.save_minutes,
        keep_checkpoints=config.keep_checkpoints,
        eval_every=eval_every if info.split_counts.get("validation") else 0,
        derived=tuple(derived),
        workers=workers,
        select_by=(config.select_by or "accuracy") if validates else None,
        early_stop=config.early_stop,
        sampling=config.sampling,
        ema=config.ema,
    )


def _checked_dataset(config: TrainConfig):
    """The dataset's description (dataset.json), refused when it has no training examples."""
    from finetune.dataset import load_dataset

    info = load_dataset(config.dataset, flag="--dataset")
    if info.split_counts.get("train", 0) == 0:
        raise FinetuneError(f"--dataset {config.dataset}: the train split is empty; rebuild the dataset")
    return info


def _trainable_scopes(config: TrainConfig) -> tuple[str, ...]:
    trainable = model.resolve_scopes(config.trainable, "--trainable")
    if not trainable:
        raise FinetuneError("--trainable names no layers; use a preset such as logits")
    return trainable


def _devices(config: TrainConfig) -> tuple[str, ...]:
    """The devices --device names, refused when --batch-size does not split evenly over them."""
    devices = resolve_devices(config.device)
    if config.batch_size % len(devices):
        raise FinetuneError(
            f"--batch-size {config.batch_size} does not split evenly over {len(devices)} devices; "
            f"use a multiple of {len(devices)}"
        )
    return devices


def _schedule(config: TrainConfig, train_count: int, workers: int, use_cache: bool) -> schedule.Schedule:
    return schedule.derive(
        train_count, config.batch_size * workers, "cached" if use_cache else "network", epochs=config.epochs,
        steps=config.steps, warmup_epochs=config.warmup_epochs, shape=config.schedule,
        decay_rate=config.decay_rate, decay_epochs=config.decay_epochs,
    )  # fmt: skip


def _derived_notes(config: TrainConfig, run: schedule.Schedule, learning_rate: float, depth: str,
                   search: str) -> list[str]:  # fmt: skip
    """The derived numbers train prints at start: the schedule's notes, and where the learning rate came from."""
    derived = list(run.notes)
    if config.learning_rate is None:
        source = "the search chooses from a grid around it" if search == "on" else f"{config.optimizer} on {depth}"
        derived.append(f"learning rate {learning_rate:g}: the default for {config.optimizer} on {depth} ({source})")
    return derived


def _check_selection(config: TrainConfig, validates: bool) -> None:
    """Refuses --early-stop and --select-by when the run has no validation passes to count or compare."""
    if validates:
        return
    why = ("--eval-every 0 turns validation passes off" if config.eval_every == 0 else
           f"{config.dataset} has no validation split; rebuild it with --validation-fraction above 0")  # fmt: skip
    for flag, value in (("--early-stop", config.early_stop), ("--select-by", config.select_by)):
        if value is not None:
            raise FinetuneError(f"{flag} {value}: needs validation passes, but {why}")
