"""Fine-tune InceptionV3 on a built dataset: restore the pretrained layers, train the chosen ones, checkpoint.

The story, top to bottom: ``plan_training`` checks every input and derives the numbers (steps, learning
rate, devices) before TensorFlow does any work; ``train`` builds one graph (input pipeline on the CPU, one
tower per device, averaged gradients), restores or resumes, and runs one loop that logs, validates, saves and
stops cleanly on Ctrl-C or a non-finite loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import resource
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np

from finetune import __version__, model, precision, rundir, schedule
from finetune.config import TrainConfig
from finetune.errors import FinetuneError
from finetune.features import default_cache_dir
from finetune.network import DEFAULT_LEARNING_RATES

log = logging.getLogger("finetune")

AUX_LOSS_WEIGHT = 0.4  # the aux head's share of the loss while it trains (the Inception-v3 paper's choice)
# slim's L2 penalty on trained weights; the learning-rate search on cached features chooses among others.
DEFAULT_WEIGHT_DECAY = 0.00004
# Settings a resumed run must share with the run it continues: they shape the variables or the data.
_RESUME_MUST_MATCH = (
    "dataset_fingerprint", "classes", "trainable_scopes", "image_size", "optimizer", "feature_cache",
)  # fmt: skip
# The fresh head's classifier layers start at zero, so the first predictions are uniform and the first
# gradients reach only these layers (Big Transfer's choice); the aux head's inner layers keep slim's init.
_ZERO_INIT_LAYERS = (f"{model.LOGITS_SCOPE}/Conv2d_1c_1x1", f"{model.AUX_SCOPE}/Conv2d_2b_1x1")


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


@dataclass
class TrainResult:
    """What a run did; the CLI prints it."""

    train_dir: str
    checkpoint: str | None  # the newest checkpoint written or found
    status: str  # "completed", "interrupted" or "already complete"
    start_step: int
    global_step: int
    total_steps: int
    first_loss: float | None  # mean loss over the first steps of this run
    final_loss: float | None  # mean loss over its last steps
    train_accuracy: float | None  # mean batch accuracy over the last epoch's steps (or fewer)
    validation_accuracy: float | None
    images_per_second: float | None
    seconds: float
    peak_memory_mb: float
    devices: tuple[str, ...]
    pretrained: bool
    feature_cache: dict | None = None  # on the cached path: entries computed and reused, extraction speed
    learning_rate: float | None = None  # the rate the run trained at (searched, given or the default)
    weight_decay: float | None = None
    lr_search: dict | None = None  # when the rate was searched: what was tried, chosen, and how long it took
    warnings: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ planning


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


def _schedule(plan: Plan) -> schedule.Schedule:
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


def _auto_class_weights(counts: list[int]) -> tuple[float, ...]:
    """Inverse class frequency, scaled so that the average example weighs 1."""
    total, present = sum(counts), sum(1 for c in counts if c)
    return tuple(total / (present * c) if c else 0.0 for c in counts)


def plan_training(config: TrainConfig) -> Plan:
    """Checks the dataset, checkpoint, scopes and devices, and derives every number of the run.

    Everything a user can get wrong is reported here, before any graph is built.
    """
    from finetune.dataset import load_dataset

    info = load_dataset(config.dataset, flag="--dataset")
    train_count = info.split_counts.get("train", 0)
    if train_count == 0:
        raise FinetuneError(f"--dataset {config.dataset}: the train split is empty; rebuild the dataset")
    model.check_image_size(config.image_size)
    trainable = model.resolve_scopes(config.trainable, "--trainable")
    if not trainable:
        raise FinetuneError("--trainable names no layers; use a preset such as logits")
    if config.checkpoint.lower() == "none":
        checkpoint_path, exclude = None, ()
    else:
        checkpoint = model.open_checkpoint(config.checkpoint, flag="--checkpoint")
        checkpoint_path = checkpoint.path
        exclude = (
            model.resolve_scopes(config.exclude, "--exclude")
            if config.exclude is not None
            else model.default_exclusions(len(info.classes), checkpoint)
        )
    devices = resolve_devices(config.device)
    if config.batch_size % len(devices):
        raise FinetuneError(
            f"--batch-size {config.batch_size} does not split evenly over {len(devices)} devices; "
            f"use a multiple of {len(devices)}"
        )
    compute = precision.resolve(config.precision, gpu=devices[0].startswith("/gpu"))
    depth = _depth_preset(trainable)
    validation_count = info.split_counts.get("validation", 0)
    augment = config.augment if config.augment is not None else (depth != "logits" or config.augment_views > 0)
    use_cache, cache_reason = _feature_cache_decision(config, trainable, tuple(exclude), checkpoint_path is not None, augment)
    run = schedule.derive(
        train_count, config.batch_size, "cached" if use_cache else "network", epochs=config.epochs,
        steps=config.steps, warmup_epochs=config.warmup_epochs, shape=config.schedule,
        decay_rate=config.decay_rate, decay_epochs=config.decay_epochs,
    )  # fmt: skip
    search = _lr_search_decision(config, use_cache)
    eval_every = config.eval_every if config.eval_every is not None else run.steps_per_epoch
    if use_cache and config.eval_every is None:
        # A cached pass over the data takes milliseconds: validating after each of hundreds would cost more
        # than training. Ten passes over the run show the curve.
        eval_every = max(run.steps_per_epoch, math.ceil(run.total_steps / 10))
    # A cached step takes microseconds: saving every epoch would cost more than training, so the cached
    # path saves by time and at the end unless --save-every says otherwise.
    save_every = config.save_every or (run.total_steps if use_cache else run.steps_per_epoch)
    learning_rate = config.learning_rate or DEFAULT_LEARNING_RATES[config.optimizer][depth]
    derived = list(run.notes)
    if config.learning_rate is None:
        source = "the search chooses from a grid around it" if search == "on" else f"{config.optimizer} on {depth}"
        derived.append(f"learning rate {learning_rate:g}: the default for {config.optimizer} on {depth} ({source})")
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
        class_weights=_auto_class_weights(info.class_counts["train"]) if config.class_weights == "auto" else None,
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
        eval_every=eval_every if validation_count else 0,
        derived=tuple(derived),
    )


# ---------------------------------------------------------------------------------------------- the graph


@dataclass
class _Graph:
    graph: object
    train_op: object
    loss: object
    accuracy: object
    learning_rate: object
    global_step: object
    saver: object
    zero_head: list
    restore_variables: list
    validate: Callable | None  # session -> validation accuracy, or None without a validation split
    random_ops: list  # stateful random ops the train step runs (dropout), with a feed of their shapes
    initialize: Callable = lambda session: None  # after variables are set: tables, cached features


def _stateful_random_ops(operations) -> list:
    """The training step's stateful random ops (dropout masks), each with a feed that runs it alone.

    A stateful random op's stream restarts with every session, so a resumed run would draw the masks of
    step 1 again. Running each op once per step already taken puts the stream where an uninterrupted run
    would have it; feeding its shape input (known statically) cuts off everything upstream of it.
    """
    found = []
    for op in operations:
        if not op.op_def.is_stateful or "Random" not in op.type or "Initializer" in op.name.split("/"):
            continue
        shape = op.outputs[0].shape
        if not shape.is_fully_defined():
            raise RuntimeError(f"random op {op.name} has no static shape; resume could not replay it")
        found.append((op.outputs[0], {op.inputs[0]: np.array(shape.as_list(), op.inputs[0].dtype.as_numpy_dtype)}))
    return found


def _placement(device: str, towers: int):
    """Ops of a tower on its device; with several towers, the shared variables on the CPU."""
    if towers == 1:
        return device
    variable_ops = {"Variable", "VariableV2", "VarHandleOp"}
    return lambda op: "/cpu:0" if op.type in variable_ops else device


def _tower_loss(net: model.Network, labels, plan: Plan, trained_weights: list):
    from finetune.compat import tf

    def cross_entropy(logits):
        return model.classification_loss(logits, labels, len(plan.classes), class_weights=plan.class_weights,
                                         label_smoothing=plan.label_smoothing)  # fmt: skip

    loss = cross_entropy(net.logits)
    if net.aux_logits is not None:
        loss += AUX_LOSS_WEIGHT * cross_entropy(net.aux_logits)
    if plan.weight_decay and trained_weights:
        loss += plan.weight_decay * tf.add_n([tf.nn.l2_loss(w) for w in trained_weights])
    return loss


def _build_graph(plan: Plan, start_step: int) -> _Graph:
    from finetune.compat import tf
    from finetune.dataset import load_dataset, read_dataset

    info = load_dataset(plan.dataset)
    towers = len(plan.devices)
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.set_random_seed(plan.seed)
        global_step = tf.compat.v1.train.get_or_create_global_step()
        with tf.device("/cpu:0"):
            batches = read_dataset(
                info, "train", batch_size=plan.batch_size, image_size=plan.image_size, training=True,
                augment=plan.augment, shuffle=True, repeat=True, seed=plan.seed, drop_remainder=True,
                skip=start_step * plan.batch_size,
            )  # fmt: skip
            batch = tf.compat.v1.data.make_one_shot_iterator(batches).get_next()
            images = tf.split(batch["image"], towers)
            labels = tf.split(batch["label"], towers)
        learning_rate = schedule.rate_tensor(plan.learning_rate, _schedule(plan), global_step)
        compute = precision.Compute(plan.precision, plan.compute_dtype)
        optimizer = precision.loss_scale_optimizer(schedule.optimizer(plan.optimizer, learning_rate), compute)
        tower_gradients, tower_losses, tower_logits = [], [], []
        first_tower_op = len(graph.get_operations())
        for index, device in enumerate(plan.devices):
            scope = tf.name_scope(f"tower_{index}") if towers > 1 else contextlib.nullcontext()
            with tf.compat.v1.device(_placement(device, towers)), scope:
                net = model.build(
                    images[index], len(plan.classes), train_scopes=plan.trainable_scopes,
                    dropout_keep_prob=plan.dropout_keep, reuse=True if index else None,
                    compute_dtype=plan.compute_dtype,
                )  # fmt: skip
                trainable = model.trainable_variables(plan.trainable_scopes)
                weights = [v for v in trainable if v.op.name.endswith("/weights")]
                loss = _tower_loss(net, labels[index], plan, weights)
                tower_gradients.append(optimizer.compute_gradients(loss, var_list=trainable))
                tower_losses.append(loss)
                tower_logits.append(net.logits)
        random_ops = _stateful_random_ops(graph.get_operations()[first_tower_op:])
        with tf.device("/cpu:0" if towers > 1 else plan.devices[0]):
            averaged = []
            for pairs in zip(*tower_gradients):
                gradients = [g for g, _ in pairs if g is not None]
                if gradients:
                    mean = gradients[0] if towers == 1 else tf.add_n(gradients) / float(len(gradients))
                    averaged.append((mean, pairs[0][1]))
            apply = optimizer.apply_gradients(averaged, global_step=global_step)
        # Moving statistics from the first tower only, as with a single device.
        updates = tf.compat.v1.get_collection(model.BATCH_NORM_UPDATES, scope="tower_0" if towers > 1 else None)
        train_op = tf.group(apply, *updates, name="train_op")
        all_labels = tf.concat(labels, 0)
        predictions = tf.argmax(tf.concat(tower_logits, 0), axis=1)
        accuracy = tf.reduce_mean(tf.cast(tf.equal(predictions, all_labels), tf.float32))
        loss = tf.add_n(tower_losses) / float(towers)

        validate = None
        if plan.eval_every:
            with tf.device("/cpu:0"):
                val_iterator = tf.compat.v1.data.make_initializable_iterator(
                    read_dataset(info, "validation", batch_size=plan.batch_size,
                                 image_size=plan.image_size, training=False)
                )  # fmt: skip
                val_batch = val_iterator.get_next()
            with tf.device(plan.devices[0]), tf.name_scope("validation"):
                val_net = model.build(val_batch["image"], len(plan.classes), reuse=True,
                                      compute_dtype=plan.compute_dtype)  # fmt: skip
                correct = tf.reduce_sum(
                    tf.cast(tf.equal(tf.argmax(val_net.logits, 1), val_batch["label"]), tf.int64)
                )
            validation = (val_iterator.initializer, correct, tf.size(val_batch["label"]))
            validate = functools.partial(_validate, validation=validation)

        zero_head = _zero_head(plan)
        saver = tf.compat.v1.train.Saver(max_to_keep=plan.keep_checkpoints, save_relative_paths=True)
        restore_variables = model.variables_to_restore(plan.exclude_scopes) if plan.checkpoint else []
    return _Graph(
        graph, train_op, loss, accuracy, learning_rate, global_step, saver, zero_head, restore_variables,
        validate, random_ops,
    )


@dataclass
class _FeatureTables:
    """Cached features laid out for training: the train split in file order, views along axis 1."""

    train: np.ndarray  # [examples, views, 2048]
    train_labels: np.ndarray  # [examples]
    train_paths: list[bytes]  # each row's relative path
    records_per_file: list[int]  # the train split's records per shard, in shard order
    validation: np.ndarray | None  # [examples, 2048]
    validation_labels: np.ndarray | None
    report: dict


def _cached_features(plan: Plan) -> _FeatureTables:
    """Fills the feature cache for this run (computing only what is missing) and reads its tables."""
    from finetune import features
    from finetune.dataset import load_dataset

    info = load_dataset(plan.dataset)
    checkpoint = model.open_checkpoint(plan.checkpoint)
    cache = features.FeatureCache(Path(plan.cache_dir), features.backbone_digest(checkpoint.path), plan.image_size,
                                  plan.compute_dtype)  # fmt: skip
    views = list(range(plan.augment_views)) or [None]
    splits = ["train"] + (["validation"] if plan.eval_every else [])
    examples = {split: features.scan_split(info, split) for split in splits}
    jobs = [("train", view) for view in views] + [(split, None) for split in splits[1:]]
    report = features.extract(cache, info, checkpoint, plan.image_size, examples, jobs, plan.seed,
                              plan.devices[0], _session_config(plan), plan.compute_dtype)  # fmt: skip
    log.info(
        f"feature cache: {report.computed} computed, {report.reused} reused ({report.directory}"
        + (f"; {report.images_per_second:.1f} images/s)" if report.computed else ")")
    )

    def table(split: str, view: int | None) -> np.ndarray:
        return cache.get([features.entry_key(e.image_sha256, view, plan.seed) for e in examples[split]])

    validation = examples.get("validation")
    return _FeatureTables(
        train=np.stack([table("train", view) for view in views], axis=1),
        train_labels=np.array([e.label for e in examples["train"]], np.int64),
        train_paths=[e.path for e in examples["train"]],
        records_per_file=np.bincount([e.shard for e in examples["train"]],
                                     minlength=len(info.files("train"))).tolist(),
        validation=table("validation", None) if validation else None,
        validation_labels=np.array([e.label for e in validation], np.int64) if validation else None,
        report=asdict(report),
    )


def _searched(plan: Plan, tables: _FeatureTables, resumed_dir: Path | None) -> Plan:
    """The plan with the searched learning rate and weight decay; a resumed run keeps what its start chose."""
    from finetune import lr_search

    if resumed_dir is not None:
        previous = rundir.read_run_config(resumed_dir).values
        if previous.get("lr_search_result"):
            log.info(f"learning rate {previous['learning_rate']:g}, weight decay {previous['weight_decay']:g}: "
                     "as the search chose when this run started")  # fmt: skip
            return dataclasses.replace(plan, learning_rate=previous["learning_rate"],
                                       weight_decay=previous["weight_decay"],
                                       lr_search_result=previous["lr_search_result"])  # fmt: skip
    if lr_search.fold_of_each(tables.train_paths, tables.train_labels, plan.seed).max() < 1:
        log.warning("learning-rate search skipped: no class has two training images to hold one out")
        return dataclasses.replace(plan, lr_search="off (no class has two training images)")
    settings = lr_search.SearchSettings(
        optimizer=plan.optimizer, base_rate=plan.learning_rate, batch_size=plan.batch_size,
        dropout_keep=plan.dropout_keep, label_smoothing=plan.label_smoothing, class_weights=plan.class_weights,
        num_classes=len(plan.classes), schedule=_schedule(plan), seed=plan.seed,
    )  # fmt: skip
    found = lr_search.search(tables.train, tables.train_labels, tables.train_paths, settings, _session_config(plan))
    extraction = tables.report["seconds"]
    log.info(
        f"learning-rate search: {len(found.candidates)} settings x {found.folds} folds x {found.trial_steps} "
        f"steps on {found.holdout_examples} held-out training images in {found.seconds:.1f} s (feature "
        f"extraction {extraction:.1f} s): learning rate {found.learning_rate:.3g}, weight decay {found.weight_decay:g}"
        + (f" (grid widened {found.widened})" if found.widened else "")
    )
    chosen = (f"learning rate {found.learning_rate:.3g}, weight decay {found.weight_decay:g}: searched "
              f"({len(found.candidates)} settings on {found.folds} folds of the training split)")  # fmt: skip
    derived = tuple(n for n in plan.derived if not n.startswith("learning rate")) + (chosen,)
    return dataclasses.replace(plan, learning_rate=found.learning_rate, weight_decay=found.weight_decay,
                               lr_search_result=json.loads(json.dumps(asdict(found))), derived=derived)  # fmt: skip


def start_fresh(session, built: _Graph, checkpoint: model.Checkpoint | None) -> None:
    """A new run's first values: the checkpoint's where it has them, initialisers elsewhere, a zeroed head.

    Public so that scripts/benchmark.py times its training graphs from the start `finetune train` makes.
    """
    restored = built.restore_variables if checkpoint else []
    model.initialise_all_but(session, restored)
    if checkpoint:
        model.restore(session, restored, checkpoint)
    session.run(built.zero_head)


def _zero_head(plan: Plan) -> list:
    """Ops that zero the new classifier layers: those of _ZERO_INIT_LAYERS the checkpoint does not restore.

    A layer restored from the checkpoint (a head trained by an earlier run) keeps its values.
    """
    from finetune.compat import tf

    return [
        v.assign(tf.zeros_like(v))
        for v in model.model_variables()
        if model.in_scopes(v.op.name, _ZERO_INIT_LAYERS) and model.in_scopes(v.op.name, plan.exclude_scopes)
    ]


def _build_cached_graph(plan: Plan, start_step: int, tables: _FeatureTables) -> _Graph:
    """The head alone, trained on cached features, beside every network variable so checkpoints are whole.

    The batches come in the full path's order, with its seeds and its skip on resume (dataset.row_stream),
    as rows of the cached features: no record is read or decoded while the head trains.
    """
    from finetune.compat import tf
    from finetune.dataset import load_dataset, row_stream

    info = load_dataset(plan.dataset)
    classes = len(plan.classes)
    views = tables.train.shape[1]
    local = [tf.compat.v1.GraphKeys.LOCAL_VARIABLES]  # not saved: the cache holds them
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.set_random_seed(plan.seed)
        global_step = tf.compat.v1.train.get_or_create_global_step()
        with tf.device("/cpu:0"):
            # Rows in the order the records would come (same seeds, same skip on resume), without reading them.
            stream = row_stream(info, "train", tables.records_per_file, repeat=True, seed=plan.seed,
                                skip=start_step * plan.batch_size)  # fmt: skip
            iterator = tf.compat.v1.data.make_initializable_iterator(
                stream.batch(plan.batch_size, drop_remainder=True).prefetch(8)
            )
            rows, pairs = iterator.get_next()
            labels = tf.gather(tf.constant(tables.train_labels), rows)
            train_values = tf.compat.v1.placeholder(tf.float32, tables.train.shape)
            train_table = tf.compat.v1.Variable(train_values, trainable=False, collections=local)
            # Each time an image is drawn, one of its cached views, chosen by the stream's seed for it.
            features = tf.gather(tf.gather(train_table, rows), tf.math.floormod(pairs[:, 0], views), batch_dims=1)
        with tf.device(plan.devices[0]):
            model.build(tf.compat.v1.placeholder(tf.float32, [1, plan.image_size, plan.image_size, 3]), classes)
            first_head_op = len(graph.get_operations())
            by_name = {v.op.name: v for v in model.model_variables()}
            weights = by_name[f"{model.LOGITS_SCOPE}/Conv2d_1c_1x1/weights"]
            biases = by_name[f"{model.LOGITS_SCOPE}/Conv2d_1c_1x1/biases"]
            kernel = tf.reshape(weights, [model.FEATURE_SIZE, classes])  # slim's 1x1 conv, as a matmul

            def head(values, training: bool):
                if training and plan.dropout_keep < 1:
                    values = tf.nn.dropout(values, rate=1 - plan.dropout_keep)
                return tf.matmul(values, kernel) + biases

            logits = head(features, training=True)
            loss = _tower_loss(SimpleNamespace(logits=logits, aux_logits=None), labels, plan, [weights])
            learning_rate = schedule.rate_tensor(plan.learning_rate, _schedule(plan), global_step)
            train_op = schedule.optimizer(plan.optimizer, learning_rate).minimize(
                loss, global_step=global_step, var_list=[weights, biases]
            )
            random_ops = _stateful_random_ops(graph.get_operations()[first_head_op:])
        accuracy = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, 1), labels), tf.float32))
        validate, feeds = None, {train_table.initializer: {train_values: tables.train}}
        if tables.validation is not None:
            validation_values = tf.compat.v1.placeholder(tf.float32, tables.validation.shape)
            validation_table = tf.compat.v1.Variable(validation_values, trainable=False, collections=local)
            hits = tf.equal(tf.argmax(head(validation_table, training=False), 1), tables.validation_labels)
            validation_accuracy = tf.reduce_mean(tf.cast(hits, tf.float64))
            feeds[validation_table.initializer] = {validation_values: tables.validation}
            validate = lambda session: float(session.run(validation_accuracy))  # noqa: E731

        def initialize(session) -> None:
            for initializer, feed in feeds.items():
                session.run(initializer, feed)
            session.run(iterator.initializer)

        zero_head = _zero_head(plan)
        saver = tf.compat.v1.train.Saver(max_to_keep=plan.keep_checkpoints, save_relative_paths=True)
        restore_variables = model.variables_to_restore(plan.exclude_scopes)
    return _Graph(graph, train_op, loss, accuracy, learning_rate, global_step, saver, zero_head,
                  restore_variables, validate, random_ops, initialize)  # fmt: skip


def _session_config(plan: Plan):
    from finetune.runtime import session_config

    return session_config(cpu_devices=sum(1 for d in plan.devices if d.startswith("/cpu")))


def _validate(session, validation: tuple) -> float:
    from finetune.compat import tf

    initializer, correct_op, count_op = validation
    session.run(initializer)
    correct = total = 0
    while True:
        try:
            batch_correct, batch_count = session.run([correct_op, count_op])
        except tf.errors.OutOfRangeError:
            break
        correct += int(batch_correct)
        total += int(batch_count)
    return correct / total if total else float("nan")


# ------------------------------------------------------------------------------------------------- the run


class _StopRequest:
    """Turns the first Ctrl-C (or SIGTERM) into a request to save and stop; a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stopping after this step and saving a checkpoint (press Ctrl-C again to abort at once)")

    def __enter__(self) -> "_StopRequest":
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _log_summary(plan: Plan, trainable_parameters: int, resume_from: str | None, warnings: list[str]) -> None:
    counts = ", ".join(f"{split} {count}" for split, count in plan.split_counts.items())
    log.info(f"classes: {len(plan.classes)} ({', '.join(plan.classes)})")
    log.info(f"examples: {counts}")
    log.info(
        f"trainable: {', '.join(plan.trainable_scopes)} ({trainable_parameters:,} parameters); "
        f"augment {'on' if plan.augment else 'off'}"
    )
    if resume_from:
        log.info(f"resuming from {resume_from}")
    elif plan.checkpoint:
        excluded = ", ".join(plan.exclude_scopes) or "nothing"
        log.info(f"starting from {plan.checkpoint}; not restored (initialised fresh): {excluded}")
    log.info(
        f"steps: {plan.steps_per_epoch} per epoch at batch {plan.batch_size}, {plan.total_steps} in all; "
        f"{plan.optimizer} at learning rate {plan.learning_rate:g}"
    )
    log.info(f"schedule: {plan.schedule}, warm-up {plan.warmup_steps} steps; learning-rate search {plan.lr_search}")
    for note in plan.derived:
        log.info(f"  {note}")
    log.info(f"devices: {', '.join(plan.devices)}")
    log.info(f"feature cache: {plan.feature_cache_reason}")
    for warning in warnings:
        log.warning(warning)


def _scalar_summary(writer, step: int, values: dict) -> None:
    from finetune.compat import tf

    summary = tf.compat.v1.Summary(
        value=[tf.compat.v1.Summary.Value(tag=tag, simple_value=float(v)) for tag, v in values.items()]
    )
    writer.add_summary(summary, step)


def train(config: TrainConfig) -> TrainResult:
    """Runs (or resumes) a fine-tuning run described by the config; see the module docstring."""
    from finetune.compat import tf

    started = time.monotonic()
    plan = plan_training(config)
    train_dir = Path(config.train_dir)
    resume_from = rundir.prepare(train_dir, asdict(plan), config.overwrite, must_match=_RESUME_MUST_MATCH)
    warnings = []
    if plan.devices == ("/cpu:0",) and config.device == "auto":
        log.info("no GPU found; training on the CPU")
    if plan.checkpoint is None and not resume_from:
        warnings.append("--checkpoint none: starting from random weights; results are not pretrained")
    imbalance = imbalance_warning(plan.train_class_counts, weighted=plan.class_weights is not None)
    if imbalance:
        warnings.append(imbalance)
    start_step = 0
    if resume_from:
        reader = tf.compat.v1.train.NewCheckpointReader(resume_from)
        start_step = int(reader.get_tensor(tf.compat.v1.GraphKeys.GLOBAL_STEP))
        if start_step >= plan.total_steps:
            log.info(f"{train_dir} is already trained to step {start_step}; raise --steps or --epochs to go on")
            return _result(plan, train_dir, resume_from, "already complete", start_step, start_step,
                           [], [], None, None, started, warnings)  # fmt: skip

    tables = _cached_features(plan) if plan.feature_cache else None
    if plan.lr_search == "on":
        plan = _searched(plan, tables, train_dir if resume_from else None)
    built = _build_cached_graph(plan, start_step, tables) if tables else _build_graph(plan, start_step)
    with built.graph.as_default():
        trainable_parameters = model.parameter_count(model.trainable_variables(plan.trainable_scopes))
        checkpoint = None
        if plan.checkpoint and not resume_from:
            checkpoint = model.open_checkpoint(plan.checkpoint)
            model.check_restorable(built.restore_variables, checkpoint)
    _log_summary(plan, trainable_parameters, resume_from, warnings)
    rundir.write_run_config(train_dir, asdict(plan))

    losses: list[float] = []
    accuracies: list[float] = []
    validation_accuracy = None
    last_checkpoint = resume_from
    with built.graph.as_default(), tf.compat.v1.Session(config=_session_config(plan)) as session:
        if resume_from:
            built.saver.restore(session, resume_from)
            for _ in range(start_step if built.random_ops else 0):
                for tensor, feed in built.random_ops:
                    session.run(tensor, feed)
        else:
            start_fresh(session, built, checkpoint)
        built.initialize(session)
        writer = tf.compat.v1.summary.FileWriter(str(train_dir), graph=None if resume_from else built.graph)
        step = start_step
        last_save_step, last_save_time = step, time.monotonic()
        status = "completed"

        def save() -> str:
            nonlocal last_save_step, last_save_time
            path = built.saver.save(session, rundir.checkpoint_prefix(train_dir), global_step=step)
            last_save_step, last_save_time = step, time.monotonic()
            return path

        from finetune.progress import Progress

        with _StopRequest() as stop, Progress(
            "train", plan.total_steps, unit="steps", start=step, rate_unit="images/s", rate_scale=plan.batch_size
        ) as progress:
            while step < plan.total_steps:
                if stop.requested:
                    status = "interrupted"
                    break
                # The learning rate fetched is the one this step used; the step count is kept here rather
                # than read back, since a fetch of global_step races with its own increment.
                _, loss, accuracy, rate = session.run(
                    [built.train_op, built.loss, built.accuracy, built.learning_rate]
                )
                step += 1
                if not math.isfinite(loss):
                    where = f"{last_checkpoint} (step {last_save_step})" if last_checkpoint else "none yet"
                    raise FinetuneError(
                        f"the loss became {loss} at step {step}; stopped without saving (last good checkpoint: "
                        f"{where}); lower --learning-rate (it was {plan.learning_rate:g}), e.g. to "
                        f"{plan.learning_rate / 10:g}"
                    )
                losses.append(float(loss))
                accuracies.append(float(accuracy))
                progress.advance(1, loss=float(loss), accuracy=float(accuracy), lr=float(rate))
                if step % 10 == 0 or step == plan.total_steps:
                    _scalar_summary(writer, step, {"loss": loss, "accuracy": accuracy, "learning_rate": rate})
                if plan.eval_every and (step % plan.eval_every == 0 or step == plan.total_steps):
                    validation_accuracy = built.validate(session)
                    _scalar_summary(writer, step, {"validation_accuracy": validation_accuracy})
                    log.info(f"step {step}: validation accuracy {validation_accuracy:.4f}")
                minutes = (time.monotonic() - last_save_time) / 60
                if step % plan.save_every == 0 or minutes >= plan.save_minutes:
                    last_checkpoint = save()
        if step != last_save_step or last_checkpoint is None:
            last_checkpoint = save()
        writer.close()
    result = _result(plan, train_dir, last_checkpoint, status, start_step, step, losses, accuracies,
                     validation_accuracy, progress.rate if losses else None, started, warnings)  # fmt: skip
    result.feature_cache = tables.report if tables else None
    return result


def _result(plan, train_dir, checkpoint, status, start_step, step, losses, accuracies, validation_accuracy,
            images_per_second, started, warnings) -> TrainResult:  # fmt: skip
    window = max(1, min(len(losses) // 4, 20))
    recent = max(1, min(len(accuracies), plan.steps_per_epoch))
    return TrainResult(
        train_dir=str(train_dir),
        checkpoint=checkpoint,
        status=status,
        start_step=start_step,
        global_step=step,
        total_steps=plan.total_steps,
        first_loss=float(np.mean(losses[:window])) if losses else None,
        final_loss=float(np.mean(losses[-window:])) if losses else None,
        train_accuracy=float(np.mean(accuracies[-recent:])) if accuracies else None,
        validation_accuracy=validation_accuracy,
        images_per_second=images_per_second,
        seconds=time.monotonic() - started,
        peak_memory_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        devices=plan.devices,
        pretrained=plan.checkpoint is not None,
        learning_rate=plan.learning_rate,
        weight_decay=plan.weight_decay,
        lr_search=plan.lr_search_result,
        warnings=warnings,
    )
