"""Run N finetune workers on this machine as one cluster: each on a free 127.0.0.1 port with its TF_CONFIG.

    python scripts/local_cluster.py 2 -- finetune train --dataset ds --train-dir runs/a --trainable all

Every line a worker prints is prefixed with ``[worker I]``. The exit status is the chief's (task 0). Each
worker's command is the one given, with ``finetune`` run as ``python -m finetune`` from this interpreter;
``--cores`` pins worker I to core I mod the machine's cores (Linux), as separate machines would be.
For trying the cluster path on one machine, and for the tests; on real machines set TF_CONFIG yourself
(docs/distributed.md).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on now (held open together so they differ, then released)."""
    sockets = []
    try:
        for _ in range(count):
            probe = socket.socket()
            probe.bind(("127.0.0.1", 0))
            sockets.append(probe)
        return [probe.getsockname()[1] for probe in sockets]
    finally:
        for probe in sockets:
            probe.close()


def tf_config(addresses: list[str], index: int) -> str:
    return json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}})


def _relay(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"{prefix} {line}")
        out.flush()
    stream.close()


def start_workers(count: int, command: list[str] | list[list[str]], cores: bool = False,
                  ports: list[int] | None = None, out=None) -> list[subprocess.Popen]:  # fmt: skip
    """Starts the workers; each one's output is relayed, prefixed, by threads of this process.

    ``command`` is every worker's, or a list of one per worker; ``out`` (a file) takes both streams.
    """
    commands = command if command and isinstance(command[0], list) else [command] * count
    commands = [[sys.executable, "-m", "finetune", *c[1:]] if c[:1] == ["finetune"] else c for c in commands]
    ports = ports or free_ports(count)
    addresses = [f"127.0.0.1:{port}" for port in ports]
    processes = []
    for index, command in enumerate(commands):
        worker_env = dict(os.environ, TF_CONFIG=tf_config(addresses, index))
        worker_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        preexec = None
        if cores and hasattr(os, "sched_setaffinity"):
            core = sorted(os.sched_getaffinity(0))[index % len(os.sched_getaffinity(0))]
            preexec = lambda core=core: os.sched_setaffinity(0, {core})  # noqa: E731
        process = subprocess.Popen(command, env=worker_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, preexec_fn=preexec)  # fmt: skip
        process.relays = []
        for stream, sink in ((process.stdout, out or sys.stdout), (process.stderr, out or sys.stderr)):
            relay = threading.Thread(target=_relay, args=(stream, f"[worker {index}]", sink), daemon=True)
            relay.start()
            process.relays.append(relay)
        processes.append(process)
    return processes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workers", type=int, help="how many workers (task 0 is the chief)")
    parser.add_argument("--cores", action="store_true", help="pin each worker to one core")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- finetune train ...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.workers < 1 or not command:
        parser.error("give a worker count of at least 1 and the command after --")
    processes = start_workers(args.workers, command, cores=args.cores)
    try:
        codes = [process.wait() for process in processes]
    except KeyboardInterrupt:
        for process in processes:
            process.terminate()
        codes = [process.wait() for process in processes]
    for relay in (relay for process in processes for relay in process.relays):
        relay.join(timeout=5)
    for index, code in enumerate(codes):
        if code:
            print(f"[worker {index}] exited with status {code}", file=sys.stderr)
    return codes[0]


if __name__ == "__main__":
    sys.exit(main())
