"""The head trained on cached features, in one place: fill the cache, choose the rate, build the graph.

When only the head trains on unaugmented images (or on cached augmented views), every feature it sees is
fixed, so finetune computes each once (finetune/features.py keeps them) and trains the head on them: a step
then costs a table lookup and a matrix product instead of a pass through the network. Here:

1. ``cached_features``: fill the cache for the plan (computing only what is missing) and lay out its tables;
2. ``with_searched_rate``: choose the learning rate and weight decay (finetune/lr_search.py);
3. ``build_cached_graph``: the head beside every network variable, so checkpoints are whole and
   evaluate, export and a resumed run treat them like any other.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from finetune import cluster as cluster_mod
from finetune import model, rundir, schedule
from finetune.graph import (TrainingGraph, reset_ops, session_config, stateful_random_ops, tower_loss,
                            with_moving_average, zero_head_ops)  # fmt: skip
from finetune.plan import Plan, schedule_of

log = logging.getLogger("finetune")


@dataclass
class FeatureTables:
    """Cached features laid out for training: the train split in file order, views along axis 1."""

    train: np.ndarray  # [examples, views, 2048]
    train_labels: np.ndarray  # [examples]
    train_paths: list[bytes]  # each row's relative path
    records_per_file: list[int]  # the train split's records per shard, in shard order
    validation: np.ndarray | None  # [examples, 2048]
    validation_labels: np.ndarray | None
    report: dict


def cached_features(plan: Plan, cluster=None) -> FeatureTables | None:
    """Fills the feature cache for this run (computing only what is missing) and reads its tables.

    With a ``cluster`` (finetune/cluster.py) each worker computes its share of the missing entries; the
    chief then waits for the others' and reads the tables, the others return None.
    """
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
    share = cluster_mod.ShareOfCache(cache, cluster) if cluster else cache
    report = features.extract(share, info, checkpoint, plan.image_size, examples, jobs, plan.seed,
                              plan.devices[0], session_config(plan), plan.compute_dtype)  # fmt: skip
    log.info(
        f"feature cache: {report.computed} computed, {report.reused} reused ({report.directory}"
        + (f"; {report.images_per_second:.1f} images/s)" if report.computed else ")")
    )

    if cluster:
        if not cluster.chief:
            return None
        keys = [features.entry_key(e.image_sha256, view, plan.seed) for split, view in jobs for e in examples[split]]
        backbone = features.backbone_digest(checkpoint.path)
        cache = cluster_mod.wait_for_cache(cluster, lambda: features.FeatureCache(
            Path(plan.cache_dir), backbone, plan.image_size, plan.compute_dtype), keys)  # fmt: skip

    def table(split: str, view: int | None) -> np.ndarray:
        return cache.get([features.entry_key(e.image_sha256, view, plan.seed) for e in examples[split]])

    validation = examples.get("validation")
    return FeatureTables(
        train=np.stack([table("train", view) for view in views], axis=1),
        train_labels=np.array([e.label for e in examples["train"]], np.int64),
        train_paths=[e.path for e in examples["train"]],
        records_per_file=np.bincount([e.shard for e in examples["train"]],
                                     minlength=len(info.files("train"))).tolist(),
        validation=table("validation", None) if validation else None,
        validation_labels=np.array([e.label for e in validation], np.int64) if validation else None,
        report=asdict(report),
    )


def with_searched_rate(plan: Plan, tables: FeatureTables, resumed_dir: Path | None) -> Plan:
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
        num_classes=len(plan.classes), schedule=schedule_of(plan), seed=plan.seed,
    )  # fmt: skip
    found = lr_search.search(tables.train, tables.train_labels, tables.train_paths, settings, session_config(plan))
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


def build_cached_graph(plan: Plan, start_step: int, tables: FeatureTables) -> TrainingGraph:
    """The head alone, trained on cached features, beside every network variable so checkpoints are whole.

    The batches come in the full path's order, with its seeds and its skip on resume (dataset.row_stream),
    as rows of the cached features: no record is read or decoded while the head trains.
    """
    from finetune.compat import tf
    from finetune.dataset import load_dataset

    info = load_dataset(plan.dataset)
    classes = len(plan.classes)
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.set_random_seed(plan.seed)
        global_step = tf.compat.v1.train.get_or_create_global_step()
        with tf.device("/cpu:0"):
            features, labels, iterator, feeds = _train_rows(info, plan, tables, start_step)
        with tf.device(plan.devices[0]):
            model.create_variables(classes)  # the network's variables alone: restored, saved, never run
            first_head_op = len(graph.get_operations())
            by_name = {v.op.name: v for v in model.model_variables()}
            weights = by_name[f"{model.LOGITS_SCOPE}/Conv2d_1c_1x1/weights"]
            biases = by_name[f"{model.LOGITS_SCOPE}/Conv2d_1c_1x1/biases"]

            def head(values, training: bool, weights=weights, biases=biases):
                if training and plan.dropout_keep < 1:
                    values = tf.nn.dropout(values, rate=1 - plan.dropout_keep)
                kernel = tf.reshape(weights, [model.FEATURE_SIZE, classes])  # slim's 1x1 conv, as a matmul
                return tf.matmul(values, kernel) + biases

            logits = head(features, training=True)
            loss = tower_loss(SimpleNamespace(logits=logits, aux_logits=None), labels, plan, [weights])
            learning_rate = schedule.rate_tensor(plan.learning_rate, schedule_of(plan), global_step)
            train_op = schedule.optimizer(plan.optimizer, learning_rate).minimize(
                loss, global_step=global_step, var_list=[weights, biases]
            )
            random_ops = stateful_random_ops(graph.get_operations()[first_head_op:])
            train_op, averages = with_moving_average(plan.ema, train_op, [weights, biases])
            # Validation passes judge the averaged weights (--ema), as evaluate and export will.
            averaged = (averages.average(weights), averages.average(biases)) if averages else (weights, biases)
        accuracy = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, 1), labels), tf.float32))
        validate = validation_metrics = validation_logits = None
        if tables.validation is not None:
            validate, validation_metrics, validation_logits, validation_feeds = _validation(tables, head, averaged)
            feeds.update(validation_feeds)

        def initialize(session) -> None:
            for initializer, feed in feeds.items():
                session.run(initializer, feed)
            session.run(iterator.initializer)

        zero_head, reset_averages = zero_head_ops(plan), reset_ops(averages)
        saver = tf.compat.v1.train.Saver(max_to_keep=plan.keep_checkpoints, save_relative_paths=True)
        restore_variables = model.variables_to_restore(plan.exclude_scopes)
    return TrainingGraph(
        graph=graph, train_op=train_op, loss=loss, accuracy=accuracy, learning_rate=learning_rate,
        global_step=global_step, saver=saver, zero_head=zero_head, restore_variables=restore_variables,
        validate=validate, random_ops=random_ops, initialize=initialize, validation_metrics=validation_metrics,
        validation_logits=validation_logits, labels=labels, reset_averages=reset_averages,
    )  # fmt: skip


def _train_rows(info, plan: Plan, tables: FeatureTables, start_step: int) -> tuple:
    """The next training batch as rows of the cached features: (features, labels, iterator, initializer feeds).

    Rows come in the order the records would (same seeds, same skip on resume), without reading them; the
    features table is a local variable filled from a placeholder when the session starts (the feeds).
    """
    from finetune.compat import tf
    from finetune.dataset import row_stream

    stream = row_stream(info, "train", tables.records_per_file, repeat=True, seed=plan.seed,
                        skip=start_step * plan.batch_size, sampling=plan.sampling,
                        labels=tables.train_labels)  # fmt: skip
    iterator = tf.compat.v1.data.make_initializable_iterator(
        stream.batch(plan.batch_size, drop_remainder=True).prefetch(8)
    )
    rows, pairs = iterator.get_next()
    labels = tf.gather(tf.constant(tables.train_labels), rows)
    train_values = tf.compat.v1.placeholder(tf.float32, tables.train.shape)
    local = [tf.compat.v1.GraphKeys.LOCAL_VARIABLES]  # not saved: the cache holds them
    train_table = tf.compat.v1.Variable(train_values, trainable=False, collections=local)
    # Each time an image is drawn, one of its cached views, chosen by the stream's seed for it.
    views = tables.train.shape[1]
    features = tf.gather(tf.gather(train_table, rows), tf.math.floormod(pairs[:, 0], views), batch_dims=1)
    return features, labels, iterator, {train_table.initializer: {train_values: tables.train}}


def _validation(tables: FeatureTables, head, averaged: tuple) -> tuple:
    """The head, with the weights validation judges (``averaged``: the moving averages with --ema, else the
    weights), on the whole validation table: (accuracy, accuracy-and-loss, logits-and-labels, the table's
    initializer feed)."""
    from finetune.compat import tf

    validation_values = tf.compat.v1.placeholder(tf.float32, tables.validation.shape)
    local = [tf.compat.v1.GraphKeys.LOCAL_VARIABLES]  # not saved: the cache holds them
    validation_table = tf.compat.v1.Variable(validation_values, trainable=False, collections=local)
    validation_logits = head(validation_table, False, *averaged)
    hits = tf.equal(tf.argmax(validation_logits, 1), tables.validation_labels)
    validation_accuracy = tf.reduce_mean(tf.cast(hits, tf.float64))
    validation_loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tables.validation_labels, logits=validation_logits))  # fmt: skip

    def validate(session) -> float:
        return float(session.run(validation_accuracy))

    def validation_metrics(session) -> dict[str, float]:
        accuracy, loss = session.run([validation_accuracy, validation_loss])
        return {"accuracy": float(accuracy), "loss": float(loss)}

    def logits_and_labels(session) -> tuple[np.ndarray, np.ndarray]:
        return session.run(validation_logits), np.asarray(tables.validation_labels)

    feeds = {validation_table.initializer: {validation_values: tables.validation}}
    return validate, validation_metrics, logits_and_labels, feeds
