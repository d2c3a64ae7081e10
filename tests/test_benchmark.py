"""scripts/benchmark.py end to end on its cheapest stage, the way a reader runs it: the command line.

The stage runs in a process of its own that the script starts; its result comes back through that process's
stdout into the report, with the process's own peak memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_one_stage_runs_in_its_own_process_and_reaches_the_report(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--quick", "--stages", "ceiling",
         "--work", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    ceiling = report["stages"]["ceiling"]
    for dtype in ("float32", "bfloat16"):
        assert ceiling[dtype]["gflops"] > 0
        assert 0 < ceiling[dtype]["cpu_utilisation"] <= 1.5
        assert len(ceiling[dtype]["step_seconds"]) == 3  # --quick times 3 matmuls a type
    # The stage's process imported TensorFlow: its own peak, not the small parent's.
    assert ceiling["peak_memory_mb"] > 200
    assert ceiling["stage_seconds"] > 0
    assert report["cores"] >= 1 and report["quick"] is True
    # The other stages never ran in this --work: the report says so instead of a summary.
    assert report["summary"].startswith("needs the results of prepare, build_dataset")
    assert json.loads((tmp_path / "results-quick" / "ceiling.json").read_text()) == ceiling
