"""Training over several workers on TensorFlow's distributed runtime: TF_CONFIG, servers, collective all-reduce.

With ``TF_CONFIG`` set (the variable Kubernetes' TFJob, Vertex AI and SageMaker set), ``finetune train`` runs
data-parallel over the ``worker`` job's tasks; task 0 is the chief. Each worker:

1. parses and checks TF_CONFIG and starts a ``tf.distribute.Server`` on its address (``start``), then waits
   for every peer to answer (``wait_for_peers``) so that no worker waits forever on one that never started;
2. builds the same graph as a single process, reading its own block of every global batch
   (``worker_batches``), and sums its gradients with the others' through TensorFlow's collective all-reduce
   (``all_reduce_mean``): one packed CollectiveReduceV2 per step, fixed group and instance keys, a timeout;
3. checks at start that every worker has the chief's plan and, once its variables are set, the chief's
   weights (``Agreement``: a digest per setting, all-reduced);
4. copies the chief's batch-norm moving statistics after each step (``broadcast_from_chief``).

The result is the single-process run with one tower per worker (``--device cpu:N`` at N times the
per-worker batch): the same global batches, split the same way, the same statistics (the first tower's).
Without TF_CONFIG none of this runs. Parameter servers and SyncReplicasOptimizer are not used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from finetune.errors import FinetuneError

log = logging.getLogger("finetune")

GROUP_KEY = 1  # one collective group: every worker's CPU
DEFAULT_TIMEOUT = 300.0  # seconds a worker waits for a peer (at start, and in each all-reduce)


@dataclass
class Cluster:
    """This process's place in the cluster, and the server it runs (after ``start``)."""

    workers: tuple[str, ...]  # host:port of each task of the worker job, task 0 first
    index: int
    timeout: float = DEFAULT_TIMEOUT
    server: Any = None
    _next_instance: int = field(default=1, repr=False)

    @property
    def size(self) -> int:
        return len(self.workers)

    @property
    def chief(self) -> bool:
        return self.index == 0

    @property
    def device(self) -> str:
        return f"/job:worker/replica:0/task:{self.index}"

    @property
    def target(self) -> str:
        return self.server.target if self.server is not None else ""

    def instance_key(self) -> int:
        """The next collective instance key; every worker builds the same graph, so the keys agree."""
        key = self._next_instance
        self._next_instance += 1
        return key


# ------------------------------------------------------------------------------------------ TF_CONFIG


def parse_tf_config(text: str, timeout: float = DEFAULT_TIMEOUT) -> Cluster:
    """A Cluster from the text of TF_CONFIG; a FinetuneError saying what is wrong and how to fix it."""
    example = '{"cluster": {"worker": ["host0:2222", "host1:2222"]}, "task": {"type": "worker", "index": 0}}'
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as problem:
        raise FinetuneError(f"TF_CONFIG is not JSON ({problem}); set it like {example}") from None
    cluster = spec.get("cluster") if isinstance(spec, dict) else None
    workers = cluster.get("worker") if isinstance(cluster, dict) else None
    if not workers or not isinstance(workers, list) or not all(isinstance(w, str) for w in workers):
        raise FinetuneError(f"TF_CONFIG has no worker job (cluster.worker, a list of host:port); set it like {example}")
    others = sorted(set(cluster) - {"worker"})
    if others:
        raise FinetuneError(
            f"TF_CONFIG has jobs {', '.join(others)}: finetune uses the worker job alone (task 0 is the chief, no "
            "parameter servers); list every machine under cluster.worker"
        )
    for address in workers:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise FinetuneError(f"TF_CONFIG: worker address {address!r} is not host:port")
    if len(set(workers)) != len(workers):
        raise FinetuneError("TF_CONFIG: the worker job lists an address twice; give each task its own host:port")
    task = spec.get("task") if isinstance(spec, dict) else None
    kind = task.get("type", "worker") if isinstance(task, dict) else None
    index = task.get("index") if isinstance(task, dict) else None
    if kind != "worker" or not isinstance(index, int) or isinstance(index, bool):
        raise FinetuneError(f"TF_CONFIG: task must be {{\"type\": \"worker\", \"index\": I}}, got {task!r}")
    if not 0 <= index < len(workers):
        raise FinetuneError(
            f"TF_CONFIG: task index {index} is out of range: the worker job has {len(workers)} tasks "
            f"(0 to {len(workers) - 1})"
        )
    return Cluster(tuple(workers), index, timeout)


def from_environment(timeout: float = DEFAULT_TIMEOUT) -> Cluster | None:
    """The cluster TF_CONFIG describes, or None when it is unset or empty (a single-process run)."""
    text = os.environ.get("TF_CONFIG", "").strip()
    return parse_tf_config(text, timeout) if text else None


def worker_count() -> int:
    """How many workers TF_CONFIG lists (1 without it); the plan derives steps from the global batch."""
    cluster = from_environment()
    return cluster.size if cluster else 1


# ---------------------------------------------------------------------------------------- the server


def start(cluster: Cluster) -> Cluster:
    """Starts this task's server, after checking that its port is free (a clear error rather than gRPC's)."""
    from finetune.compat import tf

    address = cluster.workers[cluster.index]
    port = int(address.rpartition(":")[2])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("", port))
        except OSError as problem:
            raise FinetuneError(
                f"TF_CONFIG: port {port} of worker task {cluster.index} ({address}) is in use ({problem.strerror}); "
                "stop what holds it or give this task another port"
            ) from None
    spec = tf.train.ClusterSpec({"worker": list(cluster.workers)})
    try:
        cluster.server = tf.distribute.Server(spec, job_name="worker", task_index=cluster.index,
                                              config=session_config(None, cluster), start=True)  # fmt: skip
    except (tf.errors.OpError, RuntimeError, ValueError) as problem:
        raise FinetuneError(f"TF_CONFIG: the server of worker task {cluster.index} ({address}) did not start: "
                            f"{str(problem).splitlines()[0]}") from None  # fmt: skip
    log.info(f"worker {cluster.index} of {cluster.size} ({'chief' if cluster.chief else 'not the chief'}): "
             f"server at {address}")  # fmt: skip
    return cluster


def _answers(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
            return True
    except OSError:
        return False


def missing_peers(cluster: Cluster) -> list[int]:
    """The tasks whose server does not answer now."""
    return [i for i, address in enumerate(cluster.workers) if i != cluster.index and not _answers(address)]


def wait_for_peers(cluster: Cluster) -> None:
    """Returns once every peer's server answers; a FinetuneError naming the first silent task after the timeout."""
    deadline = time.monotonic() + cluster.timeout
    while True:
        missing = missing_peers(cluster)
        if not missing:
            return
        if time.monotonic() > deadline:
            raise gone_error(cluster, missing, "never answered")
        time.sleep(0.5)


def gone_error(cluster: Cluster, missing: list[int], what: str = "stopped answering") -> FinetuneError:
    task = missing[0] if missing else None
    name = f"worker task {task} ({cluster.workers[task]})" if task is not None else "a worker"
    return FinetuneError(
        f"{name} {what} within --worker-timeout {cluster.timeout:g} s; stopped (the last checkpoint is intact); "
        "restart every worker to resume"
    )


def session_config(base, cluster: Cluster):
    """The session's ConfigProto for a worker: the collective group leader, and only this task's devices.

    The device filter keeps session creation from waiting on the other workers' devices; the collectives
    reach them through the group leader (task 0) instead.
    """
    from finetune.compat import tf

    config = tf.compat.v1.ConfigProto()
    if base is not None:
        config.CopyFrom(base)
    config.experimental.collective_group_leader = "/job:worker/replica:0/task:0"
    del config.device_filters[:]
    config.device_filters.append(f"/job:worker/replica:0/task:{cluster.index}")
    return config


def is_gone(problem: BaseException) -> bool:
    """Whether a TensorFlow error is a collective that timed out or lost its peer."""
    from finetune.compat import tf

    return isinstance(problem, (tf.errors.DeadlineExceededError, tf.errors.UnavailableError,
                                tf.errors.AbortedError, tf.errors.CancelledError))  # fmt: skip


# ------------------------------------------------------------------------------------ in the graph


def all_reduce_mean(cluster: Cluster, pairs: list[tuple]) -> list[tuple]:
    """(gradient, variable) pairs with each gradient averaged over the workers.

    The gradients are packed into one flat tensor and all-reduced at once: one collective per step rather
    than one per variable, so the fixed cost of a round is paid once.
    """
    from finetune.compat import tf

    if not pairs:
        return pairs
    from tensorflow.python.ops import collective_ops

    gradients = [g for g, _ in pairs]
    with tf.name_scope("cluster_all_reduce"):
        flat = tf.concat([tf.reshape(tf.cast(g, tf.float32), [-1]) for g in gradients], 0)
        reduced = collective_ops.all_reduce_v2(flat, cluster.size, GROUP_KEY, cluster.instance_key(),
                                               merge_op="Add", final_op="Div", timeout=cluster.timeout)  # fmt: skip
        sizes = [int(np.prod(g.shape.as_list())) for g in gradients]
        pieces = tf.split(reduced, sizes)
        out = [(tf.cast(tf.reshape(p, tf.shape(g)), g.dtype), v) for p, g, (_, v) in zip(pieces, gradients, pairs)]
    return out


def broadcast_from_chief(cluster: Cluster, variables: list, after) -> Any:
    """An op that, after ``after``, sets ``variables`` on every worker to the chief's values.

    A sum in which only the chief contributes: one collective for all of them, the same kind as the
    gradients', so no second kind of collective has to be set up.
    """
    from finetune.compat import tf

    if not variables:
        return tf.group(after)
    from tensorflow.python.ops import collective_ops

    with tf.name_scope("cluster_broadcast"), tf.control_dependencies([after]):
        values = [tf.reshape(tf.identity(v), [-1]) for v in variables]
        flat = tf.concat(values, 0) * (1.0 if cluster.chief else 0.0)
        reduced = collective_ops.all_reduce_v2(flat, cluster.size, GROUP_KEY, cluster.instance_key(),
                                               merge_op="Add", final_op="Id", timeout=cluster.timeout)  # fmt: skip
        pieces = tf.split(reduced, [int(np.prod(v.shape.as_list())) for v in variables])
        return tf.group(*[v.assign(tf.reshape(p, v.shape)) for v, p in zip(variables, pieces)])


class Agreement:
    """Checks that every worker holds the chief's value of some named settings, by a digest of each.

    Each setting becomes a 31-bit number. The chief's numbers are summed with zeros from the others (so
    every worker learns them exactly); each worker finds its first differing setting; a Min over
    ``first * size + task`` tells every worker the first difference and the lowest task that has it.
    """

    def __init__(self, cluster: Cluster, names: list[str]):
        from finetune.compat import tf
        from tensorflow.python.ops import collective_ops

        self.cluster, self.names = cluster, list(names)
        with tf.name_scope("cluster_agreement"):
            self._mine = tf.compat.v1.placeholder(tf.float64, [len(names)])
            self._chief = collective_ops.all_reduce_v2(
                self._mine * (1.0 if cluster.chief else 0.0), cluster.size, GROUP_KEY, cluster.instance_key(),
                merge_op="Add", final_op="Id", timeout=cluster.timeout)  # fmt: skip
            self._first = tf.compat.v1.placeholder(tf.float64, [1])
            self._lowest = collective_ops.all_reduce_v2(
                self._first, cluster.size, GROUP_KEY, cluster.instance_key(), merge_op="Min", final_op="Id",
                timeout=cluster.timeout)  # fmt: skip

    @staticmethod
    def digest(value: Any) -> float:
        text = json.dumps(value, sort_keys=True, default=str).encode()
        return float(int.from_bytes(hashlib.sha256(text).digest()[:4], "little") >> 1)

    def check(self, session, values: dict[str, Any], what: str) -> None:
        """Raises a FinetuneError on every worker when any worker's values differ from the chief's."""
        mine = np.array([self.digest(values[name]) for name in self.names], np.float64)
        chief = run(self.cluster, session, self._chief, {self._mine: mine})
        different = [i for i, (a, b) in enumerate(zip(mine, chief)) if a != b]
        first = different[0] if different else len(self.names)
        mine_first = [first * self.cluster.size + self.cluster.index]
        code = int(run(self.cluster, session, self._lowest, {self._first: mine_first})[0])
        field_index, task = divmod(code, self.cluster.size)
        if field_index < len(self.names):
            name = self.names[field_index]
            shown = f" (this worker has {values[name]!r})" if self.cluster.index == task else ""
            raise FinetuneError(
                f"worker task {task}'s {what} differs from the chief's in {name}{shown}; start every worker with "
                "the same flags and the same dataset, checkpoint and train dir"
            )


def run(cluster: Cluster, session, fetches, feed=None):
    """session.run, with a collective that timed out or lost a peer turned into the error naming the task."""
    try:
        return session.run(fetches, feed)
    except Exception as problem:
        if is_gone(problem):
            raise gone_error(cluster, missing_peers(cluster)) from None
        raise


def variables_digest(session, variables: list) -> str:
    """sha256 over the names and values of the variables: equal on every worker when they start the same."""
    digest = hashlib.sha256()
    values = session.run(variables)
    for variable, value in sorted(zip(variables, values), key=lambda pair: pair[0].op.name):
        digest.update(variable.op.name.encode() + b"\0")
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def worker_batches(info, plan, cluster: Cluster, start_step: int):
    """This worker's batches: block ``index`` of each global batch of ``batch_size * workers`` records.

    The global stream is the single process's (same shuffle seed, same seed pair per record, the same skip
    on resume counted in global records); each worker decodes only its block, so a worker's batch is what
    tower ``index`` of a one-process run at the global batch would get.
    """
    from finetune.dataset import default_workers, pipeline_options, record_stream, transform_record

    per_worker, size = plan.batch_size, cluster.size
    stream = record_stream(info, "train", shuffle=True, repeat=True, seed=plan.seed,
                           skip=start_step * per_worker * size, sampling=plan.sampling)  # fmt: skip
    start = cluster.index * per_worker
    mine = (
        stream.batch(per_worker * size, drop_remainder=True)
        .map(lambda records, pairs: (records[start:start + per_worker], pairs[start:start + per_worker]))
        .unbatch()
    )

    def prepare(record, pair):
        return transform_record(record, pair, image_size=plan.image_size, augment=plan.augment)

    examples = mine.map(prepare, num_parallel_calls=default_workers(), deterministic=True)
    return examples.batch(per_worker, drop_remainder=True).prefetch(2).with_options(pipeline_options())


# ----------------------------------------------------------------------------------- feature cache


class ShareOfCache:
    """The feature cache as one worker's extraction sees it: entries outside its share count as present.

    Entry k belongs to worker ``k[0] mod workers``: a fixed split by the key (the image's bytes and view),
    so each entry is computed by exactly one worker.
    """

    def __init__(self, cache, cluster: Cluster):
        self.cache, self.cluster = cache, cluster
        self.directory = cache.directory

    def mine(self, key: bytes) -> bool:
        return key[0] % self.cluster.size == self.cluster.index

    def __contains__(self, key: bytes) -> bool:
        return not self.mine(key) or key in self.cache

    def add(self, keys, features) -> None:
        self.cache.add(keys, features)


def wait_for_cache(cluster: Cluster, reload, keys: list[bytes]):
    """The chief's wait for the other workers' shares: the reloaded cache once it holds every key.

    A worker that stops answering before its share is there ends the wait with the error naming it.
    """
    while True:
        cache = reload()
        missing = sum(1 for key in keys if key not in cache)
        if not missing:
            return cache
        gone = missing_peers(cluster)
        if gone:
            cache = reload()
            if all(key in cache for key in keys):
                return cache
            raise gone_error(cluster, gone, "stopped before its share of the feature cache was written")
        log.info(f"feature cache: waiting for the other workers' shares ({missing} entries to go)")
        time.sleep(1.0)


# ------------------------------------------------------------------------------------ the trainer's hooks

# The settings every worker must share with the chief (with the step it starts at): they shape the
# variables, the data each worker reads, or the update.
MUST_AGREE = (
    "dataset_fingerprint", "classes", "trainable_scopes", "exclude_scopes", "image_size", "batch_size", "workers",
    "total_steps", "optimizer", "learning_rate", "schedule", "warmup_steps", "weight_decay", "label_smoothing",
    "dropout_keep", "augment", "class_weights", "seed", "precision", "devices",
)  # fmt: skip


def check_plan(cluster: Cluster, plan, start_step: int) -> None:
    """Refuses, on every worker, a plan (MUST_AGREE and the start step) that differs from the chief's.

    Runs in a small graph of its own before the network's is built, so a mistake costs seconds.
    """
    from finetune.compat import tf
    from finetune.runtime import session_config as base_config

    with tf.Graph().as_default() as graph:
        agreement = Agreement(cluster, list(MUST_AGREE) + ["start_step"])
    values = {name: getattr(plan, name) for name in MUST_AGREE}
    values["start_step"] = start_step
    with tf.compat.v1.Session(cluster.target, graph=graph, config=session_config(base_config(), cluster)) as session:
        agreement.check(session, values, "plan")


def start_checks(cluster: Cluster, graph):
    """Builds the check of the starting weights into ``graph``; returns the function that runs it.

    A digest of every variable, once they are set: a worker that restored another checkpoint, or
    initialised differently, is refused before the first step.
    """
    from finetune.compat import tf

    with graph.as_default():
        weights_check = Agreement(cluster, ["initial weights"])
        variables = tf.compat.v1.global_variables()

    def check(session, plan, start_step: int) -> None:
        digest = variables_digest(session, variables)
        weights_check.check(session, {"initial weights": digest}, "starting point")
        log.info(f"all {cluster.size} workers agree on the plan and start from the same weights (sha256 {digest[:12]})")

    return check


def session_target(cluster: Cluster | None, base):
    """The session target and ConfigProto: the in-process default, or this worker's server."""
    if cluster is None:
        return "", base
    return cluster.target, session_config(base, cluster)


class NoWriter:
    """Stands in for the summary writer on a worker that is not the chief: events are the chief's to write."""

    def add_summary(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass
