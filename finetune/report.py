"""The evaluation report: one self-contained HTML file a user can open from disk, mail, print or attach.

``evaluate`` writes ``eval-<split>.html`` beside ``eval-<split>.json``. The file carries everything inline:
thumbnails as ``data:`` JPEGs, charts as SVG, a few lines of plain JavaScript to sort the per-class table,
and a Content-Security-Policy that forbids loading anything at all, so it opens the same from an email
attachment as from the run's folder. What it shows, top to bottom:

- the headline numbers: top-1 (and top-5 with more than 5 classes), examples, checkpoint and step, dataset;
- per-class precision, recall, F1 and support, worst F1 first, sortable by any column;
- the confusion matrix with counts, each cell a link to the list of its examples;
- the most confident mistakes (``--mistakes``) and a few confident correct examples per class: each picture as
  the network saw it beside its Grad-CAM heat map (see finetune/gradcam.py), true and predicted class,
  confidence, the top 3 and the file;
- training curves (loss, accuracies, learning rate) from the run's TensorBoard events, for a train dir;
- a reliability diagram and the expected calibration error (15 equal-width confidence bins).

Its size stays bounded whatever the split: at most MAX_MISTAKE_PICTURES + MAX_CORRECT_PICTURES small JPEGs,
and at most MAX_LISTED file names under the confusion matrix's cells.
"""

from __future__ import annotations

import base64
import html
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
import numpy as np

from finetune.files import write_text_atomically

log = logging.getLogger("finetune")

CALIBRATION_BINS = 15
THUMBNAIL = 128  # pixels per side of each picture in the gallery
MAX_MISTAKE_PICTURES = 100  # --mistakes beyond this are listed in the JSON, not drawn
MAX_CORRECT_PICTURES = 60  # over all classes
MAX_LISTED = 2000  # file names listed under the confusion matrix's cells, over all cells
LISTED_PER_CELL = 12
MAX_MATRIX_CLASSES = 40  # above this the matrix is too big to read; the most confused pairs are listed


@dataclass
class Picture:
    """One gallery entry: which example, and its picture (plain | Grad-CAM) as JPEG bytes."""

    index: int  # the example's position in the split
    jpeg: bytes
    explained: str  # the class its heat map explains


@dataclass
class ReportResult:
    path: Path
    size_bytes: int
    seconds: float
    warnings: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- numbers


def calibration(probabilities: np.ndarray, labels: np.ndarray, bins: int = CALIBRATION_BINS):
    """Expected calibration error and the reliability diagram's bins, from the top class's probability.

    Returns ``(ece, rows)``, rows as ``(low, high, count, accuracy, mean confidence)`` for each of ``bins``
    equal-width confidence bins. The ECE and the bins are finetune/calibration.py's, so the report, the JSON
    (``ece``) and the command's output give one number.
    """
    from finetune import calibration as calibration_mod

    edges = np.linspace(0.0, 1.0, bins + 1)
    shares = calibration_mod.reliability(probabilities, labels, bins)
    rows = [(float(edges[b]), float(edges[b + 1]), int(round(share * len(labels))),
             0.0 if np.isnan(accuracy) else accuracy, 0.0 if np.isnan(confidence) else confidence)
            for b, (share, confidence, accuracy) in enumerate(shares)]  # fmt: skip
    return calibration_mod.expected_calibration_error(probabilities, labels, bins), rows


def select_examples(probabilities: np.ndarray, labels: np.ndarray, mistakes: int, correct_per_class: int):
    """Indices of the most confident mistakes (as the JSON lists them) and of confident correct examples.

    Correct examples: up to ``correct_per_class`` per class, most confident first, classes in order, at most
    MAX_CORRECT_PICTURES in all.
    """
    predicted = probabilities.argmax(axis=1)
    confidence = probabilities[np.arange(len(labels)), predicted]
    wrong = np.flatnonzero(predicted != labels)
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")][:mistakes]
    correct: list[int] = []
    for label in range(probabilities.shape[1]):
        hits = np.flatnonzero((predicted == labels) & (labels == label))
        hits = hits[np.argsort(-confidence[hits], kind="stable")][:correct_per_class]
        correct.extend(int(i) for i in hits)
    return [int(i) for i in wrong], correct[:MAX_CORRECT_PICTURES]


def read_curves(train_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], list[str]]:
    """Every scalar in the train dir's TensorBoard event files, by tag, as (step, value) sorted by step.

    A step written twice (a resumed run) keeps its last value. Returns the curves and warnings for event
    files that could not be read to the end.
    """
    from finetune.compat import tf

    values: dict[str, dict[int, float]] = {}
    warnings = []
    for events in sorted(Path(train_dir).glob("events.out.tfevents.*")):
        try:
            for event in tf.compat.v1.train.summary_iterator(str(events)):
                for value in event.summary.value:
                    if value.HasField("simple_value"):
                        values.setdefault(value.tag, {})[int(event.step)] = float(value.simple_value)
        except (tf.errors.DataLossError, tf.errors.OpError) as exc:
            warnings.append(f"{events}: read only in part ({type(exc).__name__}); its curves may stop early")
    return {tag: sorted(points.items()) for tag, points in values.items()}, warnings


# ---------------------------------------------------------------------------------------------- the HTML


def escape(value) -> str:
    """Text escaped for HTML content and attribute values alike."""
    return html.escape(str(value), quote=True)


_e = escape


_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans",sans-serif;color:#1b1b1b;
margin:0 auto;max-width:1180px;padding:16px 24px;background:#fff}
h1{font-size:22px;margin:8px 0}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:14px;margin:12px 0 4px}
.headline{display:flex;flex-wrap:wrap;gap:12px}.stat{border:1px solid #ddd;border-radius:6px;padding:8px 14px}
.stat b{display:block;font-size:22px}.meta{color:#555;font-size:13px;word-break:break-all}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}td,th{padding:3px 10px;border-bottom:1px solid #eee;
text-align:right}td:first-child,th:first-child{text-align:left}th{cursor:pointer;background:#f6f6f6}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(270px,1fr));gap:10px}
figure{margin:0;border:1px solid #ddd;border-radius:6px;padding:6px;break-inside:avoid;page-break-inside:avoid}
figure img{width:100%;height:auto;image-rendering:auto}figcaption{font-size:12.5px}
figure.mistake{border-color:#e0a0a0}figure.correct{border-color:#a0c8a0}
code{font-size:12px;word-break:break-all}.charts{display:flex;flex-wrap:wrap;gap:14px}
svg text{font-family:inherit}.cell:hover rect{stroke:#000;stroke-width:2}
.note{color:#8a5a00}ul.files{columns:2;font-size:12.5px}
.group{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:10px;margin:8px 0 16px}
@media print{body{max-width:none;padding:0}th{cursor:auto}a{color:inherit;text-decoration:none}}
"""

_SCRIPT = """
document.querySelectorAll('table.sortable th').forEach(function (th, column) {
  th.addEventListener('click', function () {
    var body = th.closest('table').tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var ascending = th.getAttribute('data-order') !== 'asc';
    th.setAttribute('data-order', ascending ? 'asc' : 'desc');
    rows.sort(function (a, b) {
      var x = a.cells[column].getAttribute('data-value'), y = b.cells[column].getAttribute('data-value');
      var nx = parseFloat(x), ny = parseFloat(y);
      var order = (isNaN(nx) || isNaN(ny)) ? x.localeCompare(y) : nx - ny;
      return ascending ? order : -order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  });
});
"""


def jpeg_data_url(jpeg: bytes) -> str:
    """A picture inline, as the page's Content-Security-Policy allows (``img-src data:``)."""
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def headline(stats: list[tuple[str, str]]) -> str:
    """The row of boxed numbers at the top of a page."""
    boxes = "".join(f'<div class="stat" id="stat-{_e(name.replace(" ", "-"))}">{_e(name)}<b>{_e(value)}</b></div>'
                    for name, value in stats)  # fmt: skip
    return f'<div class="headline">{boxes}</div>'


def page(title: str, body: list[str], sortable: bool = False) -> str:
    """A whole self-contained page in the report's style: its shell, style sheet and (for ``table.sortable``)
    its few lines of script. Every finetune HTML page (the evaluation report, the audit) is made here."""
    head = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        # Nothing may load from anywhere: the file must look the same offline and as an attachment.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>",
    ]
    tail = f"<script>{_SCRIPT}</script></body></html>" if sortable else "</body></html>"
    return "\n".join(head + body + [tail]) + "\n"


def _per_class_table(evaluation) -> str:
    rows = sorted(evaluation.per_class, key=lambda row: (row.f1, row.name))
    lines = [
        '<table class="sortable" id="per-class"><thead><tr><th>class</th><th>precision</th><th>recall</th>'
        "<th>F1</th><th>support</th></tr></thead><tbody>"
    ]
    for row in rows:
        lines.append(
            f'<tr><td data-value="{_e(row.name)}">{_e(row.name)}</td>'
            + "".join(f'<td data-value="{v:.6f}">{v:.3f}</td>' for v in (row.precision, row.recall, row.f1))
            + f'<td data-value="{row.support}">{row.support}</td></tr>'
        )
    lines.append("</tbody></table>")
    return "\n".join(lines)


def _confusion_svg(confusion: np.ndarray, classes: list[str]) -> str:
    """The matrix as SVG: rows true, columns predicted, a count in each cell, each cell a link to its examples."""
    n = len(classes)
    cell = max(34, 9 * len(str(int(confusion.max(initial=0)))) + 14)
    label = min(220, max(7.5 * max(len(name) for name in classes), 40) + 12)
    left, top = label + 24, label + 24
    width, height = left + n * cell + 10, top + n * cell + 10
    rows = confusion.sum(axis=1, keepdims=True).clip(min=1)
    parts = [f'<svg id="confusion" xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
             f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="confusion matrix">']  # fmt: skip
    parts.append(f'<text x="{left}" y="14" font-size="12">predicted →</text>')
    parts.append(f'<text transform="translate(14,{top}) rotate(90)" font-size="12">true →</text>')
    for r in range(n):
        y = top + r * cell
        parts.append(f'<text x="{left - 6}" y="{y + cell / 2 + 4:.0f}" text-anchor="end" font-size="12">'
                     f"{_e(_short(classes[r]))}<title>{_e(classes[r])}</title></text>")  # fmt: skip
        for c in range(n):
            x = left + c * cell
            count = int(confusion[r, c])
            share = count / rows[r, 0]
            shade = int(255 - 190 * share)
            colour = f"rgb({shade},{shade},255)" if r == c else f"rgb(255,{shade},{shade})"
            ink = "#fff" if share > 0.6 else "#000"
            parts.append(
                f'<a class="cell" href="#cell-{r}-{c}"><rect x="{x}" y="{y}" width="{cell}" height="{cell}" '
                f'fill="{colour}" stroke="#bbb"/><text class="count" x="{x + cell / 2:.0f}" y="{y + cell / 2 + 4:.0f}" '
                f'text-anchor="middle" font-size="12" fill="{ink}">{count}</text>'
                f"<title>true {_e(classes[r])}, predicted {_e(classes[c])}: {count}</title></a>"
            )
    for c in range(n):
        x = left + c * cell + cell / 2 + 4
        parts.append(f'<text transform="translate({x:.0f},{top - 6}) rotate(-90)" font-size="12">'
                     f"{_e(_short(classes[c]))}<title>{_e(classes[c])}</title></text>")  # fmt: skip
    parts.append("</svg>")
    return "".join(parts)


def _short(name: str, limit: int = 28) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _line_chart(title: str, series: dict[str, list[tuple[int, float]]], log_scale: bool = False) -> str:
    """A small SVG line chart of (step, value) series, with the axes' ranges written at their ends."""
    width, height, pad = 380, 210, 44
    colours = ["#1f5fbf", "#d0452b", "#2a9d4b", "#8a4fbf", "#c28a00", "#555"]
    points = [(s, v) for values in series.values() for s, v in values if not log_scale or v > 0]
    if not points:
        return ""
    transform = (lambda v: np.log10(v)) if log_scale else (lambda v: v)
    steps = [s for s, _ in points]
    ys = [transform(v) for _, v in points]
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5, y1 + 0.5
    sx = lambda s: pad + (s - x0) / (x1 - x0) * (width - pad - 10)  # noqa: E731
    sy = lambda v: height - 28 - (transform(v) - y0) / (y1 - y0) * (height - 48)  # noqa: E731
    label = (lambda v: f"{10 ** v:.2g}") if log_scale else (lambda v: f"{v:.3g}")
    parts = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">'
             f'<text x="{pad}" y="13" font-size="13" font-weight="600">{_e(title)}</text>'
             f'<rect x="{pad}" y="20" width="{width - pad - 10}" height="{height - 48}" fill="none" stroke="#ccc"/>'
             f'<text x="{pad - 4}" y="26" font-size="10" text-anchor="end">{label(y1)}</text>'
             f'<text x="{pad - 4}" y="{height - 28}" font-size="10" text-anchor="end">{label(y0)}</text>'
             f'<text x="{pad}" y="{height - 14}" font-size="10">step {x0}</text>'
             f'<text x="{width - 10}" y="{height - 14}" font-size="10" text-anchor="end">{x1}</text>']  # fmt: skip
    for number, (name, values) in enumerate(series.items()):
        values = [(s, v) for s, v in values if not log_scale or v > 0]
        colour = colours[number % len(colours)]
        if len(values) == 1:
            s, v = values[0]
            parts.append(f'<circle cx="{sx(s):.1f}" cy="{sy(v):.1f}" r="3" fill="{colour}"/>')
        elif values:
            line = " ".join(f"{sx(s):.1f},{sy(v):.1f}" for s, v in values)
            parts.append(f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="1.6"/>')
        parts.append(f'<text x="{width - 14}" y="{36 + 13 * number}" font-size="11" text-anchor="end" '
                     f'fill="{colour}">{_e(name)} (last {values[-1][1]:.4g})</text>' if values else "")  # fmt: skip
    parts.append("</svg>")
    return "".join(parts)


def _curves_html(curves: dict[str, list[tuple[int, float]]]) -> str:
    """Loss, accuracy and learning-rate charts from whichever scalar tags the run wrote."""
    groups = {
        "loss": {t: v for t, v in curves.items() if "loss" in t},
        "accuracy (train and validation)": {t: v for t, v in curves.items() if "accuracy" in t},
        "learning rate": {t: v for t, v in curves.items() if "learning_rate" in t or t in ("lr", "learning rate")},
    }
    charts = [_line_chart(title, series, log_scale=title == "learning rate") for title, series in groups.items()
              if series]  # fmt: skip
    return '<div class="charts">' + "".join(charts) + "</div>"


def _reliability_svg(rows, ece: float) -> str:
    """Accuracy per confidence bin against the diagonal a calibrated model would follow."""
    size, pad = 260, 36
    inner = size - pad - 10
    parts = [f'<svg id="reliability" xmlns="http://www.w3.org/2000/svg" width="{size + 150}" height="{size + 10}">',
             f'<rect x="{pad}" y="10" width="{inner}" height="{inner}" fill="none" stroke="#ccc"/>',
             f'<line x1="{pad}" y1="{10 + inner}" x2="{pad + inner}" y2="10" stroke="#999" stroke-dasharray="4 3"/>',
             f'<text x="{pad}" y="{size + 4}" font-size="10">confidence 0</text>',
             f'<text x="{pad + inner}" y="{size + 4}" font-size="10" text-anchor="end">1</text>',
             f'<text x="{pad - 4}" y="16" font-size="10" text-anchor="end">1</text>',
             f'<text x="{pad - 4}" y="{10 + inner}" font-size="10" text-anchor="end">0</text>']  # fmt: skip
    for low, high, count, accuracy, confidence in rows:
        if not count:
            continue
        x, w = pad + low * inner, (high - low) * inner
        h = accuracy * inner
        parts.append(f'<rect x="{x:.1f}" y="{10 + inner - h:.1f}" width="{w - 1:.1f}" height="{h:.1f}" '
                     f'fill="#1f5fbf" fill-opacity="0.75"><title>confidence {low:.2f}-{high:.2f}: {count} examples, '
                     f"accuracy {accuracy:.3f}, mean confidence {confidence:.3f}</title></rect>")  # fmt: skip
    parts.append(f'<text x="{size + 2}" y="30" font-size="12">ECE {ece:.4f}</text>'
                 f'<text x="{size + 2}" y="48" font-size="11" fill="#555">{len(rows)} bins</text>'
                 f'<text x="{size + 2}" y="64" font-size="11" fill="#555">dashed: calibrated</text></svg>')  # fmt: skip
    return "".join(parts)


def _figure(kind: str, index: int, picture: Picture | None, evaluation, probabilities: np.ndarray) -> str:
    example = evaluation.predictions[index]
    best = np.argsort(-probabilities[index])[:3]
    top = ", ".join(f"{_e(evaluation.classes[i])} {probabilities[index, i]:.3f}" for i in best)
    image = ""
    if picture is not None:
        image = (f'<img src="{jpeg_data_url(picture.jpeg)}" '
                 f'alt="{_e(example.path)}: as the network saw it, and Grad-CAM for '
                 f'{_e(picture.explained)}">')  # fmt: skip
    return (
        f'<figure class="{kind}" id="example-{index}">{image}<figcaption>'
        f"true <b>{_e(example.label)}</b>, predicted <b>{_e(example.predicted)}</b> ({example.confidence:.3f})<br>"
        f"top-3: {top}<br><code>{_e(example.path)}</code></figcaption></figure>"
    )


def _cell_lists(evaluation, labels: np.ndarray, predicted: np.ndarray, shown: set[int]) -> str:
    """Under the matrix: for each non-empty cell, an anchor and its examples (bounded), gallery ones linked."""
    parts, listed = [], 0
    n = len(evaluation.classes)
    confidence = np.array([p.confidence for p in evaluation.predictions])
    for r in range(n):
        for c in range(n):
            members = np.flatnonzero((labels == r) & (predicted == c))
            if not len(members):
                continue
            members = members[np.argsort(-confidence[members], kind="stable")]
            title = f"true {_e(evaluation.classes[r])}, predicted {_e(evaluation.classes[c])}: {len(members)}"
            items = []
            for i in members[: max(0, min(LISTED_PER_CELL, MAX_LISTED - listed))]:
                path = f"<code>{_e(evaluation.predictions[i].path)}</code> ({confidence[i]:.3f})"
                items.append(f'<li><a href="#example-{i}">{path}</a></li>' if int(i) in shown else f"<li>{path}</li>")
            listed += len(items)
            more = f"<p>and {len(members) - len(items)} more (every example is in the JSON report)</p>" \
                if len(members) > len(items) else ""  # fmt: skip
            parts.append(f'<div id="cell-{r}-{c}"><h3>{title}</h3><ul class="files">{"".join(items)}</ul>{more}</div>')
    return "".join(parts)


def render(
    evaluation,
    probabilities: np.ndarray,
    labels: np.ndarray,
    pictures: dict[int, Picture],
    mistakes: list[int],
    correct: list[int],
    curves: dict[str, list[tuple[int, float]]] | None,
    notes: list[str] = (),
) -> str:
    """The report's HTML from an Evaluation, its probabilities and labels, and the gallery's pictures."""
    classes = evaluation.classes
    predicted = probabilities.argmax(axis=1)
    ece, bins = calibration(probabilities, labels)
    where = f"step {evaluation.global_step}" if evaluation.global_step is not None else "exported model"
    stats = [("top-1", f"{evaluation.top1:.4f}")]
    if getattr(evaluation, "tta", "none") != "none":
        stats = [(f"top-1 ({evaluation.tta} TTA)", f"{evaluation.top1:.4f}"),
                 ("top-1 without TTA", f"{evaluation.top1_without_tta:.4f}")]  # fmt: skip
    if evaluation.top5 is not None:
        stats.append(("top-5", f"{evaluation.top5:.4f}"))
    stats += [("examples", f"{evaluation.examples:,}"), ("classes", str(len(classes))), ("ECE", f"{ece:.4f}"),
              ("mistakes", f"{int((predicted != labels).sum()):,}")]  # fmt: skip
    title = f"{evaluation.split}: top-1 {evaluation.top1:.4f} ({where})"
    out = [
        f"<h1>Evaluation on the {_e(evaluation.split)} split</h1>",
        headline(stats),
        f'<p class="meta">model: <code>{_e(evaluation.source)}</code> ({_e(where)}, {_e(evaluation.precision)})<br>'
        f"dataset: <code>{_e(evaluation.dataset)}</code> (fingerprint {_e(evaluation.dataset_fingerprint[:16])})<br>"
        f"{evaluation.examples:,} examples in {evaluation.seconds:.1f} s "
        f"({evaluation.images_per_second:.1f} images/s)</p>",
    ]
    out += [f'<p class="note">{_e(note)}</p>' for note in notes]
    out += ["<h2>Per class (worst F1 first; click a heading to sort)</h2>", _per_class_table(evaluation)]
    out.append("<h2>Confusion matrix (rows: true, columns: predicted; click a cell for its examples)</h2>")
    matrix = np.asarray(evaluation.confusion)
    if len(classes) <= MAX_MATRIX_CLASSES:
        out.append(_confusion_svg(matrix, classes))
    else:
        n = len(classes)
        off = [(int(matrix[r, c]), r, c) for r in range(n) for c in range(n) if r != c and matrix[r, c]]
        off.sort(reverse=True)
        out.append(f"<p>{len(classes)} classes are too many to draw; the 50 most confused pairs:</p><ul>"
                   + "".join(f'<li><a href="#cell-{r}-{c}">{_e(classes[r])} taken for {_e(classes[c])}: {n}</a></li>'
                             for n, r, c in off[:50]) + "</ul>")  # fmt: skip
    shown = set(pictures)
    out.append(f'<h2 id="mistakes">The most confident mistakes ({len(mistakes)})</h2>')
    out.append("<p>Each picture as the network saw it (eval crop), and beside it the Grad-CAM heat map of "
               "InceptionV3/Mixed_7c for the predicted class: red is where the evidence for it was.</p>")  # fmt: skip
    out.append('<div class="gallery" id="mistake-gallery">'
               + "".join(_figure("mistake", i, pictures.get(i), evaluation, probabilities) for i in mistakes)
               + "</div>" if mistakes else "<p>No mistakes.</p>")  # fmt: skip
    out.append(f'<h2 id="correct">Correct examples, for contrast ({len(correct)})</h2>')
    out.append('<div class="gallery" id="correct-gallery">'
               + "".join(_figure("correct", i, pictures.get(i), evaluation, probabilities) for i in correct)
               + "</div>")  # fmt: skip
    if curves:
        out += ["<h2>Training curves</h2>", _curves_html(curves)]
    out += ["<h2>Calibration</h2>",
            "<p>Examples binned by the predicted class's probability: bar height is the share right in the bin; "
            "a calibrated model's bars reach the dashed line. ECE is the example-weighted mean gap.</p>",
            _reliability_svg(bins, ece)]  # fmt: skip
    out += ["<h2>Examples by cell of the confusion matrix</h2>", _cell_lists(evaluation, labels, predicted, shown)]
    return page(f"finetune evaluation — {title}", out, sortable=True)


# ------------------------------------------------------------------------------------------------ writing


def split_images(info, split: str, image_size: int, indices: list[int]) -> dict[int, tuple[np.ndarray, str]]:
    """The chosen examples of a split (by position in file order) as the eval transform gives them, with paths.

    Records are read in file order and only the chosen ones are decoded.
    """
    from finetune.compat import tf
    from finetune.dataset import record_stream, transform_record

    wanted = sorted(set(indices))
    if not wanted:
        return {}
    found = {}
    with tf.Graph().as_default():
        stream = record_stream(info, split, shuffle=False).enumerate()
        chosen = tf.constant(np.array(wanted, np.int64))
        stream = stream.filter(lambda i, item: tf.reduce_any(tf.equal(chosen, i)))
        stream = stream.map(lambda i, item: (i, transform_record(*item, image_size=image_size, augment=False)))
        following = tf.compat.v1.data.make_one_shot_iterator(stream.batch(32)).get_next()
        with tf.compat.v1.Session() as session:
            while True:
                try:
                    positions, example = session.run(following)
                except tf.errors.OutOfRangeError:
                    break
                for position, image, path in zip(positions, example["image"], example["path"]):
                    found[int(position)] = (image, path.decode("utf-8", "replace"))
    return found


def write_report(
    path: Path,
    evaluation,
    probabilities: np.ndarray,
    labels: np.ndarray,
    info,
    image_size: int,
    heat_maps: np.ndarray | None,
    train_dir: Path | None,
    correct_per_class: int,
) -> ReportResult:
    """Draws the gallery, reads the curves, writes the HTML atomically.

    ``heat_maps`` are the Grad-CAM maps of every example of the split ([N, h, w], in split order), as the
    evaluation pass computed them; None draws the pictures alone, with a note.
    """
    from finetune import gradcam

    started = time.monotonic()
    notes, warnings = [], []
    if heat_maps is None:
        notes.append("no Grad-CAM heat maps: this model's format gives no gradients; pictures alone")
    elif len(heat_maps) != len(labels):
        raise ValueError(f"heat maps for {len(heat_maps)} examples, but the split has {len(labels)}")
    mistakes, correct = select_examples(probabilities, labels, len(evaluation.most_confident_mistakes),
                                        correct_per_class)  # fmt: skip
    if len(mistakes) > MAX_MISTAKE_PICTURES:
        notes.append(f"{len(mistakes)} mistakes asked for; the first {MAX_MISTAKE_PICTURES} are drawn "
                     "(all are in the JSON report)")  # fmt: skip
    drawn = mistakes[:MAX_MISTAKE_PICTURES] + correct
    images = split_images(info, evaluation.split, image_size, drawn)
    pictures: dict[int, Picture] = {}
    if images:
        order = [i for i in drawn if i in images]
        for i in order:
            image = images[i][0]
            heat_map = None if heat_maps is None else heat_maps[i]
            if images[i][1] != evaluation.predictions[i].path:  # never put one file's picture under another's name
                expected = evaluation.predictions[i].path
                warnings.append(f"report: example {i} read back as {images[i][1]}, not {expected}; not drawn")
                continue
            if heat_map is None:
                picture = gradcam.thumbnail(image, THUMBNAIL)
            else:
                picture = gradcam.side_by_side(image, heat_map, THUMBNAIL)
            pictures[i] = Picture(i, gradcam.jpeg_bytes(picture), evaluation.predictions[i].predicted)
    curves = None
    if train_dir is not None:
        curves, curve_warnings = read_curves(train_dir)
        warnings += curve_warnings
    text = render(evaluation, probabilities, labels, pictures, mistakes, correct, curves, notes)
    write_text_atomically(path, text)
    return ReportResult(Path(path), len(text.encode("utf-8")), time.monotonic() - started, warnings)
