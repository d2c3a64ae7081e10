"""The `finetune` command line: parses flags into a command's config, runs it, prints the result.

This is the only module that prints results or exits. A FinetuneError becomes one `error: ...` line on
stderr and exit 1; Ctrl-C exits 130. Heavy modules (TensorFlow) are imported only when a command runs, so
`finetune --help` is instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from finetune import __version__
from finetune.config import (
    TRAIN_OPTION_GROUPS,
    AuditConfig,
    BuildDatasetConfig,
    DownloadConfig,
    EvaluateConfig,
    ExplainConfig,
    ExportConfig,
    PredictConfig,
    PreviewConfig,
    QuickstartConfig,
    TrainConfig,
)
from finetune.errors import FinetuneError, translated_command_errors
from finetune.paths import check_path_flags

log = logging.getLogger("finetune")


@dataclass(frozen=True)
class Command:
    """A subcommand: its config dataclass and the function that runs it and prints its result."""

    name: str
    help: str
    config: type
    run: Callable[[Any, argparse.Namespace], int]  # (config, parsed args) -> exit code
    json_output: bool = False  # offer --json
    option_groups: dict[str, tuple[str, ...]] | None = None  # --help sections: title -> field names


def to_json(value: Any) -> str:
    """JSON for a result dataclass (paths as strings), one object, sorted keys."""

    def default(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj):
            return dataclasses.asdict(obj)
        if isinstance(obj, Path):
            return str(obj)
        if isinstance(obj, (set, frozenset)):
            return sorted(obj)
        raise TypeError(f"cannot serialise {type(obj).__name__}")

    return json.dumps(value, default=default, sort_keys=True)


def _run_download(config: DownloadConfig, args: argparse.Namespace) -> int:
    from finetune import download

    result = download.download(config)
    manifest = result.manifest
    if args.json:
        print(to_json(result))
    elif result.status == "present":
        print(f"{result.checkpoint}: already present, verified (manifest {result.manifest_path})")
    else:
        print(
            f"{result.checkpoint}: {result.status} and verified ({manifest.variables} variables, sha256 "
            f"{manifest.checkpoint_sha256[:16]}...) from {manifest.url}; manifest {result.manifest_path}"
        )
    return 0


# ------------------------------------------------------------------------------------------ build-dataset


def _format_build_result(result: Any) -> str:
    """The build summary: per-class counts per split, then what was converted, merged and skipped."""
    splits = list(result.split_counts)
    width = max(len("total"), *(len(name) for name in result.classes))

    def row(name: str, counts: list[int]) -> str:
        return "  " + name.ljust(width) + "".join(f"{count:>12,}" for count in counts)

    images, shards = sum(result.split_counts.values()), sum(result.shards.values())
    lines = [
        f"wrote {result.out}: {images:,} images of {len(result.classes)} classes in {shards} shards "
        f"({result.seconds:.1f} s, {result.images_per_second:,.0f} images/s)",
        "  " + "class".ljust(width) + "".join(f"{split:>12}" for split in splits),
    ]
    lines += [row(name, [result.class_counts[split][label] for split in splits])
              for label, name in enumerate(result.classes)]  # fmt: skip
    lines.append(row("total", [result.split_counts[split] for split in splits]))
    lines.append(
        f"converted to JPEG: {result.converted:,}; identical files: {result.duplicate_files:,} in "
        f"{result.duplicate_groups:,} sets (each set kept in one split); skipped: {result.skipped:,}"
    )
    if result.near_duplicate_groups:
        lines.append(f"near-duplicates: {result.near_duplicate_files:,} images in {result.near_duplicate_groups:,} "
                     "sets (each set kept in one split; listed in dataset.json)")  # fmt: skip
    if result.promoted:
        lines.append(f"promoted: {result.promoted:,} images moved off their hash split so that every class has "
                     "an image in every split (listed in dataset.json)")  # fmt: skip
    lines.append(f"fingerprint: {result.fingerprint[:16]}")
    return "\n".join(lines)


def _run_build_dataset(config: BuildDatasetConfig, args: argparse.Namespace) -> int:
    from finetune import dataset

    result = dataset.build_dataset(config)
    print(to_json(result) if args.json else _format_build_result(result))
    return 0


def _run_preview(config: PreviewConfig, args: argparse.Namespace) -> int:
    from finetune import preview

    result = preview.preview_dataset(config)
    if args.json:
        print(to_json(result))
    else:
        print(
            f"wrote {result.out}: {result.count} training examples, each original (sampled crop in yellow) "
            f"beside what the network sees at {result.image_size}x{result.image_size}"
        )
    return 0


def _format_seconds(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def _run_train(config: Any, args: argparse.Namespace) -> int:
    from finetune.train import train

    result = train(config)
    if args.json:
        print(to_json(result))
    else:
        rate = f", {result.images_per_second:.1f} images/s" if result.images_per_second else ""
        print(
            f"{result.status}: {result.train_dir} at step {result.global_step}/{result.total_steps} "
            f"in {_format_seconds(result.seconds)}{rate}"
        )
        if result.first_loss is not None:
            print(f"loss {result.first_loss:.4f} -> {result.final_loss:.4f}; "
                  f"train accuracy {result.train_accuracy:.4f}")  # fmt: skip
        if result.lr_search:
            search = result.lr_search
            print(f"learning rate {result.learning_rate:.3g}, weight decay {result.weight_decay:g}: chosen from "
                  f"{len(search['candidates'])} settings on held-out training images in {search['seconds']:.1f} s")  # fmt: skip
        if result.validation_accuracy is not None:
            print(f"validation accuracy {result.validation_accuracy:.4f}")
        if result.best_step is not None:
            print(f"best: step {result.best_step}, validation {result.best_metric} {result.best_value:.4f} "
                  f"({result.best_checkpoint}; evaluate and export take it by default)")  # fmt: skip
        if result.calibration:
            fit = result.calibration
            print(f"calibration: temperature {fit['temperature']:.3f}; validation ECE {fit['ece_before']:.4f} -> "
                  f"{fit['ece_after']:.4f} ({fit['reliability_png']})")  # fmt: skip
        if not result.pretrained:
            print("not pretrained: these weights started from random values (--checkpoint none)")
        print(f"checkpoint: {result.checkpoint}")
    return 130 if result.status == "interrupted" else 0


def _print_evaluation(evaluation: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=sys.stdout, highlight=False)
    where = f"step {evaluation.global_step}" if evaluation.global_step is not None else evaluation.source
    if getattr(evaluation, "checkpoint_choice", None):
        where = f"the {evaluation.checkpoint_choice} checkpoint"
    line = f"{evaluation.split}: top-1 {evaluation.top1:.4f}"
    if evaluation.top5 is not None:
        line += f", top-5 {evaluation.top5:.4f}"
    print(f"{line} over {evaluation.examples} examples ({where})")
    if getattr(evaluation, "tta", "none") != "none":
        print(f"test-time augmentation {evaluation.tta}: top-1 {evaluation.top1:.4f}, without it "
              f"{evaluation.top1_without_tta:.4f}")  # fmt: skip
    scores = Table("class", "precision", "recall", "F1", "support", title="per class")
    for row in evaluation.per_class:
        scores.add_row(row.name, f"{row.precision:.3f}", f"{row.recall:.3f}", f"{row.f1:.3f}", str(row.support))
    console.print(scores)
    confusion = Table("true \\ predicted", *evaluation.classes, title="confusion matrix")
    for name, counts in zip(evaluation.classes, evaluation.confusion):
        confusion.add_row(name, *map(str, counts))
    console.print(confusion)
    if evaluation.most_confident_mistakes:
        print("most confident mistakes:")
        for mistake in evaluation.most_confident_mistakes:
            print(f"  {mistake.path}: {mistake.label} taken for {mistake.predicted} ({mistake.confidence:.3f})")
    if getattr(evaluation, "ece", None) is not None:
        calibrated = (f"; with temperature {evaluation.temperature:.3f}: {evaluation.ece_calibrated:.4f}"
                      if evaluation.temperature else "")  # fmt: skip
        print(f"calibration error (ECE, 15 bins): {evaluation.ece:.4f}{calibrated}; "
              f"reliability diagram: {evaluation.reliability_png}")  # fmt: skip
    print(f"report: {evaluation.report}\nconfusion matrix: {evaluation.confusion_png}")
    if evaluation.html:
        print(f"html report: {evaluation.html} ({evaluation.html_bytes / 1024:,.0f} KiB, built in "
              f"{evaluation.html_seconds:.1f} s)")  # fmt: skip


def _run_evaluate(config: Any, args: argparse.Namespace) -> int:
    from finetune import evaluate

    def show(evaluation: Any) -> None:
        print(to_json(evaluation)) if args.json else _print_evaluation(evaluation)
        sys.stdout.flush()

    if config.watch:
        evaluate.watch(config, show)
    else:
        show(evaluate.evaluate(config))
    return 0


def _run_export(config: Any, args: argparse.Namespace) -> int:
    from finetune.export import export

    result = export(config)
    if args.json:
        print(to_json(result))
    else:
        print(f"exported {result.checkpoint} -> {result.model} ({result.size_bytes / 2**20:.1f} MiB)")
        for kind, path in result.files.items():
            if path != result.model:
                quantized = f", --quantize {result.quantize}" if kind == "tflite" and result.quantize != "none" else ""
                print(f"{kind}: {path} ({result.sizes[kind] / 2**20:.1f} MiB{quantized})")
        if result.checkpoint_choice:
            print(f"checkpoint: the {result.checkpoint_choice} one")
        if result.temperature:
            print(f"probabilities calibrated: softmax(logits / {result.temperature:.3f}); logits unchanged")
        if result.tta != "none":
            print(f"test-time augmentation {result.tta}: the graph averages each image and its mirror image "
                  "(2x compute)")  # fmt: skip
        print(f"labels: {result.labels}; sidecar: {result.sidecar}")
        if result.saved_model:
            print(f"SavedModel: {result.saved_model}")
        print(f"try it: finetune predict --model {result.model} IMAGE_OR_FOLDER")
    return 0


def _run_predict(config: Any, args: argparse.Namespace) -> int:
    from finetune.paths import printable
    from finetune.predict import predict

    failed = labelled = 0
    for prediction in predict(config):
        labelled += not prediction.error
        if prediction.error:
            failed += 1
            print(f"error: {printable(prediction.path)}: {prediction.error}", file=sys.stderr)
            if args.json:
                print(json.dumps({"path": prediction.path, "error": prediction.error}))
        elif args.json:
            top = [{"class": name, "probability": p} for name, p in prediction.top]
            print(json.dumps({"path": prediction.path, "predictions": top}))
        else:
            rest = ", ".join(f"{name} {p:.3f}" for name, p in prediction.top[1:])
            name, probability = prediction.top[0]
            print(f"{printable(prediction.path)}\t{name}\t{probability:.4f}" + (f"\t({rest})" if rest else ""))
        sys.stdout.flush()
    if failed:  # the count is a summary, not one more error: one `error:` line per bad entry, above
        log.info(f"{labelled} file(s) labelled, {failed} could not be (the error lines above)")
    return 1 if failed else 0


def _run_explain(config: Any, args: argparse.Namespace) -> int:
    from finetune.gradcam import explain

    failed = 0
    for explanation in explain(config):
        if explanation.error:
            failed += 1
            print(f"error: {explanation.path}: {explanation.error}", file=sys.stderr)
        if args.json:
            print(to_json(explanation))
        elif not explanation.error:
            print(f"{explanation.path}\t{explanation.predicted} {explanation.probability:.4f}\t"
                  f"Grad-CAM for {explanation.explained} -> {explanation.overlay}")  # fmt: skip
    if failed:  # a summary, not one more error: one `error:` line per bad entry, above
        log.info(f"{failed} file(s) could not be explained (the error lines above)")
    return 1 if failed else 0


def _run_quickstart(config: Any, args: argparse.Namespace) -> int:
    from finetune.quickstart import OWN_FOLDER_COMMANDS, quickstart

    result = quickstart(config)
    if args.json:
        print(to_json(result))
        return 0
    label = "" if result.pretrained else " (not pretrained)"
    print(
        f"quickstart finished in {_format_seconds(result.seconds)}: a model of {len(result.classes)} classes "
        f"({', '.join(result.classes)}) trained on {result.images} generated photos at {result.image_size} px"
    )
    if not result.pretrained:
        print(
            f"NOT PRETRAINED: {result.not_pretrained_reason}; training started from random weights "
            f"({result.checkpoint}), so these numbers show that every stage works, not what fine-tuning a "
            "pretrained network reaches. Run `finetune download` online, then `finetune quickstart` again."
        )
    print(f"validation accuracy {result.validation_accuracy:.4f} over {result.validation_examples} photos{label}")
    print(f"new photos: {result.correct_predictions} of {len(result.predictions)} labelled right{label}")
    for prediction in result.predictions:
        print(f"  {prediction.path}\t{prediction.predicted} {prediction.probability:.3f}"
              f"\t(drawn as {prediction.expected}){label}")  # fmt: skip
    rows = [
        ("checkpoint", f"{result.checkpoint}{' (random weights, not pretrained)' if label else ''}"),
        ("photos", f"{result.photos} ({result.images} images, one folder per class)"),
        ("new photos", result.new_photos),
        ("dataset", f"{result.dataset} (dataset.json, labels.txt, TFRecords)"),
        ("train dir", f"{result.train_dir} (config.json, {Path(result.train_checkpoint).name}, TensorBoard events)"),
        ("evaluation", f"{result.eval_report}, {result.confusion_png}"),
        ("model", f"{result.model} (with {Path(result.labels).name} and {Path(result.sidecar).name})"),
        ("predictions", result.predictions_file),
    ]
    print("artefacts:")
    width = max(len(name) for name, _ in rows)
    for name, where in rows:
        print(f"  {name.ljust(width)}  {where}")
    print("the same on your own photos (PHOTOS: one subfolder of images per class):")
    for command in OWN_FOLDER_COMMANDS:
        print(f"  {command}")
    return 0


def _run_audit(config: AuditConfig, args: argparse.Namespace) -> int:
    from finetune import audit

    result = audit.audit(config)
    print(to_json(result) if args.json else audit.summary_line(result))
    return 0


# Subcommands, in the order data flows. Each issue that adds a stage adds its row.
COMMANDS: list[Command] = [
    Command("quickstart", "every stage on generated photos, from nothing to a working model",
            QuickstartConfig, _run_quickstart, json_output=True),  # fmt: skip
    Command("download", "fetch and verify the pretrained checkpoint", DownloadConfig, _run_download, True),
    Command("build-dataset", "turn a folder of class subfolders into sharded TFRecords with a held-out split",
            BuildDatasetConfig, _run_build_dataset, json_output=True),  # fmt: skip
    Command("audit", "find likely label errors and near-duplicates across classes in a built dataset",
            AuditConfig, _run_audit, json_output=True),  # fmt: skip
    Command("preview", "draw training examples after train preprocessing beside their originals",
            PreviewConfig, _run_preview, json_output=True),  # fmt: skip
    Command("train", "fine-tune the chosen layers on a built dataset", TrainConfig, _run_train, json_output=True,
            option_groups=TRAIN_OPTION_GROUPS),  # fmt: skip
    Command("evaluate", "measure a run or an exported model on a held-out split", EvaluateConfig, _run_evaluate,
            json_output=True),  # fmt: skip
    Command("export", "freeze a run into a .pb (and .tflite, .onnx, SavedModel) for inference", ExportConfig,
            _run_export, json_output=True),  # fmt: skip
    Command("predict", "label image files with an exported model", PredictConfig, _run_predict, json_output=True),
    Command("explain", "draw where the network looked (Grad-CAM) for given images, with a .pb or a train dir",
            ExplainConfig, _run_explain, json_output=True),  # fmt: skip
]


# ------------------------------------------------------------------------------------------ flag building


def _unwrap_optional(kind: Any) -> Any:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return kind


def add_config_arguments(
    parser: argparse.ArgumentParser, config: type, groups: dict[str, tuple[str, ...]] | None = None
) -> None:
    """Adds one argument per field of a config dataclass, from the field's type and option() metadata.

    With ``groups`` (title -> field names), the flags are listed under those titles in --help, in the order
    given; names that are not fields are skipped, and fields in no group come last, under "other options".
    """
    hints = typing.get_type_hints(config)
    specs = {spec.name: spec for spec in dataclasses.fields(config)}
    if not groups:
        for spec in specs.values():
            _add_field(parser, spec, hints[spec.name])
        return
    for spec in specs.values():
        if spec.metadata.get("positional"):
            _add_field(parser, spec, hints[spec.name])
    grouped = [name for names in groups.values() for name in names]
    sections = {**groups, "other options": tuple(name for name in specs if name not in grouped)}
    for title, names in sections.items():
        present = [specs[name] for name in names if name in specs and not specs[name].metadata.get("positional")]
        if present:
            section = parser.add_argument_group(title)
            for spec in present:
                _add_field(section, spec, hints[spec.name])


def _add_field(parser: Any, spec: dataclasses.Field, hint: Any) -> None:
    """One config field as an argument of ``parser`` (a parser or one of its argument groups)."""
    meta = spec.metadata
    kind = _unwrap_optional(hint)
    has_default = spec.default is not dataclasses.MISSING
    help_text = meta.get("help", "")
    if has_default and spec.default not in (None, (), ""):
        shown = ",".join(map(str, spec.default)) if isinstance(spec.default, tuple) else spec.default
        if isinstance(spec.default, bool):
            shown = "on" if spec.default else "off"
        help_text += f" (default: {shown})"
    kwargs: dict[str, Any] = {"help": help_text}
    if meta.get("choices"):
        kwargs["choices"] = meta["choices"]
    if meta.get("metavar"):
        kwargs["metavar"] = meta["metavar"]
    if kind is bool and spec.default is False:
        kwargs["action"] = "store_true"  # an off-by-default switch needs no --no- form
    elif kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(kind) is tuple:
        kwargs["type"] = typing.get_args(kind)[0]
        kwargs["nargs"] = "+"
    else:
        kwargs["type"] = kind
    if meta.get("positional"):
        if has_default:
            kwargs["nargs"] = "?" if "nargs" not in kwargs else "*"
            kwargs["default"] = spec.default
        parser.add_argument(spec.name, **kwargs)
    else:
        flag = meta.get("flag") or "--" + spec.name.replace("_", "-")
        if has_default:
            kwargs["default"] = spec.default
        else:
            kwargs["required"] = True
        parser.add_argument(flag, dest=spec.name, **kwargs)


def config_from_args(config: type, args: argparse.Namespace) -> Any:
    """Builds the config dataclass from parsed args; its __post_init__ validates."""
    values = {}
    for spec in dataclasses.fields(config):
        value = getattr(args, spec.name)
        values[spec.name] = tuple(value) if isinstance(value, list) else value
    return config(**values)


def build_parser() -> argparse.ArgumentParser:
    verbosity = argparse.ArgumentParser(add_help=False)
    verbosity.add_argument(
        "-v", "--verbose", action="count", default=argparse.SUPPRESS,
        help="more detail on stderr; -v also shows TensorFlow's own log lines",
    )  # fmt: skip
    verbosity.add_argument(
        "-q", "--quiet", action="count", default=argparse.SUPPRESS,
        help="only warnings and errors on stderr",
    )  # fmt: skip
    parser = argparse.ArgumentParser(
        prog="finetune",
        description="Fine-tune TF-slim's ImageNet InceptionV3 on a folder of labelled images.",
        parents=[verbosity],
    )
    parser.add_argument("--version", action="version", version=f"finetune {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for command in COMMANDS:
        sub = subparsers.add_parser(
            command.name, help=command.help, description=command.help, parents=[verbosity]
        )
        add_config_arguments(sub, command.config, command.option_groups)
        if command.json_output:
            sub.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
        sub.set_defaults(command_spec=command)
    return parser


# ------------------------------------------------------------------------------------------------ logging


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {message}"
        return message


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted, not when logging was configured.

    A caller that swaps sys.stderr (a test capturing output, a notebook) then still gets the lines, and a
    closed stream from an earlier in-process run is never written to.
    """

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def configure_logging(verbosity: int) -> None:
    """Progress and logs on stderr: -q warnings only, default info, -v debug and TensorFlow's logs."""
    if verbosity > 0:
        os.environ["FINETUNE_VERBOSE"] = "1"
    handler = _StderrHandler()
    handler.setFormatter(_Formatter())
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(getattr(args, "verbose", 0) - getattr(args, "quiet", 0))
    command: Command | None = getattr(args, "command_spec", None)
    if command is None:
        parser.print_help()
        return 0
    try:
        config = config_from_args(command.config, args)
        check_path_flags(config)  # a file where a folder belongs, or the reverse: one error, before any work
        with translated_command_errors(config):  # TensorFlow's errors about damaged files, naming the file
            return command.run(config, args)
    except FinetuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
