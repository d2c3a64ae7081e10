"""Training over several workers (TF_CONFIG, finetune/cluster.py): real worker processes on 127.0.0.1.

What a user relies on: two workers end with the same variables as each other and as one process with one
tower per worker at the global batch; a dead or absent worker stops the others with an error naming it and
the last checkpoint intact, and a restart resumes; settings that differ and a malformed TF_CONFIG are
refused; a head-only run extracts each image's features once across the workers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from finetune import cli
from finetune.compat import tf
from finetune.config import TrainConfig
from finetune.train import train
from tests.conftest import checkpoint_tensors

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "local_cluster.py"
TIMEOUT = 600  # bounds every worker process of a test: a hang fails the test rather than the suite
# Mixed_7c trains, so its batch norm does: the chief's statistics must reach the other worker.
COMMON = ["--image-size", "75", "--batch-size", "4", "--optimizer", "sgd", "--dropout-keep", "1", "--no-augment",
          "--trainable", "Mixed_7c,Logits", "--feature-cache", "off", "--eval-every", "0", "--steps", "5",
          "--save-every", "2", "--worker-timeout", "10"]  # fmt: skip


@pytest.fixture(scope="module")
def local_cluster():
    spec = importlib.util.spec_from_file_location("local_cluster_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """3 classes, 12 images each, with a validation split."""
    from finetune.synthetic import make_image_folder

    root = tmp_path_factory.mktemp("cluster-data")
    make_image_folder(root / "photos", num_classes=3, images_per_class=12, seed=5, min_side=80, max_side=120)
    assert cli.main(["build-dataset", str(root / "photos"), "--out", str(root / "ds"),
                     "--validation-fraction", "0.2", "--workers", "1"]) == 0  # fmt: skip
    return root / "ds"


def _train_args(dataset, train_dir, checkpoint, *extra) -> list[str]:
    return ["finetune", "train", "--dataset", str(dataset), "--train-dir", str(train_dir),
            "--checkpoint", str(checkpoint), *COMMON, *extra]  # fmt: skip


class Workers:
    """Worker processes of one cluster, each writing its output to a file of its own."""

    def __init__(self, local_cluster, commands: list[list[str]], folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.logs = [open(folder / f"worker-{i}.log", "w+") for i in range(len(commands))]
        ports = local_cluster.free_ports(len(commands))
        addresses = [f"127.0.0.1:{port}" for port in ports]
        self.processes = []
        for index, (command, log) in enumerate(zip(commands, self.logs)):
            env = dict(os.environ, TF_CONFIG=local_cluster.tf_config(addresses, index), PYTHONUNBUFFERED="1")
            self.processes.append(subprocess.Popen([sys.executable, "-m", "finetune", *command[1:]], env=env,
                                                   stdout=log, stderr=subprocess.STDOUT))  # fmt: skip

    def wait(self, timeout: float = TIMEOUT) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            return [process.wait(timeout=max(1, deadline - time.monotonic())) for process in self.processes]
        finally:
            for process in self.processes:
                if process.poll() is None:
                    process.kill()

    def output(self, index: int) -> str:
        self.logs[index].flush()
        return Path(self.logs[index].name).read_text()


def _final_digest(output: str) -> str:
    found = re.findall(r"final weights sha256 ([0-9a-f]{64})", output)
    assert len(found) == 1, output
    return found[0]


def _assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.fixture(scope="module")
def one_process(dataset, standin_checkpoint, tmp_path_factory) -> dict:
    """The run two workers at batch 4 must reproduce: one process, two towers, batch 8 (same global batches,
    each split in the same two halves, batch-norm statistics from the first)."""
    config = TrainConfig(dataset=str(dataset), train_dir=str(tmp_path_factory.mktemp("one") / "run"),
                         checkpoint=str(standin_checkpoint), image_size=75, batch_size=8, device="cpu:2",
                         optimizer="sgd", dropout_keep=1.0, augment=False, trainable="Mixed_7c,Logits",
                         feature_cache="off", eval_every=0, steps=5)  # fmt: skip
    return checkpoint_tensors(train(config).checkpoint)


@pytest.fixture(scope="module")
def two_workers(local_cluster, dataset, standin_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("two")
    workers = Workers(local_cluster, [_train_args(dataset, folder / "run", standin_checkpoint)] * 2, folder)
    return workers, workers.wait(), folder / "run"


@pytest.mark.slow
def test_two_workers_end_equal_to_each_other_and_to_one_process(two_workers, one_process):
    workers, codes, train_dir = two_workers
    assert codes == [0, 0], workers.output(0) + workers.output(1)
    assert _final_digest(workers.output(0)) == _final_digest(workers.output(1))
    assert "checkpoint: None" in workers.output(1)  # the chief alone writes
    assert "per worker x 2 workers, 5 in all" in workers.output(0)
    distributed = checkpoint_tensors(tf.train.latest_checkpoint(str(train_dir)))
    assert int(distributed["global_step"]) == 5
    head = "InceptionV3/Logits/Conv2d_1c_1x1/weights"
    assert np.abs(distributed[head]).max() > 0
    _assert_close(distributed, one_process)


@pytest.mark.slow
def test_a_killed_worker_stops_the_other_and_a_restart_resumes(local_cluster, dataset, standin_checkpoint,
                                                                 tmp_path, two_workers):  # fmt: skip
    train_dir = tmp_path / "run"
    command = _train_args(dataset, train_dir, standin_checkpoint)
    workers = Workers(local_cluster, [command] * 2, tmp_path / "first")
    deadline = time.monotonic() + TIMEOUT
    while not (train_dir / "model.ckpt-2.index").exists():
        assert all(p.poll() is None for p in workers.processes) and time.monotonic() < deadline, workers.output(0)
        time.sleep(0.05)
    workers.processes[1].send_signal(signal.SIGKILL)
    codes = workers.wait()
    assert codes == [1, -signal.SIGKILL], workers.output(0)
    errors = [line for line in workers.output(0).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "worker task 1 (127.0.0.1:" in errors[0], workers.output(0)
    saved = tf.train.latest_checkpoint(str(train_dir))
    step = int(checkpoint_tensors(saved)["global_step"])
    assert 2 <= step < 5

    again = Workers(local_cluster, [command] * 2, tmp_path / "again")
    assert again.wait() == [0, 0], again.output(0) + again.output(1)
    assert f"resuming from {saved}" in again.output(0)
    assert _final_digest(again.output(0)) == _final_digest(again.output(1))
    _, _, straight_dir = two_workers
    _assert_close(checkpoint_tensors(tf.train.latest_checkpoint(str(train_dir))),
                  checkpoint_tensors(tf.train.latest_checkpoint(str(straight_dir))))  # fmt: skip


@pytest.mark.slow
def test_a_worker_with_other_settings_is_refused_on_both(local_cluster, dataset, standin_checkpoint, tmp_path):
    chief = _train_args(dataset, tmp_path / "run", standin_checkpoint, "--trainable", "Logits")
    other = chief + ["--seed", "7"]
    workers = Workers(local_cluster, [chief, other], tmp_path)
    assert workers.wait() == [1, 1], workers.output(0) + workers.output(1)
    for index in (0, 1):
        errors = [line for line in workers.output(index).splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "worker task 1's plan differs from the chief's in seed" in errors[0], errors
    assert "this worker has 7" in workers.output(1)
    assert not list((tmp_path / "run").glob("model.ckpt-*"))


def _tf_config(workers, index) -> str:
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})


@pytest.mark.parametrize(
    "tf_config, message",
    [
        ("{not json", "TF_CONFIG is not JSON"),
        (json.dumps({"cluster": {"ps": ["127.0.0.1:1"]}, "task": {"type": "ps", "index": 0}}), "no worker job"),
        (_tf_config(["127.0.0.1:1", "127.0.0.1:2"], 2), "task index 2 is out of range"),
        ("port in use", "is in use"),
    ],
)
def test_a_malformed_tf_config_is_an_error_before_any_work(tf_config, message, tmp_path, monkeypatch, capsys):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        if tf_config == "port in use":
            tf_config = _tf_config([f"127.0.0.1:{held.getsockname()[1]}", "127.0.0.1:1"], 0)
        monkeypatch.setenv("TF_CONFIG", tf_config)
        code = cli.main(["train", "--dataset", str(tmp_path / "nothing"), "--train-dir", str(tmp_path / "run")])
    assert code == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors[-1].startswith("error: TF_CONFIG") and message in errors[-1], errors
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_worker_that_never_starts_is_named(local_cluster, dataset, tmp_path):
    silent = local_cluster.free_ports(2)
    env = dict(os.environ, TF_CONFIG=_tf_config([f"127.0.0.1:{p}" for p in silent], 0))
    result = subprocess.run([sys.executable, "-m", "finetune", "train", "--dataset", str(dataset), "--train-dir",
                             str(tmp_path / "run"), "--worker-timeout", "2"],
                            capture_output=True, text=True, env=env, timeout=TIMEOUT)  # fmt: skip
    assert result.returncode == 1
    assert f"error: worker task 1 (127.0.0.1:{silent[1]}) never answered within --worker-timeout 2 s" in result.stderr


@pytest.mark.slow
def test_head_only_extracts_each_image_once_across_workers_and_the_chief_trains(dataset, standin_checkpoint,
                                                                                tmp_path):  # fmt: skip
    command = ["finetune", "train", "--dataset", str(dataset), "--train-dir", str(tmp_path / "run"),
               "--checkpoint", str(standin_checkpoint), "--image-size", "75", "--batch-size", "4",
               "--trainable", "logits", "--steps", "5", "--cache-dir", str(tmp_path / "cache"),
               "--lr-search", "off", "--worker-timeout", "60"]  # fmt: skip
    result = subprocess.run([sys.executable, str(SCRIPT), "2", "--", *command], capture_output=True, text=True,
                            timeout=TIMEOUT)  # fmt: skip
    assert result.returncode == 0, result.stderr
    computed = {int(i): int(n) for i, n in re.findall(r"\[worker (\d)\] feature cache: (\d+) computed", result.stderr)}
    assert sorted(computed) == [0, 1] and all(computed.values()), result.stderr
    assert sum(computed.values()) == 36  # 27 train + 9 validation images, each once in all
    assert "[worker 1] feature share extracted" in result.stdout
    assert "[worker 0] completed" in result.stdout
    assert int(checkpoint_tensors(tf.train.latest_checkpoint(str(tmp_path / "run")))["global_step"]) == 5
