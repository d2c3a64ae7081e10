"""Times building InceptionV3's graph the ways finetune builds it; prints JSON.

    python scripts/bench_graph_build.py                      # 75 px, 5 repeats of each
    python scripts/bench_graph_build.py --image-size 299 --repeats 9

Every command starts by building a graph, one Python thread doing it, so this is most of a short command's
start-up (TensorFlow's import aside). Each build is a fresh graph; the figure per way is the median of the
repeats, after one untimed build that warms Python's and TensorFlow's caches:

- `inference`: `model.build(images, classes)`, the graph evaluate would build without `restored`;
- `restored`: the same with `restored=True`, as evaluate, feature extraction and Grad-CAM build it;
- `training_head`: with the head's scopes in training mode (the aux head included from 107 px);
- `variables_only`: `model.create_variables(classes)`, what the head trained on cached features holds;
- `frozen`: `model.build(images, classes, values_from=checkpoint)`, export's graph: the checkpoint's values as
  constants (a stand-in checkpoint of `--classes` classes, written first to a temporary folder).

`PYTHONPATH=OLD_CHECKOUT python scripts/bench_graph_build.py` times an older finetune; a way it does not have
is reported as null.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=75, help="network input size (default: 75)")
    parser.add_argument("--classes", type=int, default=5, help="head width (default: 5)")
    parser.add_argument("--repeats", type=int, default=5, help="timed builds per way (default: 5)")
    args = parser.parse_args()

    from finetune import model
    from finetune.compat import tf
    from finetune.synthetic import write_standin_checkpoint

    size, classes = args.image_size, args.classes
    frozen = "values_from" in inspect.signature(model.build).parameters
    folder = tempfile.TemporaryDirectory()
    if frozen:
        checkpoint = model.open_checkpoint(write_standin_checkpoint(Path(folder.name) / "standin.ckpt",
                                                                    num_classes=classes))  # fmt: skip

    def images():
        return tf.compat.v1.placeholder(tf.float32, [None, size, size, 3])

    ways = {
        "inference": lambda: model.build(images(), classes),
        "restored": lambda: model.build(images(), classes, restored=True),
        "training_head": lambda: model.build(images(), classes, train_scopes=model.HEAD_SCOPES),
        "variables_only": lambda: model.create_variables(classes),
        "frozen": lambda: model.build(images(), classes, values_from=checkpoint),
    }
    # An older checkout lacks the newer ways: they are reported as null rather than timed.
    missing = set() if "restored" in inspect.signature(model.build).parameters else {"restored"}
    missing |= set() if hasattr(model, "create_variables") else {"variables_only"}
    missing |= set() if frozen else {"frozen"}
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    operations: dict[str, int] = {}
    for round_ in range(args.repeats + 1):
        for name, build in ways.items():  # taking turns, so a busy spell of the machine hits every way alike
            if name in missing:
                continue
            with tf.Graph().as_default() as graph:
                started = time.perf_counter()
                build()
                elapsed = time.perf_counter() - started
                operations[name] = len(graph.get_operations())
            if round_:  # the first round warms caches
                seconds[name].append(round(elapsed, 3))
    report = {
        "image_size": size,
        "classes": classes,
        "tensorflow": tf.__version__,
        "median_seconds": {name: statistics.median(values) if values else None for name, values in seconds.items()},
        "seconds": seconds,
        "operations": operations,
    }
    print(json.dumps(report))
    folder.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
