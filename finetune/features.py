"""A cache of the features that feed the head, so head-only training pays for one forward pass, not one per epoch.

What determines a feature (the 2048 values after the final average pool) is the backbone's weights, the
image's bytes, the image size and the preprocessing. The cache is keyed by exactly that:

- a *group* per (digest of the backbone variables' values, image size, preprocessing version, compute
  dtype): a checkpoint whose backbone is unchanged (the same pretrained file under another path, or a train
  dir in which only the head was trained) shares the group, and one whose backbone changed gets a new one;
- an *entry* per (sha256 of the image bytes, view): ``eval`` for the evaluation transform, or augmented view
  k under a seed for ``--augment-views``.

A group is a folder of parts; each part (an ``.npz`` with keys and features) is written to a temporary name
and renamed, so a part interrupted half-way is never read. Changing one image recomputes one entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune import model
from finetune.files import replacing, write_text_atomically

log = logging.getLogger("finetune")

# Bump when the evaluation or augmentation transform changes what a cached feature means.
PREPROCESSING_VERSION = 1
EXTRACTION_BATCH = 64  # large batches: the forward pass runs at full throughput


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/finetune/features, or ~/.cache/finetune/features."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "finetune" / "features"


def backbone_digest(checkpoint_path: str) -> str:
    """sha256 over the names, shapes and values of every network variable outside the head."""
    from finetune.compat import tf

    reader = tf.compat.v1.train.NewCheckpointReader(checkpoint_path)
    digest = hashlib.sha256()
    for name in sorted(reader.get_variable_to_shape_map()):
        if not name.startswith(model.ROOT + "/") or model.in_scopes(name, model.HEAD_SCOPES):
            continue
        try:
            value = np.ascontiguousarray(reader.get_tensor(name))
        except IndexError as exc:  # a truncated .data file: "Read less bytes than requested"
            raise model.CheckpointError(
                f"checkpoint {checkpoint_path} is damaged ({exc}); {model.DAMAGED_CHECKPOINT_FIX}"
            ) from None
        digest.update(f"{name}:{value.dtype}:{value.shape}\n".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def entry_key(image_sha256: bytes, view: int | None, seed: int) -> bytes:
    """The key of one feature vector: the image's bytes and which view of it."""
    tag = b"eval" if view is None else f"view:{seed}:{view}".encode()
    return hashlib.sha256(image_sha256 + tag).digest()


def view_seed(image_sha256: bytes, view: int, seed: int) -> tuple[int, int]:
    """The stateless seed pair of augmented view k of an image: fixed by the image, k and the run's seed."""
    digest = hashlib.sha256(f"{seed}:{view}:".encode() + image_sha256).digest()
    return int.from_bytes(digest[:8], "little") >> 1, int.from_bytes(digest[8:16], "little") >> 1


class FeatureCache:
    """The cached features of one group (backbone, image size, preprocessing version)."""

    def __init__(self, root: Path, backbone: str, image_size: int, compute_dtype: str = "float32"):
        description = {"backbone_sha256": backbone, "image_size": image_size,
                       "preprocessing_version": PREPROCESSING_VERSION}  # fmt: skip
        if compute_dtype != "float32":  # float32 groups keep the names they had before precisions existed
            description["compute_dtype"] = compute_dtype
        name = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:24]
        self.directory = Path(root) / name
        self.directory.mkdir(parents=True, exist_ok=True)
        about = self.directory / "group.json"
        if not about.exists():
            write_text_atomically(about, json.dumps(description, indent=2) + "\n")
        self._rows: dict[bytes, np.ndarray] = {}
        damaged = []
        for part in sorted(self.directory.glob("part-*.npz")):
            loaded = _load_part(part)
            if loaded is None:
                damaged.append(part)
                continue
            for key, row in zip(*loaded):
                self._rows[key.tobytes()] = row
        if damaged:  # removed, so the entries are computed and stored again rather than failing the run
            for part in damaged:
                with contextlib.suppress(OSError):
                    part.unlink()
            log.warning(
                f"{len(damaged)} damaged feature-cache part(s) in {self.directory} (first: {damaged[0].name}) "
                f"were removed; their features are computed again"
            )

    def __contains__(self, key: bytes) -> bool:
        return key in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, keys: list[bytes]) -> np.ndarray:
        return np.stack([self._rows[key] for key in keys]) if keys else np.zeros((0, model.FEATURE_SIZE), np.float32)

    def add(self, keys: list[bytes], features: np.ndarray) -> None:
        """Stores a part: written under a temporary name, renamed when complete."""
        if not keys:
            return
        name = f"part-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}.npz"
        with replacing(self.directory / name) as temporary, open(temporary, "wb") as handle:
            np.savez(handle, keys=np.frombuffer(b"".join(keys), np.uint8).reshape(len(keys), 32),
                     features=features.astype(np.float32))  # fmt: skip
        for key, row in zip(keys, features):
            self._rows[key] = row


def _load_part(part: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """A part's (keys, features), or None when it is damaged: truncated, not an .npz, or the wrong shapes."""
    from finetune.paths import NotReadable, read_regular_file

    try:
        with np.load(io.BytesIO(read_regular_file(part)), allow_pickle=False) as data:
            keys, values = data["keys"], data["features"]
    except (NotReadable, OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
        return None
    if keys.ndim != 2 or keys.shape[1] != 32 or values.shape != (len(keys), model.FEATURE_SIZE):
        return None
    return keys, values


@dataclass(frozen=True)
class Example:
    """One record of a split, in file order."""

    image_sha256: bytes
    label: int
    path: bytes  # as the record stores it: file names need not be UTF-8
    shard: int  # which of the split's shards holds it


def scan_split(info, split: str) -> list[Example]:
    """Reads a split's records in file order: each image's sha256, label and relative path."""
    from finetune.compat import tf

    examples = []
    for index, shard in enumerate(info.files(split)):
        for record in tf.compat.v1.io.tf_record_iterator(str(shard)):
            feature = tf.train.Example.FromString(record).features.feature
            examples.append(Example(
                image_sha256=hashlib.sha256(feature["image/encoded"].bytes_list.value[0]).digest(),
                label=int(feature["image/class/label"].int64_list.value[0]),
                path=feature["image/filename"].bytes_list.value[0],
                shard=index,
            ))  # fmt: skip
    return examples


@dataclass
class ExtractionReport:
    computed: int
    reused: int
    seconds: float  # all of it: graph, restore, every batch
    images_per_second: float  # steady rate after the first batch (which pays for warm-up), like a benchmark's
    directory: str


def extract(
    cache: FeatureCache,
    info,
    checkpoint: model.Checkpoint,
    image_size: int,
    examples: dict[str, list[Example]],
    jobs: list[tuple[str, int | None]],
    seed: int,
    device: str,
    session_config,
    compute_dtype: str = "float32",
) -> ExtractionReport:
    """Computes the missing entries for each (split, view) job in one forward pass per job, then stores them.

    ``examples`` are each split's records as scan_split read them; ``view`` None is the evaluation
    transform, an integer k augmented view k of each image.
    """
    from finetune.compat import tf
    from finetune.dataset import default_workers, pipeline_options, record_stream, transform_record
    from finetune.progress import Progress

    plans = []
    for split, view in jobs:
        keys = [entry_key(e.image_sha256, view, seed) for e in examples[split]]
        missing = np.array([key not in cache for key in keys])
        pairs = np.array([view_seed(e.image_sha256, view or 0, seed) for e in examples[split]], np.int64)
        pairs = pairs.reshape(-1, 2)
        plans.append((split, view, keys, missing, pairs))
    todo = int(sum(plan[3].sum() for plan in plans))
    reused = sum(len(plan[2]) for plan in plans) - todo
    started = time.monotonic()
    if todo:
        with tf.Graph().as_default() as graph:
            pipelines, wanted_keys = [], []
            for split, view, keys, missing, pairs in (plan for plan in plans if plan[3].any()):

                def prepare(record, pair, augment=view is not None):
                    return transform_record(record, pair, image_size=image_size, augment=augment)["image"]

                records = record_stream(info, split, shuffle=False).map(lambda record, _: record)
                wanted = tf.data.Dataset.from_tensor_slices((missing, pairs))
                pipelines.append(
                    tf.data.Dataset.zip(records, wanted)
                    .filter(lambda record, extra: extra[0])
                    .map(lambda record, extra, prepare=prepare: prepare(record, extra[1]),
                         num_parallel_calls=default_workers(), deterministic=True)
                )  # fmt: skip
                wanted_keys += [key for key, m in zip(keys, missing) if m]
            # One pipeline and one network for every pass: batches may straddle passes, order is kept.
            images = pipelines[0]
            for more in pipelines[1:]:
                images = images.concatenate(more)
            images = images.batch(EXTRACTION_BATCH).prefetch(2).with_options(pipeline_options())
            batch = tf.compat.v1.data.make_one_shot_iterator(images).get_next()
            with tf.device(device):
                net = model.build(batch, 2, compute_dtype=compute_dtype, restored=True)
            restore = model.variables_to_restore(model.HEAD_SCOPES)
            with tf.compat.v1.Session(graph=graph, config=session_config) as session:
                model.restore(session, restore, checkpoint)
                computed, first_batch_done = [], None
                with Progress("extract features", todo) as progress:
                    while True:
                        try:
                            computed.append(session.run(net.features))
                        except tf.errors.OutOfRangeError:
                            break
                        first_batch_done = first_batch_done or time.monotonic()
                        progress.advance(len(computed[-1]))
                steady = time.monotonic() - first_batch_done
            cache.add(wanted_keys, np.concatenate(computed))
    seconds = time.monotonic() - started
    rate = 0.0
    if todo > EXTRACTION_BATCH and steady > 0:
        rate = (todo - EXTRACTION_BATCH) / steady
    elif todo:
        rate = todo / seconds
    return ExtractionReport(todo, reused, seconds, rate, str(cache.directory))
