"""Fine-tune InceptionV3 on a built dataset: restore the pretrained layers, train the chosen ones, checkpoint.

The story, top to bottom: ``plan_training`` (finetune/plan.py) checks every input and derives the numbers
(steps, schedule, devices) before TensorFlow does any work; ``train`` prepares the train dir, fills the
feature cache and searches the rate when the head trains on cached features (finetune/cached.py), builds
the graph the plan calls for (finetune/graph.py), restores or resumes, and runs one loop that logs,
validates, saves and stops cleanly on Ctrl-C or a non-finite loss.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import resource
import signal
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from finetune import cluster as cluster_mod
from finetune import model, rundir
from finetune.config import TrainConfig
from finetune.errors import FinetuneError, translates_tf_errors
from finetune.cached import cached_features, with_searched_rate
from finetune.graph import TrainingGraph, build_training_graph, session_config, start_fresh
from finetune.plan import RESUME_MUST_MATCH, Plan, imbalance_warning, plan_training

log = logging.getLogger("finetune")


@dataclass
class TrainResult:
    """What a run did; the CLI prints it."""

    train_dir: str
    checkpoint: str | None  # the newest checkpoint written or found
    status: str  # "completed", "stopped early", "interrupted" or "already complete"
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
    best_step: int | None = None  # the best validation pass's step (its checkpoint is kept in best/)
    best_metric: str | None = None  # "accuracy" or "loss" (--select-by)
    best_value: float | None = None
    best_checkpoint: str | None = None
    # The temperature fitted on the validation split for the checkpoint evaluate and export take, with the
    # expected calibration error before and after (see finetune/calibration.py); None without validation.
    calibration: dict | None = None


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
        f"steps: {plan.steps_per_epoch} per epoch at batch {plan.batch_size}"
        + (f" per worker x {plan.workers} workers" if plan.workers > 1 else "") + f", {plan.total_steps} in all; "
        f"{plan.optimizer} at learning rate {plan.learning_rate:g}"
    )
    log.info(f"schedule: {plan.schedule}, warm-up {plan.warmup_steps} steps; learning-rate search {plan.lr_search}")
    for note in plan.derived:
        log.info(f"  {note}")
    log.info(f"devices: {', '.join(plan.devices)}")
    log.info(f"feature cache: {plan.feature_cache_reason}")
    if plan.sampling != "natural" or plan.ema:
        averaging = f"; weights averaged, decay {plan.ema:g} (validation, evaluate and export use the averages)"
        log.info(f"sampling: {plan.sampling}" + (averaging if plan.ema else ""))
    for warning in warnings:
        log.warning(warning)


def _scalar_summary(writer, step: int, values: dict) -> None:
    from finetune.compat import tf

    summary = tf.compat.v1.Summary(
        value=[tf.compat.v1.Summary.Value(tag=tag, simple_value=float(v)) for tag, v in values.items()]
    )
    writer.add_summary(summary, step)


@translates_tf_errors  # TensorFlow's errors about damaged files, as FinetuneErrors naming the file
def train(config: TrainConfig) -> TrainResult:
    """Runs (or resumes) a fine-tuning run described by the config; see the module docstring."""
    started = time.monotonic()
    cluster = cluster_mod.from_environment(config.worker_timeout)  # a malformed TF_CONFIG stops here
    if cluster and config.early_stop:  # the chief would stop alone and leave the others waiting on it
        raise FinetuneError("--early-stop does not work across several workers yet (TF_CONFIG is set); drop "
                            "--early-stop, or keep the best checkpoint with --select-by and stop the run by hand")
    if cluster:  # a port in use, or a worker that never starts, too: before any work
        cluster_mod.start(cluster)
        cluster_mod.wait_for_peers(cluster)
    plan = plan_training(config)
    train_dir = Path(config.train_dir)
    if cluster and not cluster.chief:  # the chief alone writes to the train dir
        resume_from = None if config.overwrite else rundir.newest_checkpoint(train_dir)
    else:
        resume_from = rundir.prepare(train_dir, asdict(plan), config.overwrite, must_match=RESUME_MUST_MATCH)
    if resume_from and (not cluster or cluster.chief):
        _check_resumed_settings(train_dir, plan)
    warnings = _start_warnings(plan, config, resume_from)
    if not plan.eval_every:
        warnings.append("no validation passes (no validation split, or --eval-every 0): no best checkpoint is kept "
                        "and the probabilities are not calibrated")  # fmt: skip
    start_step = _global_step(resume_from) if resume_from else 0
    if cluster:
        cluster_mod.check_plan(cluster, plan, start_step)
    if start_step >= plan.total_steps:
        log.info(f"{train_dir} is already trained to step {start_step}; raise --steps or --epochs to go on")
        return _with_best(_result(plan, train_dir, _Outcome(resume_from, "already complete", start_step,
                                                            start_step), started, warnings))  # fmt: skip
    if resume_from and _stopped_early(train_dir):
        log.info(f"{train_dir} stopped early at step {start_step}; pass --overwrite to train it again")
        return _with_best(_result(plan, train_dir, _Outcome(resume_from, "already complete", start_step,
                                                            start_step), started, warnings))  # fmt: skip

    tables = cached_features(plan, cluster) if plan.feature_cache else None
    if plan.feature_cache and cluster and not cluster.chief:  # its share is in the cache; the chief trains
        return _result(plan, train_dir, _Outcome(None, "feature share extracted", 0, 0), started, warnings)
    # The cached head trains on the chief alone; the network's graph is one worker's of the cluster.
    graph_cluster = cluster if cluster and not plan.feature_cache else None
    if plan.lr_search == "on":
        plan = with_searched_rate(plan, tables, train_dir if resume_from else None)
    built = build_training_graph(plan, start_step, tables, graph_cluster)
    checkpoint = None
    with built.graph.as_default():
        trainable_parameters = model.parameter_count(model.trainable_variables(plan.trainable_scopes))
        if plan.checkpoint and not resume_from:
            checkpoint = model.open_checkpoint(plan.checkpoint)
            model.check_restorable(built.restore_variables, checkpoint)
    _log_summary(plan, trainable_parameters, resume_from, warnings)
    if not cluster or cluster.chief:
        rundir.write_run_config(train_dir, asdict(plan))
    try:
        outcome = _run(plan, built, train_dir, start_step, resume_from, checkpoint, graph_cluster)
    except Exception as problem:  # a collective that timed out or lost its peer: name the worker gone
        if graph_cluster and cluster_mod.is_gone(problem):
            raise cluster_mod.gone_error(graph_cluster, cluster_mod.missing_peers(graph_cluster)) from None
        raise
    result = _result(plan, train_dir, outcome, started, warnings)
    result.feature_cache = tables.report if tables else None
    result.calibration = outcome.calibration
    return _with_best(result)


def _start_warnings(plan: Plan, config: TrainConfig, resume_from: str | None) -> list[str]:
    if plan.devices == ("/cpu:0",) and config.device == "auto":
        log.info("no GPU found; training on the CPU")
    warnings = []
    if plan.checkpoint is None and not resume_from:
        warnings.append("--checkpoint none: starting from random weights; results are not pretrained")
    imbalance = imbalance_warning(plan.train_class_counts,
                                  weighted=plan.class_weights is not None or plan.sampling == "balanced")  # fmt: skip
    if imbalance:
        warnings.append(imbalance)
    if plan.sampling == "balanced" and plan.class_weights is not None:
        warnings.append("--sampling balanced with --class-weights auto: each already evens out the classes, so "
                        "together they tilt the run toward the rare ones; keep one of them")  # fmt: skip
    return warnings


# Settings a resumed run must share that config.json gained after its first version: an older run had these.
_RESUMED_WITH_DEFAULTS = {"sampling": "natural", "ema": None}


def _check_resumed_settings(train_dir: Path, plan: Plan) -> None:
    """Refuses to resume with another --sampling or --ema (the data order, or the variables, would differ)."""
    previous = rundir.read_run_config(train_dir).values
    for key, default in _RESUMED_WITH_DEFAULTS.items():
        before, now = previous.get(key, default), getattr(plan, key, default)
        if before != now:
            raise FinetuneError(
                f"--train-dir {train_dir} holds a run with --{key} {before}, not {now}; pass --{key} {before} "
                "to resume it, --overwrite to start over, or choose a new --train-dir"
            )


def _global_step(checkpoint: str) -> int:
    from finetune.compat import tf

    reader = tf.compat.v1.train.NewCheckpointReader(checkpoint)
    return int(reader.get_tensor(tf.compat.v1.GraphKeys.GLOBAL_STEP))


@dataclass
class _Outcome:
    """How the loop ended: the newest checkpoint, why it stopped, and what it measured on the way."""

    checkpoint: str | None
    status: str
    start_step: int
    step: int
    losses: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)
    validation_accuracy: float | None = None
    images_per_second: float | None = None
    calibration: dict | None = None  # the temperature fitted at the end (see _calibrate)


def _run(plan: Plan, built: TrainingGraph, train_dir: Path, start_step: int, resume_from: str | None,
         checkpoint: model.Checkpoint | None, cluster: cluster_mod.Cluster | None = None) -> _Outcome:  # fmt: skip
    """The loop: one step at a time, logging, validating and saving, until the plan's last step or a stop."""
    from finetune.compat import tf
    from finetune.progress import Progress

    outcome = _Outcome(resume_from, "completed", start_step, start_step)
    chief = cluster is None or cluster.chief
    if not chief:
        plan = replace(plan, eval_every=0)  # the chief validates
    start_checks = cluster_mod.start_checks(cluster, built.graph) if cluster else None
    target, config = cluster_mod.session_target(cluster, session_config(plan))
    with (built.graph.as_default(), tf.compat.v1.Session(target, config=config) as session,
          ExitStack() as cleanup):  # fmt: skip
        _set_variables(session, built, resume_from, start_step, checkpoint)
        if start_checks:
            start_checks(session, plan, start_step)
        writer = (tf.compat.v1.summary.FileWriter(str(train_dir), graph=None if resume_from else built.graph)
                  if chief else cluster_mod.NoWriter())  # fmt: skip
        cleanup.callback(writer.close)  # on an error too: an events file left open keeps its disk busy
        last_save_step, last_save_time = start_step, time.monotonic()
        keep_best = _KeepBest(plan, train_dir, start_step, resume_from, built.saver) if plan.select_by else None

        def save() -> None:
            nonlocal last_save_step, last_save_time
            if not chief:
                last_save_step, last_save_time = outcome.step, time.monotonic()
                return
            prefix = rundir.checkpoint_prefix(train_dir)
            with rundir.partial_checkpoint_removed(train_dir, outcome.step):  # a full disk, say
                outcome.checkpoint = built.saver.save(session, prefix, global_step=outcome.step,
                                                      write_meta_graph=False)  # fmt: skip
            last_save_step, last_save_time = outcome.step, time.monotonic()

        with _StopRequest() as stop, Progress("train", plan.total_steps, unit="steps", start=start_step,
                                              rate_unit="images/s", rate_scale=plan.batch_size) as progress:  # fmt: skip
            while outcome.step < plan.total_steps:
                if stop.requested:
                    outcome.status = "interrupted"
                    break
                # The learning rate fetched is the one this step used; the step count is kept here rather
                # than read back, since a fetch of global_step races with its own increment.
                _, loss, accuracy, rate = session.run([built.train_op, built.loss, built.accuracy, built.learning_rate])
                step = outcome.step = outcome.step + 1
                if not math.isfinite(loss):
                    where = f"{outcome.checkpoint} (step {last_save_step})" if outcome.checkpoint else "none yet"
                    raise FinetuneError(
                        f"the loss became {loss} at step {step}; stopped without saving (last good checkpoint: "
                        f"{where}); lower --learning-rate (it was {plan.learning_rate:g}), e.g. to "
                        f"{plan.learning_rate / 10:g}"
                    )
                outcome.losses.append(float(loss))
                outcome.accuracies.append(float(accuracy))
                progress.advance(1, loss=float(loss), accuracy=float(accuracy), lr=float(rate))
                if step % 10 == 0 or step == plan.total_steps:
                    _scalar_summary(writer, step, {"loss": loss, "accuracy": accuracy, "learning_rate": rate})
                if plan.eval_every and (step % plan.eval_every == 0 or step == plan.total_steps):
                    metrics = (built.validation_metrics(session) if built.validation_metrics
                               else {"accuracy": built.validate(session), "loss": float("nan")})  # fmt: skip
                    outcome.validation_accuracy = metrics["accuracy"]
                    _scalar_summary(writer, step, {"validation_accuracy": metrics["accuracy"],
                                                   "validation_loss": metrics["loss"]})  # fmt: skip
                    log.info(f"step {step}: validation accuracy {metrics['accuracy']:.4f}, loss {metrics['loss']:.4f}")
                    if keep_best and keep_best.record(session, step, metrics):
                        outcome.status = "stopped early"
                        log.info(f"step {step}: stopping early, {plan.early_stop} validation passes without "
                                 f"improvement since step {keep_best.best.step}")  # fmt: skip
                        break
                if step % plan.save_every == 0 or (time.monotonic() - last_save_time) / 60 >= plan.save_minutes:
                    save()
        if outcome.step != last_save_step or outcome.checkpoint is None:
            save()
        if chief:
            # The graph (model.ckpt-<step>.meta) goes with the checkpoint the run ends on alone: it is the same
            # graph for every checkpoint of a run, and exporting it took as long as writing the weights of a
            # head-only run (0.25 s a save at 75 px). TensorBoard has it from the events file anyway.
            built.saver.export_meta_graph(f"{outcome.checkpoint}.meta")  # written whole, then renamed
        if cluster:  # equal on every worker: the tests compare them
            log.info(f"final weights sha256 {cluster_mod.variables_digest(session, tf.compat.v1.global_variables())}")
        if plan.eval_every and built.validation_logits and outcome.status in ("completed", "stopped early"):
            outcome.calibration = _calibrate(session, built, train_dir, keep_best, outcome.step)
        writer.close()
    outcome.images_per_second = progress.rate if outcome.losses else None
    return outcome


def _calibrate(session, built: TrainingGraph, train_dir: Path, keep_best: "_KeepBest | None", step: int) -> dict:
    """Fits and records the temperature of the checkpoint evaluate and export take by default (the best
    validation pass's, else the newest) on the validation split, in the training session: the best
    checkpoint's values are restored into it and the graph's own validation pass gives the logits."""
    from finetune.calibration import softmax
    from finetune.evaluate import fit_and_record

    if keep_best and keep_best.best and keep_best.best.step != step:
        keep_best.saver.restore(session, keep_best.best.checkpoint)
        step = keep_best.best.step
    logits, labels = built.validation_logits(session)
    fit = fit_and_record(train_dir, softmax(logits), labels, step)
    log.info(f"calibration: temperature {fit['temperature']:.3f} for step {fit['step']}; validation ECE "
             f"{fit['ece_before']:.4f} -> {fit['ece_after']:.4f}")  # fmt: skip
    return fit


def _set_variables(session, built: TrainingGraph, resume_from: str | None, start_step: int,
                   checkpoint: model.Checkpoint | None) -> None:  # fmt: skip
    """A resumed run's saved values (and its dropout streams where they were); a new run's first values."""
    if resume_from:
        built.saver.restore(session, resume_from)
        for _ in range(start_step if built.random_ops else 0):
            for tensor, feed in built.random_ops:
                session.run(tensor, feed)
    else:
        start_fresh(session, built, checkpoint)
    built.initialize(session)


def _result(plan: Plan, train_dir: Path, outcome: _Outcome, started: float, warnings: list[str]) -> TrainResult:
    losses, accuracies = outcome.losses, outcome.accuracies
    window = max(1, min(len(losses) // 4, 20))
    recent = max(1, min(len(accuracies), plan.steps_per_epoch))
    return TrainResult(
        train_dir=str(train_dir),
        checkpoint=outcome.checkpoint,
        status=outcome.status,
        start_step=outcome.start_step,
        global_step=outcome.step,
        total_steps=plan.total_steps,
        first_loss=float(np.mean(losses[:window])) if losses else None,
        final_loss=float(np.mean(losses[-window:])) if losses else None,
        train_accuracy=float(np.mean(accuracies[-recent:])) if accuracies else None,
        validation_accuracy=outcome.validation_accuracy,
        images_per_second=outcome.images_per_second,
        seconds=time.monotonic() - started,
        peak_memory_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        devices=plan.devices,
        pretrained=plan.checkpoint is not None,
        learning_rate=plan.learning_rate,
        weight_decay=plan.weight_decay,
        lr_search=plan.lr_search_result,
        warnings=warnings,
    )


# ------------------------------------------------------------------------------------ keep the best, stop early


class _KeepBest:
    """Saves the checkpoint of each validation pass that beats the best so far into best/ and counts the
    passes since; says when --early-stop's patience has run out. finetune/rundir.py owns what it writes."""

    def __init__(self, plan: Plan, train_dir: Path, start_step: int, resume_from: str | None, saver) -> None:
        from finetune.compat import tf

        # Every variable, as the regular checkpoints hold, through ``saver``'s own save ops (a second Saver
        # would build its own, 0.3 to 0.5 s), with rotation of its own that never deletes anything in best/.
        shared = tf.compat.v1.train.SaverDef()
        shared.CopyFrom(saver.as_saver_def())
        shared.max_to_keep = 0
        self.saver = tf.compat.v1.train.Saver(saver_def=shared, save_relative_paths=True)
        self.plan, self.train_dir = plan, train_dir
        previous = rundir.read_best(train_dir) if resume_from else None
        self.best = previous if previous and previous.metric == plan.select_by else None
        self.passes = [p for p in self.best.passes if p[0] <= start_step] if self.best else []
        self.stale = sum(1 for s, _ in self.passes if self.best and s > self.best.step)

    def record(self, session, step: int, metrics: dict[str, float]) -> bool:
        """Records a validation pass; returns True when the run should stop early."""
        value = metrics[self.plan.select_by]
        self.passes.append((step, value))
        if rundir.improves(self.plan.select_by, value, self.best.value if self.best else None):
            path = self.saver.save(session, rundir.best_prefix(self.train_dir), global_step=step,
                                   write_meta_graph=False)  # fmt: skip
            self.best = rundir.Best(self.plan.select_by, step, value, path, ())
            self.stale = 0
        else:
            self.stale += 1
        stop = bool(self.plan.early_stop) and self.stale >= self.plan.early_stop
        if self.best is not None:
            self.best = dataclasses.replace(self.best, passes=tuple(self.passes), stopped_early=stop)
            rundir.write_best(self.train_dir, self.best)
        return stop


def _stopped_early(train_dir: Path) -> bool:
    best = rundir.read_best(train_dir)
    return bool(best and best.stopped_early)


def _with_best(result: TrainResult) -> TrainResult:
    """The result with the run's best validation pass, when it kept one."""
    best = rundir.read_best(result.train_dir)
    if best is not None:
        result.best_step, result.best_metric, result.best_value = best.step, best.metric, best.value
        result.best_checkpoint = best.checkpoint
    return result
