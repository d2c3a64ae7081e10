"""The training graph of a plan: input pipeline, towers, loss and update, on either path.

Two builders, one per path, each returning a TrainingGraph:

- ``build_network_graph``: images decoded from the TFRecords, one tower of the network per device,
  gradients averaged, batch-norm statistics from the first tower;
- ``finetune.cached.build_cached_graph``: the head alone, on features computed once.

``build_training_graph`` picks the one the plan calls for; ``start_fresh`` gives a new run its first values.
``finetune train`` uses these, and so can any script that wants exactly the graph the trainer runs.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from finetune import cluster as cluster_mod
from finetune import model, precision, schedule
from finetune.plan import Plan, schedule_of

if TYPE_CHECKING:
    import tensorflow as tf

    from finetune.cached import FeatureTables
    from finetune.cluster import Cluster

AUX_LOSS_WEIGHT = 0.4  # the aux head's share of the loss while it trains (the Inception-v3 paper's choice)
# The fresh head's classifier layers start at zero, so the first predictions are uniform and the first
# gradients reach only these layers (Big Transfer's choice); the aux head's inner layers keep slim's init.
ZERO_INIT_LAYERS = (f"{model.LOGITS_SCOPE}/Conv2d_1c_1x1", f"{model.AUX_SCOPE}/Conv2d_2b_1x1")


@dataclass(frozen=True)
class TrainingGraph:
    """What the training loop runs, and what a new or resumed run needs to set its variables."""

    graph: tf.Graph
    train_op: tf.Operation  # one step: the update, and batch-norm statistics where they train
    loss: tf.Tensor  # the step's mean loss, regularisation included
    accuracy: tf.Tensor  # the step's batch accuracy
    learning_rate: tf.Tensor  # the rate the step uses
    global_step: tf.Variable
    saver: tf.compat.v1.train.Saver  # every variable of the network, the optimizer's and the global step
    zero_head: list[tf.Operation]  # zero the new classifier layers (see ZERO_INIT_LAYERS)
    restore_variables: list[tf.Variable]  # what a new run takes from the starting checkpoint
    validate: Callable[[tf.compat.v1.Session], float] | None  # validation accuracy; None without the split
    random_ops: list[tuple[tf.Tensor, dict]]  # stateful random ops of a step, each with a feed that runs it alone
    initialize: Callable[[tf.compat.v1.Session], None] = lambda session: None  # after the variables: tables, input
    # Validation accuracy and mean cross-entropy (no smoothing, weights or decay): {"accuracy", "loss"}.
    validation_metrics: Callable[[tf.compat.v1.Session], dict[str, float]] | None = None
    labels: tf.Tensor | None = None  # the step's batch labels: what it trains on (--sampling decides them)
    # The validation split's logits and labels, with the weights validation judges (calibration fits on them).
    validation_logits: Callable[[tf.compat.v1.Session], tuple[np.ndarray, np.ndarray]] | None = None
    # --ema: set each moving average to its variable's value (a new run's start, after its first values).
    reset_averages: list = ()


def build_training_graph(plan: Plan, start_step: int, tables: FeatureTables | None = None,
                         cluster: Cluster | None = None) -> TrainingGraph:  # fmt: skip
    """The graph the plan trains with, its input positioned at ``start_step`` (0 for a new run).

    ``tables`` are the cached features (finetune.cached.cached_features) when the plan trains the head on
    them; otherwise the network's graph is built. ``cluster`` (finetune/cluster.py) makes it one worker's
    graph: its block of each global batch, gradients all-reduced, the chief's batch-norm statistics.
    """
    if plan.feature_cache:
        from finetune.cached import build_cached_graph

        if tables is None:
            raise ValueError("this plan trains on cached features: pass the tables cached_features returns")
        return build_cached_graph(plan, start_step, tables)
    return build_network_graph(plan, start_step, cluster)


def stateful_random_ops(operations) -> list:
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


def tower_loss(net: model.Network, labels, plan: Plan, trained_weights: list):
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


def build_network_graph(plan: Plan, start_step: int, cluster: Cluster | None = None) -> TrainingGraph:
    """The network's training graph: one tower per device on images read from the TFRecords."""
    from finetune.compat import tf
    from finetune.dataset import load_dataset

    info = load_dataset(plan.dataset)
    towers = len(plan.devices)
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.set_random_seed(plan.seed)
        global_step = tf.compat.v1.train.get_or_create_global_step()
        with tf.device("/cpu:0"):
            images, labels = _train_batches(info, plan, cluster, start_step)
        learning_rate = schedule.rate_tensor(plan.learning_rate, schedule_of(plan), global_step)
        compute = precision.Compute(plan.precision, plan.compute_dtype)
        optimizer = precision.loss_scale_optimizer(schedule.optimizer(plan.optimizer, learning_rate), compute)
        first_tower_op = len(graph.get_operations())
        tower_gradients, tower_losses, tower_logits = _towers(plan, images, labels, optimizer)
        random_ops = stateful_random_ops(graph.get_operations()[first_tower_op:])
        with tf.device("/cpu:0" if towers > 1 else plan.devices[0]):
            averaged = _average_gradients(tower_gradients)
            if cluster:
                averaged = cluster_mod.all_reduce_mean(cluster, averaged)
            apply = optimizer.apply_gradients(averaged, global_step=global_step)
        # Moving statistics from the first tower only, as with a single device.
        updates = tf.compat.v1.get_collection(model.BATCH_NORM_UPDATES, scope="tower_0" if towers > 1 else None)
        train_op = tf.group(apply, *updates, name="train_op")
        if cluster:  # the chief's statistics on every worker, as the first tower's are with towers
            train_op = cluster_mod.broadcast_from_chief(cluster, moving_statistics(plan), after=train_op)
        train_op, averages = with_moving_average(plan.ema, train_op, model.trainable_variables(plan.trainable_scopes))
        predictions = tf.argmax(tf.concat(tower_logits, 0), axis=1)
        all_labels = tf.concat(labels, 0)
        accuracy = tf.reduce_mean(tf.cast(tf.equal(predictions, all_labels), tf.float32))
        loss = tf.add_n(tower_losses) / float(towers)
        validation = _validation_pass(info, plan, averages) if plan.eval_every else None
        zero_head, reset_averages = zero_head_ops(plan), reset_ops(averages)
        saver = tf.compat.v1.train.Saver(max_to_keep=plan.keep_checkpoints, save_relative_paths=True)
        restore_variables = model.variables_to_restore(plan.exclude_scopes) if plan.checkpoint else []
    return TrainingGraph(
        graph=graph, train_op=train_op, loss=loss, accuracy=accuracy, learning_rate=learning_rate,
        global_step=global_step, saver=saver, zero_head=zero_head, restore_variables=restore_variables,
        validate=functools.partial(_validate, validation=validation) if validation else None,
        random_ops=random_ops,
        validation_metrics=functools.partial(validation_metrics, validation=validation) if validation else None,
        validation_logits=functools.partial(validation_logits, validation=validation) if validation else None,
        labels=all_labels, reset_averages=reset_averages,
    )  # fmt: skip


def _train_batches(info, plan: Plan, cluster: Cluster | None, start_step: int) -> tuple[list, list]:
    """The next training batch, positioned at ``start_step``, split into one block of images and labels per tower."""
    from finetune.compat import tf
    from finetune.dataset import read_dataset

    batches = cluster_mod.worker_batches(info, plan, cluster, start_step) if cluster else read_dataset(
        info, "train", batch_size=plan.batch_size, image_size=plan.image_size, training=True,
        augment=plan.augment, shuffle=True, repeat=True, seed=plan.seed, drop_remainder=True,
        skip=start_step * plan.batch_size, sampling=plan.sampling,
    )  # fmt: skip
    batch = tf.compat.v1.data.make_one_shot_iterator(batches).get_next()
    towers = len(plan.devices)
    return tf.split(batch["image"], towers), tf.split(batch["label"], towers)


def _towers(plan: Plan, images: list, labels: list, optimizer) -> tuple[list, list, list]:
    """One copy of the network per device, sharing variables: each tower's gradients, loss and logits."""
    from finetune.compat import tf

    towers = len(plan.devices)
    tower_gradients, tower_losses, tower_logits = [], [], []
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
            loss = tower_loss(net, labels[index], plan, weights)
            tower_gradients.append(optimizer.compute_gradients(loss, var_list=trainable))
            tower_losses.append(loss)
            tower_logits.append(net.logits)
    return tower_gradients, tower_losses, tower_logits


def _average_gradients(tower_gradients: list) -> list:
    """Each variable's gradient averaged over the towers (the one tower's as it is); variables without one dropped."""
    from finetune.compat import tf

    averaged = []
    for pairs in zip(*tower_gradients):
        gradients = [g for g, _ in pairs if g is not None]
        if gradients:
            mean = gradients[0] if len(tower_gradients) == 1 else tf.add_n(gradients) / float(len(gradients))
            averaged.append((mean, pairs[0][1]))
    return averaged


def _validation_pass(info, plan: Plan, averages) -> tuple:
    """The ops of one pass over the validation split: (iterator initializer, correct, count, summed loss,
    logits, labels).
    With --ema (``averages``) the pass runs on the moving averages, as evaluate and export will."""
    from finetune.compat import tf
    from finetune.dataset import read_dataset

    with tf.device("/cpu:0"):
        val_iterator = tf.compat.v1.data.make_initializable_iterator(
            read_dataset(info, "validation", batch_size=plan.batch_size, image_size=plan.image_size, training=False)
        )  # fmt: skip
        val_batch = val_iterator.get_next()
    with tf.device(plan.devices[0]), tf.name_scope("validation"), averaged_weights(averages):
        val_net = model.build(val_batch["image"], len(plan.classes), reuse=True, compute_dtype=plan.compute_dtype)
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(val_net.logits, 1), val_batch["label"]), tf.int64))
        loss_sum = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=val_batch["label"], logits=tf.cast(val_net.logits, tf.float32)))  # fmt: skip
    logits = tf.cast(val_net.logits, tf.float32)
    return val_iterator.initializer, correct, tf.size(val_batch["label"]), loss_sum, logits, val_batch["label"]


def moving_statistics(plan: Plan) -> list:
    """The batch-norm moving means and variances of the layers being trained (the ones a step updates)."""
    return [v for v in model.model_variables()
            if "/moving_" in v.op.name and model.in_scopes(v.op.name, plan.trainable_scopes)]  # fmt: skip


def start_fresh(session, built: TrainingGraph, checkpoint: model.Checkpoint | None) -> None:
    """A new run's first values: the checkpoint's where it has them, initialisers elsewhere, a zeroed head."""
    restored = built.restore_variables if checkpoint else []
    model.initialise_all_but(session, restored)
    if checkpoint:
        model.restore(session, restored, checkpoint)
    session.run(built.zero_head)
    session.run(list(built.reset_averages))


def with_moving_average(decay: float | None, train_op, variables: list):
    """``--ema DECAY``: the step followed by an update of each variable's exponential moving average,
    average = decay * average + (1 - decay) * value; returns (that op, the ExponentialMovingAverage) or, without
    a decay, (``train_op``, None). The averages are variables of their own (``<name>/ExponentialMovingAverage``),
    so every Saver made afterwards saves them beside the weights.
    """
    from finetune.compat import tf

    if not decay:
        return train_op, None
    averages = tf.compat.v1.train.ExponentialMovingAverage(decay)
    with tf.control_dependencies([train_op]):
        update = averages.apply(variables)  # the averages' variables are made outside the dependency
    return tf.group(update, name="train_op_and_average"), averages


def averaged_weights(averages):
    """A variable scope in which the network is built on the moving averages (validation passes), or a no-op."""
    from finetune.compat import tf

    if averages is None:
        return contextlib.nullcontext()

    def getter(next_getter, *args, **kwargs):
        variable = next_getter(*args, **kwargs)
        return averages.average(variable) or variable

    return tf.compat.v1.variable_scope(tf.compat.v1.get_variable_scope(), custom_getter=getter)


def reset_ops(averages) -> list:
    """Ops setting each average to its variable's value: a new run's averages start where its weights do."""
    if averages is None:
        return []
    from finetune.compat import tf

    return [tf.compat.v1.assign(averages.average(v), v) for v in tf.compat.v1.global_variables()
            if averages.average(v) is not None]  # fmt: skip


def zero_head_ops(plan: Plan) -> list:
    """Ops that zero the new classifier layers: those of ZERO_INIT_LAYERS the checkpoint does not restore.

    A layer restored from the checkpoint (a head trained by an earlier run) keeps its values.
    """
    from finetune.compat import tf

    return [
        v.assign(tf.zeros_like(v))
        for v in model.model_variables()
        if model.in_scopes(v.op.name, ZERO_INIT_LAYERS) and model.in_scopes(v.op.name, plan.exclude_scopes)
    ]


def session_config(plan: Plan):
    from finetune.runtime import session_config

    return session_config(cpu_devices=sum(1 for d in plan.devices if d.startswith("/cpu")))


def _validate(session, validation: tuple) -> float:
    return validation_metrics(session, validation)["accuracy"]


def validation_metrics(session, validation: tuple) -> dict[str, float]:
    """One pass over the validation split: accuracy and mean cross-entropy."""
    initializer, correct_op, count_op, loss_op, _, _ = validation
    correct = total = 0
    loss = 0.0
    for batch_correct, batch_count, batch_loss in _each_batch(session, initializer, [correct_op, count_op, loss_op]):
        correct += int(batch_correct)
        total += int(batch_count)
        loss += float(batch_loss)
    nan = float("nan")
    return {"accuracy": correct / total if total else nan, "loss": loss / total if total else nan}


def validation_logits(session, validation: tuple) -> tuple[np.ndarray, np.ndarray]:
    """One pass over the validation split: every image's logits [N, classes] and labels [N], in file order."""
    initializer, _, _, _, logits_op, labels_op = validation
    batches = list(_each_batch(session, initializer, [logits_op, labels_op]))
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def _each_batch(session, initializer, fetches: list):
    """Restarts the validation iterator and yields ``fetches`` for each of its batches until it runs out."""
    from finetune.compat import tf

    session.run(initializer)
    while True:
        try:
            values = session.run(fetches)
        except tf.errors.OutOfRangeError:
            return
        yield values
