"""Likely label errors and near-duplicates across classes in a built dataset: `finetune audit`.

How the label errors are found:

1. **Features** of every train and validation image under the evaluation transform, from the feature cache
   (finetune/features.py): computed once per backbone, shared with `finetune train --feature-cache`.
2. **K-fold heads.** The images are dealt into K folds per class (lr_search.fold_of_each: each class spread
   evenly, a class with one image never held out), and for each fold a linear softmax head (the network's own
   head: 2048 features to the classes) is fitted on the other folds' images. Each image is then judged by a
   head that never saw it: its out-of-fold probabilities.
3. **The rule** is confident learning's (Northcutt et al., 2021): per class j, a threshold ``t_j``, the mean
   out-of-fold probability of j over the images labelled j (how confident the heads are, on average, about
   a class's own images). An image labelled y is a likely label error when some other class j reaches its
   own threshold (p_j >= t_j) and is the most probable of the classes that do; j is the suggested label.
   Per-class thresholds, rather than one cut-off, keep a class the heads find hard (low probabilities for
   all its images) from flooding the list and an easy one from hiding its errors. The list is ranked by the
   probability of the given label, lowest first (the least the heads believe the label).

Near-duplicates across classes (the same photo filed under two labels) come from dataset.json, where
build-dataset listed them; a dataset built before near-duplicate hashing (format version 1) has none, and the
audit says so and how to rebuild.

Writes ``audit.json`` (everything) and ``audit.html`` (a self-contained page with thumbnails) into ``--out``.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from finetune.config import AuditConfig
from finetune.errors import DataError
from finetune.files import write_text_atomically

log = logging.getLogger("finetune")

HEAD_STEPS = 300  # full-batch steps of a fold's head: the loss has flattened well before on every set tried
HEAD_LEARNING_RATE = 0.01  # Adam, on standardised features
HEAD_WEIGHT_DECAY = 1e-3  # a little L2: out-of-fold probabilities should not be overconfident


@dataclass
class LabelIssue:
    """An image whose given label the out-of-fold heads doubt."""

    path: str
    given: str
    suggested: str
    given_probability: float  # out-of-fold probability of the given label
    suggested_probability: float
    split: str


@dataclass
class AuditResult:
    dataset: str
    out_json: str
    out_html: str
    images: int  # train and validation images read
    judged: int  # images held out by a fold (a class's only image is not)
    folds: int
    out_of_fold_accuracy: float  # how often the held-out head agrees with the given label
    thresholds: dict[str, float]  # class -> t_j
    label_issues: list[LabelIssue]  # ranked, most doubtful first
    cross_class_duplicates: list[dict] | None  # None: the dataset holds no near-duplicate hashes
    near_duplicates_note: str | None  # what could not be checked, and how to fix that
    extraction_seconds: float
    kfold_seconds: float
    features_computed: int
    features_reused: int
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def train_fold_heads(
    features: np.ndarray, labels: np.ndarray, folds: np.ndarray, num_classes: int, session_config=None
) -> np.ndarray:
    """Out-of-fold class probabilities: row i from a head fitted without fold ``folds[i]``.

    Rows with fold -1 are never held out and get NaN. As in the learning-rate search (finetune/lr_search.py),
    every fold's head lives in one graph, [folds, 2048, classes] weights trained together: the update is
    element by element, so each head trains exactly as it would alone. A head is the network's own, a linear
    softmax layer on the features (standardised over all images; labels unused), fitted by HEAD_STEPS
    full-batch Adam steps on its fold's cross-entropy plus HEAD_WEIGHT_DECAY times half its squared weights.
    Deterministic: the heads start at zero and every step sees every image.
    """
    from finetune.compat import tf

    fold_ids = sorted(set(folds.tolist()) - {-1})
    x = (features - features.mean(axis=0)) / (features.std(axis=0) + 1e-6)
    fit = np.array([(folds != fold) for fold in fold_ids], np.float32)  # [folds, images]
    fit /= fit.sum(axis=1, keepdims=True)  # each fold's loss is its images' mean
    onehot = np.eye(num_classes, dtype=np.float32)[labels]
    with tf.Graph().as_default():
        table = tf.constant(x.astype(np.float32))
        weights = tf.compat.v1.Variable(tf.zeros([len(fold_ids), x.shape[1], num_classes]))
        biases = tf.compat.v1.Variable(tf.zeros([len(fold_ids), 1, num_classes]))
        logits = tf.einsum("nx,fxk->fnk", table, weights) + biases  # every head on every image
        cross_entropy = -tf.reduce_sum(onehot * tf.nn.log_softmax(logits), axis=-1)  # [folds, images]
        loss = tf.reduce_sum(fit * cross_entropy) + HEAD_WEIGHT_DECAY * 0.5 * tf.reduce_sum(tf.square(weights))
        train = tf.compat.v1.train.AdamOptimizer(HEAD_LEARNING_RATE).minimize(loss)
        # Log-probabilities, turned into float64 probabilities here: float32 ones round a confident head's
        # doubt to 0, and the ranking (by the given label's probability) would lose its order among them.
        log_probabilities = tf.nn.log_softmax(logits)
        with tf.compat.v1.Session(config=session_config) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            for _ in range(HEAD_STEPS):
                session.run(train)
            every = np.exp(session.run(log_probabilities).astype(np.float64))  # [folds, images, classes]
    probabilities = np.full((len(labels), num_classes), np.nan)
    for index, fold in enumerate(fold_ids):
        held = folds == fold
        probabilities[held] = every[index, held]
    return probabilities


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def find_label_issues(probabilities: np.ndarray, labels: np.ndarray, num_classes: int):
    """Confident learning's rule (see the module docstring).

    Returns:
        (rows of the likely label errors, most doubtful first; the suggested class of each; the per-class
        thresholds). Rows with NaN probabilities (never held out) are skipped.
    """
    judged = ~np.isnan(probabilities).any(axis=1)
    thresholds = np.ones(num_classes)
    for label in range(num_classes):
        own = judged & (labels == label)
        if own.any():
            thresholds[label] = probabilities[own, label].mean()
    rows, suggested = [], []
    for row in np.flatnonzero(judged):
        reach = probabilities[row] >= thresholds
        if not reach.any():
            continue
        best = int(np.argmax(np.where(reach, probabilities[row], -1.0)))
        if best != labels[row]:
            rows.append(int(row))
            suggested.append(best)
    order = sorted(range(len(rows)), key=lambda k: (probabilities[rows[k], labels[rows[k]]], rows[k]))
    return [rows[k] for k in order], [suggested[k] for k in order], thresholds


def _cross_class_duplicates(info) -> tuple[list[dict] | None, str | None]:
    """Sets of identical or near-duplicate images filed under more than one class, from dataset.json."""
    meta = info.metadata
    rebuild = (f"rebuild it with `finetune build-dataset IMAGE_DIR --out {info.root} --overwrite` "
               "(near-duplicate checking is on by default)")  # fmt: skip
    near = meta.get("near_duplicates")
    identical = meta.get("duplicates", {}).get("groups", [])
    groups = [{"paths": group, "pairs": [], "kind": "identical"} for group in identical]
    note = None
    if near is None:
        note = (f"{info.root} was built before near-duplicate checking (dataset.json version "
                f"{meta.get('version')}): only identical files across classes are shown; {rebuild}")  # fmt: skip
    elif not near.get("checked"):
        note = (f"{info.root} was built with --near-duplicates off: only identical files across classes are "
                f"shown; {rebuild}")  # fmt: skip
    else:
        groups += [{"paths": group["paths"], "pairs": group["pairs"], "kind": "near-duplicate"}
                   for group in near["groups"]]  # fmt: skip
    spanning = [group for group in groups if len({path.split("/")[0] for path in group["paths"]}) > 1]
    return (None if note and not spanning else spanning), note


def audit(config: AuditConfig) -> AuditResult:
    """Runs the audit (see the module docstring) and writes audit.json and audit.html.

    Raises:
        DataError: the dataset is missing or has fewer than two images in every class.
        CheckpointError: --checkpoint is missing or not an InceptionV3 checkpoint.
    """
    from finetune import features, lr_search, model
    from finetune.dataset import load_dataset
    from finetune.runtime import session_config

    started = time.monotonic()
    info = load_dataset(config.dataset, flag="DATASET")
    model.check_image_size(config.image_size)
    checkpoint = model.open_checkpoint(config.checkpoint)
    splits = [split for split in ("train", "validation") if info.split_counts.get(split)]
    cache_dir = Path(config.cache_dir) if config.cache_dir else features.default_cache_dir()
    cache = features.FeatureCache(cache_dir, features.backbone_digest(checkpoint.path), config.image_size)
    examples = {split: features.scan_split(info, split) for split in splits}
    report = features.extract(cache, info, checkpoint, config.image_size, examples,
                              [(split, None) for split in splits], config.seed, "/cpu:0", session_config())  # fmt: skip
    every = [(split, example) for split in splits for example in examples[split]]
    table = cache.get([features.entry_key(example.image_sha256, None, config.seed) for _, example in every])
    labels = np.array([example.label for _, example in every], np.int64)
    paths = [example.path for _, example in every]

    kfold_started = time.monotonic()
    folds = lr_search.fold_of_each(paths, labels, config.seed, folds=config.folds)
    if not (folds >= 0).any():
        raise DataError(f"DATASET {info.root}: every class has a single image; the audit needs at least 2 in a class")
    probabilities = train_fold_heads(table, labels, folds, info.num_classes, session_config())
    rows, suggested, thresholds = find_label_issues(probabilities, labels, info.num_classes)
    kfold_seconds = time.monotonic() - kfold_started
    judged = ~np.isnan(probabilities).any(axis=1)
    accuracy = float((probabilities[judged].argmax(1) == labels[judged]).mean())

    names = info.classes
    text = [path.decode("utf-8", "surrogateescape") for path in paths]
    issues = [
        LabelIssue(text[row], names[labels[row]], names[other], round(float(probabilities[row, labels[row]]), 4),
                   round(float(probabilities[row, other]), 4), every[row][0])  # fmt: skip
        for row, other in zip(rows, suggested)
    ]
    duplicates, note = _cross_class_duplicates(info)
    if note:
        log.warning(note)
    out = Path(config.out) if config.out else info.root.with_name(info.root.name + "-audit")
    out.mkdir(parents=True, exist_ok=True)
    result = AuditResult(
        dataset=str(info.root), out_json=str(out / "audit.json"), out_html=str(out / "audit.html"),
        images=len(every), judged=int(judged.sum()), folds=int(folds.max()) + 1,
        out_of_fold_accuracy=round(accuracy, 4),
        thresholds={name: round(float(t), 4) for name, t in zip(names, thresholds)},
        label_issues=issues, cross_class_duplicates=duplicates, near_duplicates_note=note,
        extraction_seconds=round(report.seconds, 3), kfold_seconds=round(kfold_seconds, 3),
        features_computed=report.computed, features_reused=report.reused,
    )  # fmt: skip
    result.seconds = round(time.monotonic() - started, 3)
    write_text_atomically(Path(result.out_json), json.dumps(asdict(result), indent=1) + "\n")
    wanted = {issue.path for issue in issues[: config.top]}
    for group in duplicates or []:
        wanted.update(group["paths"])
    write_text_atomically(Path(result.out_html), _html(result, _thumbnails(info, splits, wanted), config.top))
    return result


def summary_line(result: AuditResult) -> str:
    """The one line the CLI prints."""
    duplicates = ("near-duplicates not checked (see audit.json)" if result.cross_class_duplicates is None
                  else f"{len(result.cross_class_duplicates)} set(s) of copies across classes")  # fmt: skip
    return (
        f"audit of {result.dataset}: {len(result.label_issues)} likely label errors among {result.judged} images "
        f"judged by {result.folds}-fold heads (out-of-fold accuracy {result.out_of_fold_accuracy:.3f}), "
        f"{duplicates}; report {result.out_html}"
    )


def _thumbnails(info, splits: list[str], wanted: set[str]) -> dict[str, str]:
    """A small inline JPEG (data: URL) for each wanted path, read from the dataset's records."""
    from PIL import Image

    from finetune import report
    from finetune.compat import tf

    found: dict[str, str] = {}
    for split in splits:
        for shard in info.files(split):
            for record in tf.compat.v1.io.tf_record_iterator(str(shard)):
                feature = tf.train.Example.FromString(record).features.feature
                path = feature["image/filename"].bytes_list.value[0].decode("utf-8", "surrogateescape")
                if path not in wanted or path in found:
                    continue
                with Image.open(io.BytesIO(feature["image/encoded"].bytes_list.value[0])) as image:
                    small = image.convert("RGB")
                    small.thumbnail((report.THUMBNAIL, report.THUMBNAIL))
                    buffer = io.BytesIO()
                    small.save(buffer, format="JPEG", quality=80)
                found[path] = report.jpeg_data_url(buffer.getvalue())
    return found


def _issue_figure(rank: int, issue: LabelIssue, thumbnails: dict[str, str]) -> str:
    from finetune.report import escape as e

    source = thumbnails.get(issue.path)
    image = f'<img src="{source}" alt="{e(issue.path)}">' if source else ""
    return (
        f'<figure class="mistake" id="issue-{rank}">{image}<figcaption>#{rank} given <b>{e(issue.given)}</b> '
        f'(<span class="score">{issue.given_probability:.3f}</span>), suggested <b>{e(issue.suggested)}</b> '
        f"({issue.suggested_probability:.3f})<br><code>{e(issue.path)}</code> ({e(issue.split)})</figcaption></figure>"
    )


def _group_html(number: int, group: dict, thumbnails: dict[str, str]) -> str:
    from finetune.report import escape as e

    figures = []
    for path in group["paths"]:
        source = thumbnails.get(path)
        image = f'<img src="{source}" alt="{e(path)}">' if source else ""
        figures.append(f"<figure>{image}<figcaption>class <b>{e(path.split('/')[0])}</b><br>"
                       f"<code>{e(path)}</code></figcaption></figure>")  # fmt: skip
    pairs = "; ".join(f"{e(a)} and {e(b)}: {bits} bits apart" for a, b, bits in group["pairs"])
    detail = f"{e(group['kind'])}" + (f" ({pairs})" if pairs else "")
    return f'<h3>Set {number}: {detail}</h3><div class="group" id="copies-{number}">{"".join(figures)}</div>'


def _html(result: AuditResult, thumbnails: dict[str, str], top: int) -> str:
    """The audit's page, in the evaluation report's style (finetune/report.py owns the shell and the style)."""
    from finetune.report import escape as e
    from finetune.report import headline, page

    copies = result.cross_class_duplicates
    shown = result.label_issues[:top]
    stats = [("images", f"{result.images:,}"), ("judged", f"{result.judged:,}"), ("folds", str(result.folds)),
             ("out-of-fold accuracy", f"{result.out_of_fold_accuracy:.3f}"),
             ("likely label errors", f"{len(result.label_issues):,}"),
             ("copies across classes", "not checked" if copies is None else str(len(copies)))]  # fmt: skip
    body = [
        f"<h1>Audit of <code>{e(result.dataset)}</code></h1>",
        headline(stats),
        f'<p class="meta">train and validation images; features in {result.extraction_seconds:.1f} s '
        f"({result.features_computed} computed, {result.features_reused} from the cache), "
        f"{result.folds}-fold heads in {result.kfold_seconds:.1f} s; everything is in "
        f"<code>{e(result.out_json)}</code></p>",
        f'<h2 id="label-errors">Likely label errors ({len(result.label_issues)}; the first {len(shown)} shown)</h2>',
        "<p>Each image is judged by a head trained without it. Listed when another class reaches its own "
        "confident-learning threshold (the mean probability the heads give that class's own images) and is the "
        "most probable such class; ranked by the score, the out-of-fold probability of the given label, lowest "
        "first. A list to look through, not a verdict.</p>",
        '<div class="gallery" id="issue-gallery">'
        + "".join(_issue_figure(rank, issue, thumbnails) for rank, issue in enumerate(shown, 1))
        + "</div>" if shown else "<p>None found.</p>",
        f'<h2 id="copies">Copies across classes ({"not checked" if copies is None else len(copies)})</h2>',
        "<p>The same photo (identical, or a near-duplicate: resized, re-encoded, slightly cropped, grey) filed "
        "under more than one class.</p>",
    ]  # fmt: skip
    if result.near_duplicates_note:
        body.append(f'<p class="note">{e(result.near_duplicates_note)}</p>')
    body += [_group_html(number, group, thumbnails) for number, group in enumerate(copies or [], 1)]
    return page(f"finetune audit — {result.dataset}", body)
