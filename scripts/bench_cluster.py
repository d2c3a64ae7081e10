"""Measures training over two workers on this machine: step time, all-reduce time, bytes moved, the share.

    python scripts/bench_cluster.py                  # 2 workers, one core each, `all` at batch 16 per worker
    python scripts/bench_cluster.py --workers 2 --batch-size 16 --image-size 299 --steps 5

Each worker is this script again, started by scripts/local_cluster.py with its TF_CONFIG and pinned to one
core. It builds exactly the graph ``finetune train`` runs on a worker (finetune.graph.build_training_graph
with the cluster), steps it, and then times the all-reduce alone: one CollectiveReduceV2 of a tensor the
size of the packed gradients, the collective each step runs. The chief writes one JSON object, which
this script prints on stdout (the workers' logs go to stderr):

- ``step_seconds``: median wall time of a training step (the all-reduce and the batch-norm broadcast included);
- ``all_reduce_seconds``: median wall time of the gradient all-reduce on its own;
- ``gradient_bytes``: the packed float32 gradients of one worker;
- ``bytes_sent_per_worker_per_step``: what a ring all-reduce sends from each worker, 2 (N-1)/N of the
  gradients, plus the batch-norm statistics broadcast (a sum of the same kind);
- ``all_reduce_share``: all_reduce_seconds / step_seconds (the goal on loopback: at most 0.10).

Generated data and a stand-in checkpoint (speed does not depend on the weights); everything offline.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _worker(args: argparse.Namespace) -> int:
    import numpy as np

    from finetune import cluster as cluster_mod
    from finetune import model
    from finetune.compat import tf
    from finetune.config import TrainConfig
    from finetune.graph import build_training_graph, moving_statistics, session_config, start_fresh
    from finetune.plan import plan_training

    cluster = cluster_mod.start(cluster_mod.from_environment(timeout=1800.0))  # first steps are slow on one core
    cluster_mod.wait_for_peers(cluster)
    config = TrainConfig(dataset=args.dataset, train_dir=tempfile.mkdtemp(), checkpoint=args.checkpoint,
                         trainable="all", batch_size=args.batch_size, image_size=args.image_size,
                         feature_cache="off", eval_every=0, steps=1000)  # fmt: skip
    plan = plan_training(config)
    built = build_training_graph(plan, 0, None, cluster)
    with built.graph.as_default():
        from tensorflow.python.ops import collective_ops

        packed = [op for op in built.graph.get_operations()
                  if op.type == "CollectiveReduceV2" and op.name.startswith("cluster_all_reduce")]  # fmt: skip
        elements = int(packed[0].inputs[0].shape[0])
        statistics_elements = sum(int(np.prod(v.shape.as_list())) for v in moving_statistics(plan))
        local = [tf.compat.v1.GraphKeys.LOCAL_VARIABLES]
        probe_values = tf.compat.v1.Variable(tf.ones([elements]), trainable=False, collections=local)
        probe = tf.reduce_sum(collective_ops.all_reduce_v2(
            probe_values, cluster.size, cluster_mod.GROUP_KEY, cluster.instance_key(), merge_op="Add",
            final_op="Div", timeout=cluster.timeout))  # fmt: skip
        checkpoint = model.open_checkpoint(plan.checkpoint)
        target, config_proto = cluster_mod.session_target(cluster, session_config(plan))
        with tf.compat.v1.Session(target, config=config_proto) as session:
            start_fresh(session, built, checkpoint)
            built.initialize(session)
            session.run(probe_values.initializer)
            step_times, reduce_times = [], []
            for index in range(args.steps + 2):  # two untimed first steps: graph optimisation
                started = time.perf_counter()
                session.run(built.train_op)
                if index >= 2:
                    step_times.append(time.perf_counter() - started)
            for index in range(args.steps + 2):
                started = time.perf_counter()
                session.run(probe)
                if index >= 2:
                    reduce_times.append(time.perf_counter() - started)
    if not cluster.chief:
        return 0
    n = cluster.size
    step, reduce = statistics.median(step_times), statistics.median(reduce_times)
    Path(args.out).write_text(json.dumps({
        "workers": n,
        "per_worker_batch": args.batch_size,
        "global_batch": args.batch_size * n,
        "image_size": args.image_size,
        "trainable": "all",
        "cores_per_worker": 1,
        "steps_timed": args.steps,
        "step_seconds": round(step, 4),
        "step_seconds_all": [round(t, 4) for t in step_times],
        "all_reduce_seconds": round(reduce, 4),
        "all_reduce_seconds_all": [round(t, 4) for t in reduce_times],
        "gradient_elements": elements,
        "gradient_bytes": elements * 4,
        "batch_norm_statistics_bytes": statistics_elements * 4,
        "bytes_sent_per_worker_per_step": int(2 * (n - 1) / n * elements * 4 + (n - 1) / n * statistics_elements * 4),
        "all_reduce_share": round(reduce / step, 4),
        "images_per_second": round(args.batch_size * n / step, 2),
    }, indent=2) + "\n")  # fmt: skip
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16, help="per worker")
    parser.add_argument("--image-size", type=int, default=299)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after two untimed ones)")
    parser.add_argument("--work", help="folder for the generated dataset and stand-in (default: a temporary one)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dataset", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker(args)

    from finetune import cli
    from finetune.synthetic import make_image_folder, write_standin_checkpoint

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-cluster-"))
    dataset, checkpoint = work / "ds", work / "inception_v3.ckpt"
    if not dataset.exists():
        make_image_folder(work / "photos", num_classes=4, images_per_class=40, seed=3)
        if cli.main(["build-dataset", str(work / "photos"), "--out", str(dataset)]):
            return 1
    if not Path(f"{checkpoint}").exists():
        write_standin_checkpoint(checkpoint, seed=1)
    spec = importlib.util.spec_from_file_location("local_cluster", HERE / "local_cluster.py")
    local_cluster = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(local_cluster)
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--dataset", str(dataset),
               "--checkpoint", str(checkpoint), "--batch-size", str(args.batch_size),
               "--image-size", str(args.image_size), "--steps", str(args.steps),
               "--out", str(work / "result.json")]  # fmt: skip
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    processes = local_cluster.start_workers(args.workers, command, cores=True, out=sys.stderr)
    codes = [process.wait() for process in processes]
    for relay in (relay for process in processes for relay in process.relays):
        relay.join(timeout=5)
    if any(codes):
        return 1
    print((work / "result.json").read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
