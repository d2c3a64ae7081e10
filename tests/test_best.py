"""Keep the best checkpoint and stop early: a run whose validation accuracy rises and then falls.

The head trains on cached features at a rate that overshoots (plain SGD at 1.0, constant), so validation
accuracy climbs, peaks and drops again; everything is seeded, so a second run repeats the first pass for pass.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from finetune import cli, rundir
from finetune.config import EvaluateConfig, ExportConfig, TrainConfig
from finetune.errors import FinetuneError
from finetune.evaluate import evaluate
from finetune.export import export
from finetune.train import train
from tests.conftest import run_frozen_graph

STEPS, EVAL_EVERY, PATIENCE = 30, 2, 2


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from finetune.synthetic import make_image_folder

    root = tmp_path_factory.mktemp("best-data")
    make_image_folder(root / "photos", num_classes=3, images_per_class=16, seed=7, min_side=80, max_side=120,
                      png_fraction=0.0)  # fmt: skip
    assert cli.main(["build-dataset", str(root / "photos"), "--out", str(root / "ds"),
                     "--validation-fraction", "0.3", "--workers", "1"]) == 0  # fmt: skip
    return root / "ds"


def _config(dataset: Path, train_dir: Path, checkpoint: Path, **overrides) -> TrainConfig:
    settings = dict(dataset=str(dataset), train_dir=str(train_dir), checkpoint=str(checkpoint), image_size=75,
                    batch_size=8, steps=STEPS, eval_every=EVAL_EVERY, optimizer="sgd", learning_rate=1.0,
                    schedule="constant", warmup_epochs=0, lr_search="off")  # fmt: skip
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(scope="module")
def full_run(dataset, standin_checkpoint, tmp_path_factory):
    """The whole run, saving every 10 steps and keeping one checkpoint: rotation deletes all but the last."""
    train_dir = tmp_path_factory.mktemp("best-run") / "run"
    result = train(_config(dataset, train_dir, standin_checkpoint, save_every=10, keep_checkpoints=1))
    return train_dir, result, rundir.read_best(train_dir)


@pytest.fixture(scope="module")
def chosen(full_run):
    """The default evaluate of the run (the best checkpoint, the validation split), asserted on by two tests.
    Without the HTML report (test_report.py's), whose Grad-CAM pass changes no number asserted here."""
    return evaluate(EvaluateConfig(train_dir=str(full_run[0]), html=False))


@pytest.fixture(scope="module")
def exported(full_run, tmp_path_factory):
    """The default export of the run (the best checkpoint, calibrated): its result and the folder it is in."""
    out = tmp_path_factory.mktemp("best-export")
    return export(ExportConfig(train_dir=str(full_run[0]), out=str(out / "model.pb"))), out


@pytest.mark.slow
def test_the_best_pass_is_kept_through_rotation_and_evaluate_and_export_take_it(full_run, chosen, exported):
    train_dir, result, best = full_run
    values = [value for _, value in best.passes]
    assert [step for step, _ in best.passes] == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
    peak = max(values)
    best_step = best.passes[values.index(peak)][0]  # the first pass that reached the peak
    assert best_step < STEPS and values[-1] < peak, "the run must rise and then fall for this test to mean anything"
    assert (best.step, best.value, best.metric) == (best_step, peak, "accuracy")
    assert (result.best_step, result.best_value, result.best_metric) == (best_step, peak, "accuracy")
    # Rotation kept only the newest checkpoint in the train dir; the best one survives in best/.
    assert sorted(p.name for p in train_dir.glob("model.ckpt-*.index")) == [f"model.ckpt-{STEPS}.index"]
    assert sorted(p.name for p in (train_dir / "best").glob("model.ckpt-*.index")) == [f"model.ckpt-{best_step}.index"]

    # The end of the run fitted a temperature for the checkpoint evaluate and export take.
    assert result.calibration["step"] == best_step and result.calibration["temperature"] > 0
    assert result.calibration["nll_after"] <= result.calibration["nll_before"] + 1e-9
    assert rundir.read_calibration(train_dir, best_step)["temperature"] == result.calibration["temperature"]

    assert chosen.global_step == best_step and chosen.checkpoint_choice.startswith(f"best (step {best_step}")
    assert chosen.top1 == pytest.approx(peak)
    # Without the HTML report, whose Grad-CAM pass is not under test here.
    newest = evaluate(EvaluateConfig(train_dir=str(train_dir), checkpoint="newest", html=False))
    assert newest.global_step == STEPS and newest.top1 == pytest.approx(values[-1])

    exported, out = exported
    assert exported.global_step == best_step and exported.checkpoint_choice.startswith("best")
    assert json.loads((out / "model.json").read_text())["global_step"] == best_step


@pytest.mark.slow
def test_the_temperature_training_fitted_is_evaluate_s_and_export_folds_it(full_run, chosen, exported, tmp_path):
    """Training fits the best checkpoint's temperature in its own session, on its validation pass's logits;
    evaluate fits it again through a graph of its own on the same split and must find the same value."""
    import numpy as np

    from finetune.calibration import softmax

    train_dir, result, best = full_run
    temperature = result.calibration["temperature"]
    recorded = rundir.read_calibration(train_dir, best.step)
    assert recorded["temperature"] == temperature and recorded["split"] == "validation"
    evaluation = chosen  # the default evaluate: the validation split, the best checkpoint
    assert evaluation.split == "validation"
    assert evaluation.global_step == best.step and recorded["examples"] == evaluation.examples
    assert evaluation.temperature == pytest.approx(temperature, rel=1e-3)
    assert evaluation.ece_calibrated == pytest.approx(recorded["ece_after"], abs=1e-3)
    assert (train_dir / "calibration-validation.png").stat().st_size > 0

    exported, out = exported
    assert exported.temperature == temperature
    assert json.loads((out / "model.json").read_text())["temperature"] == temperature
    images = np.random.default_rng(0).uniform(-1, 1, (4, 75, 75, 3)).astype(np.float32)
    probabilities, logits = run_frozen_graph(out / "model.pb", images)  # both from one run
    assert np.allclose(probabilities, softmax(logits, temperature), atol=1e-5)
    assert np.array_equal(probabilities.argmax(1), logits.argmax(1))
    plain = export(ExportConfig(train_dir=str(train_dir), out=str(tmp_path / "plain.pb"), calibrate=False))
    assert plain.temperature is None and json.loads((tmp_path / "plain.json").read_text())["temperature"] is None
    # The same weights from outside the train dir (a copy, as another run's would be): no step of this run, so
    # the temperature fitted for the step its name carries is not folded in.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for part in Path(best.checkpoint).parent.glob(Path(best.checkpoint).name + ".*"):
        shutil.copy(part, elsewhere / part.name)
    copy = str(elsewhere / Path(best.checkpoint).name)
    copied = export(ExportConfig(train_dir=str(train_dir), out=str(tmp_path / "copied.pb"), checkpoint=copy))
    assert copied.checkpoint_choice == "given" and copied.temperature is None
    # evaluate off the validation split applies the temperature recorded for the step, to the run's own
    # checkpoint (given as its folder) and not to the copy.
    own = evaluate(EvaluateConfig(train_dir=str(train_dir), split="train", html=False,
                                  checkpoint=str(train_dir / rundir.BEST_DIR)))  # fmt: skip
    assert own.global_step == best.step and own.temperature == pytest.approx(temperature)
    assert evaluate(EvaluateConfig(train_dir=str(train_dir), split="train", html=False,
                                   checkpoint=copy)).temperature is None  # fmt: skip


@pytest.mark.slow
def test_early_stopping_stops_at_the_predicted_step_and_stays_stopped(full_run, dataset, standin_checkpoint,
                                                                      tmp_path, capsys):  # fmt: skip
    _, _, best = full_run
    predicted, top, stale = None, None, 0
    for step, value in best.passes:  # the first pass after PATIENCE passes without a new best
        top, stale = (value, 0) if top is None or value > top else (top, stale + 1)
        if stale == PATIENCE:
            predicted = step
            break
    assert predicted is not None and predicted < STEPS, "the run must plateau for PATIENCE passes"
    config = _config(dataset, tmp_path / "run", standin_checkpoint, early_stop=PATIENCE)
    stopped = train(config)
    assert (stopped.status, stopped.global_step) == ("stopped early", predicted)
    assert rundir.read_best(tmp_path / "run").stopped_early
    assert train(config).status == "already complete"
    assert cli.main(["train", *_flags(config)]) == 0
    assert capsys.readouterr().out.startswith("already complete")


def _flags(config: TrainConfig) -> list[str]:
    return ["--dataset", config.dataset, "--train-dir", config.train_dir, "--checkpoint", config.checkpoint,
            "--image-size", "75", "--batch-size", "8", "--steps", str(STEPS), "--eval-every", str(EVAL_EVERY),
            "--optimizer", "sgd", "--learning-rate", "1", "--schedule", "constant", "--warmup-epochs", "0",
            "--lr-search", "off", "--early-stop", str(PATIENCE)]  # fmt: skip


def test_selection_needs_validation_passes(dataset, standin_checkpoint, tmp_path, capsys):
    for flags, message in ((["--early-stop", "3", "--eval-every", "0"], "--early-stop 3: needs validation passes, "
                            "but --eval-every 0 turns validation passes off"),
                           (["--select-by", "loss", "--eval-every", "0"], "--select-by loss: needs validation")):
        code = cli.main(["train", "--dataset", str(dataset), "--train-dir", str(tmp_path / "run"),
                         "--checkpoint", str(standin_checkpoint), *flags])  # fmt: skip
        assert code == 1 and message in capsys.readouterr().err
    with pytest.raises(FinetuneError, match="--early-stop 0: must be at least 1"):
        TrainConfig(dataset="d", train_dir="t", early_stop=0)


def test_best_json_round_trips_and_a_newer_one_is_refused(tmp_path):
    kept = rundir.Best("loss", 20, 0.25, str(tmp_path / "best" / "model.ckpt-20"), ((10, 0.5), (20, 0.25)))
    for suffix in (".index", ".data-00000-of-00001"):
        (tmp_path / "best").mkdir(exist_ok=True)
        (tmp_path / "best" / f"model.ckpt-10{suffix}").write_bytes(b"")
        (tmp_path / "best" / f"model.ckpt-20{suffix}").write_bytes(b"")
    rundir.write_best(tmp_path, kept)
    assert rundir.read_best(tmp_path) == kept
    assert sorted(p.name for p in (tmp_path / "best").glob("model.ckpt-*")) == [
        "model.ckpt-20.data-00000-of-00001", "model.ckpt-20.index"]  # fmt: skip
    chosen = rundir.choose_checkpoint(tmp_path, None)
    assert (chosen.step, chosen.which) == (20, "best (step 20, validation loss 0.2500)")
    path = tmp_path / "best" / "best.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": 99}))
    with pytest.raises(FinetuneError, match="format version 99, newer"):
        rundir.read_best(tmp_path)
    with pytest.raises(FinetuneError, match="--checkpoint best: .* has no best checkpoint"):
        rundir.choose_checkpoint(tmp_path / "elsewhere", "best")


@pytest.mark.slow
def test_a_run_without_validation_passes_says_so_once(dataset, standin_checkpoint, tmp_path):
    result = train(_config(dataset, tmp_path / "run", standin_checkpoint, steps=2, eval_every=0))
    said = [w for w in result.warnings if w.startswith("no validation passes")]
    assert len(said) == 1 and "not calibrated" in said[0]
    assert result.calibration is None and result.best_step is None
    assert not (tmp_path / "run" / "best").exists() and not (tmp_path / "run" / "calibration.json").exists()
