"""Bad input gets one clear error line and leaves nothing half-written."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

import flexi_export.export.exporter as exporter
from flexi_export.checkpoint import save_flexi
from flexi_export.cli import main
from flexi_export.errors import ExportError, PlanError
from flexi_export.export import export_onnx
from flexi_export.model import build_flexi
from flexi_export.model.build import PLAN_ATTR
from tests.helpers import mixed_plan, randomize_own, tiny_model


def run(*args: str):
    return CliRunner().invoke(main, ["export", *args])


def assert_clean(parent, name="out"):
    """Neither the output folder nor a temporary sibling is left behind."""
    assert not (parent / name).exists()
    assert not [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture
def checkpoint(tmp_path, flexi_model):
    path = tmp_path / "ckpt"
    save_flexi(flexi_model("mistral", "mixed"), path)
    return path


def test_missing_input_folder(tmp_path):
    line = one_error_line(run(str(tmp_path / "nope"), "--out", str(tmp_path / "out")))
    assert "no such file or folder" in line
    assert_clean(tmp_path)


def test_input_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    line = one_error_line(run(str(tmp_path / "empty"), "--out", str(tmp_path / "out")))
    assert "config.json is missing" in line
    assert_clean(tmp_path)


def test_checkpoint_without_weights(checkpoint, tmp_path):
    (checkpoint / "model.safetensors").unlink()
    line = one_error_line(run(str(checkpoint), "--out", str(tmp_path / "out")))
    assert "has no model.safetensors" in line
    assert_clean(tmp_path)


def test_hf_folder_without_weights(tmp_path):
    tiny_model("llama").config.save_pretrained(tmp_path / "hf")
    line = one_error_line(run(str(tmp_path / "hf"), "--out", str(tmp_path / "out")))
    assert "cannot load the weights" in line
    assert_clean(tmp_path)


def test_checkpoint_whose_plan_does_not_fit_its_weights(checkpoint, tmp_path):
    plan_file = checkpoint / "flexi_plan.json"
    plan = json.loads(plan_file.read_text())
    plan["entries"][2]["adapter"]["rank"] = 8  # the weights hold rank-4 adapters
    plan_file.write_text(json.dumps(plan))
    line = one_error_line(run(str(checkpoint), "--out", str(tmp_path / "out")))
    assert "another plan" in line or "shape" in line
    assert_clean(tmp_path)


def test_model_whose_modules_do_not_follow_its_plan(tmp_path):
    model = build_flexi(tiny_model("llama"), mixed_plan("llama", ofn="layernorm"))
    setattr(model, PLAN_ATTR, mixed_plan("llama", rank=8, ofn="rms"))
    with pytest.raises(PlanError) as caught:
        export_onnx(model, tmp_path / "out", progress=False)
    assert "executed block 2" in str(caught.value) and "rank 4, the plan says 8" in str(caught.value)
    assert "OFN layernorm, the plan says rms" in str(caught.value)
    assert_clean(tmp_path)


def test_existing_non_empty_output_needs_overwrite(checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    line = one_error_line(run(str(checkpoint), "--out", str(out), "--quiet"))
    assert "not empty" in line and "--overwrite" in line
    assert (out / "keep.txt").read_text() == "mine"
    result = run(str(checkpoint), "--out", str(out), "--quiet", "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "manifest.json").is_file()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--dtype", "bf16", "unsupported dtype 'bf16'"),
        ("--opset", "17", "unsupported opset 17"),
        ("--opset", "23", "unsupported opset 23"),
    ],
)
def test_unsupported_dtype_or_opset_is_refused_before_anything_is_loaded(option, value, message, tmp_path):
    # the source does not even exist: the option error must come first, without loading anything
    line = one_error_line(run(str(tmp_path / "nope"), "--out", str(tmp_path / "out"), option, value))
    assert message in line
    assert_clean(tmp_path)


@pytest.mark.parametrize("error", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_a_failure_mid_export_leaves_no_output(error, tmp_path, monkeypatch, flexi_model):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(exporter, "save_reference", fail)  # after the weights and the graph are written
    with pytest.raises(type(error)):
        export_onnx(flexi_model("llama", "mixed"), tmp_path / "out", progress=False)
    assert_clean(tmp_path)


def test_a_failed_self_check_leaves_no_output(tmp_path, monkeypatch, flexi_model):
    """The torch reference and the graph disagree (here: the reference is shifted): the onnxruntime replay
    catches it, and nothing is written."""
    compute = exporter.compute_reference

    def shifted(*args, **kwargs):
        return [dataclasses.replace(case, logits=case.logits + 1e-2) for case in compute(*args, **kwargs)]

    monkeypatch.setattr(exporter, "compute_reference", shifted)
    with pytest.raises(ExportError, match="does not reproduce the torch model"):
        export_onnx(flexi_model("qwen2", "mixed"), tmp_path / "out", progress=False)
    assert_clean(tmp_path)


def test_a_non_float32_model_is_refused(tmp_path):
    model = randomize_own(build_flexi(tiny_model("llama"), mixed_plan("llama"))).to(torch.bfloat16)
    with pytest.raises(ExportError, match="needs a float32 model"):
        export_onnx(model, tmp_path / "out", progress=False)
    assert_clean(tmp_path)


def test_a_model_off_the_cpu_is_refused(tmp_path):
    model = tiny_model("llama").to("meta")
    with pytest.raises(ExportError, match="on the CPU, it is on meta"):
        export_onnx(model, tmp_path / "out", progress=False)
    assert_clean(tmp_path)
