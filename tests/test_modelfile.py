"""The exported model's sidecars: one owner, a format version, and clean errors for bad files."""

from __future__ import annotations

import json
import shutil

import pytest

from finetune import cli, modelfile
from finetune.errors import FinetuneError


# exported_model: conftest's session fixture, the trained run's export by default flags; only read here.


@pytest.fixture
def copy(exported_model, tmp_path):
    """The exported .pb with its sidecars, copied where a test may damage them."""
    for path in (exported_model, *modelfile.sidecar_paths(exported_model)):
        shutil.copy(path, tmp_path)
    return tmp_path / "model.pb"


def test_export_writes_a_versioned_sidecar_that_reads_back(trained_run, exported_model):
    from finetune.dataset import load_dataset

    sidecar_path = exported_model.with_suffix(".json")  # model.json beside model.pb, as the docs say
    sidecar = json.loads(sidecar_path.read_text())
    assert sidecar["format"] == modelfile.FORMAT and sidecar["format_version"] == modelfile.FORMAT_VERSION == 1
    info = modelfile.read_model(exported_model)
    assert list(info.classes) == list(load_dataset(trained_run.dataset).classes)
    assert info.image_size == 75 and info.precision == "fp32"
    assert info.dataset == sidecar["dataset"] and info.sidecar == sidecar_path
    modelfile.load_graph_def(exported_model)


def test_a_sidecar_from_before_the_version_field_still_reads(copy):
    sidecar = copy.with_suffix(".json")
    values = json.loads(sidecar.read_text())
    del values["format_version"], values["precision"]  # as written by finetune before bf16 and versions
    sidecar.write_text(json.dumps(values))
    info = modelfile.read_model(copy)
    assert info.precision == "fp32" and len(info.classes) == 6


def test_a_newer_sidecar_asks_for_a_newer_finetune(copy):
    sidecar = copy.with_suffix(".json")
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "format_version": 7}))
    with pytest.raises(FinetuneError, match="upgrade finetune") as caught:
        modelfile.read_model(copy)
    assert str(caught.value).startswith(f"{sidecar} is exported-model format version 7")


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda text: text[: len(text) // 2], "unreadable or truncated"),
        (lambda text: "", "unreadable or truncated"),
        (lambda text: "[1, 2]", "not a finetune model description"),
        (lambda text: text.replace('"image_size"', '"size"'), "bad or missing 'image_size'"),
        (lambda text: text.replace('"fp32"', '"fp8"'), "bad or missing 'precision'"),
    ],
)
def test_a_damaged_sidecar_names_the_file_and_says_export_again(copy, damage, problem):
    sidecar = copy.with_suffix(".json")
    sidecar.write_text(damage(sidecar.read_text()))
    with pytest.raises(FinetuneError) as caught:
        modelfile.read_model(copy)
    message = str(caught.value)
    assert message.startswith(str(sidecar)) and problem in message, message
    assert "export the model again with `finetune export" in message


def test_labels_that_disagree_with_the_sidecar_are_an_error_and_a_missing_labels_file_is_not(copy):
    labels = copy.with_suffix(".labels.txt")
    text = labels.read_text()
    labels.write_text(text[: len(text) // 2])
    with pytest.raises(FinetuneError, match=f"{labels} does not list the 6 classes of its model.json"):
        modelfile.read_model(copy)
    labels.unlink()
    assert len(modelfile.read_model(copy).classes) == 6


def test_a_missing_sidecar_says_export_again(copy):
    copy.with_suffix(".json").unlink()
    with pytest.raises(FinetuneError, match=r"--model .*model.pb: no model.json beside it; export the model again"):
        modelfile.read_model(copy)


def test_evaluate_and_predict_report_a_truncated_sidecar(trained_run, copy, capsys):
    sidecar = copy.with_suffix(".json")
    sidecar.write_bytes(sidecar.read_bytes()[:150])
    photo = next(trained_run.photos.rglob("*.jpg"))
    for command in (["evaluate", "--model", str(copy), "--dataset", str(trained_run.dataset)],
                    ["predict", "--model", str(copy), str(photo)]):  # fmt: skip
        code = cli.main(command)
        captured = capsys.readouterr()
        assert code == 1, (command, captured.err)
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {sidecar} is unreadable or truncated"), captured.err
        assert "Traceback" not in captured.err and not captured.out
