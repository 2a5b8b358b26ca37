"""``flexi-export export``: Flexi checkpoints and plain HF folders, options, output, progress."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from flexi_export.checkpoint import save_flexi
from flexi_export.cli import main
from flexi_export.export import Bundle
from flexi_export.model import get_plan
from tests.export.util import char_tokenizer
from tests.helpers import tiny_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, flexi_model):
    """A saved Flexi checkpoint (mixed plan, with a tokenizer)."""
    path = tmp_path_factory.mktemp("ckpt") / "flexi"
    save_flexi(flexi_model("llama", "mixed"), path, tokenizer=char_tokenizer())
    return path


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A plain Hugging Face folder (no plan): exported as the dense model."""
    path = tmp_path_factory.mktemp("hf") / "qwen2"
    tiny_model("qwen2").save_pretrained(path)
    return path


def run(*args: str):
    return CliRunner().invoke(main, ["export", *args], catch_exceptions=False)


def test_export_a_flexi_checkpoint(checkpoint, tmp_path, flexi_model):
    out = tmp_path / "bundle"
    result = run(str(checkpoint), "--out", str(out), "--quiet")
    assert result.exit_code == 0, result.output
    assert re.search(r"initializers\s+\d+ \(21 read by several blocks\)", result.stdout)
    assert "max |logits diff|" in result.stdout
    bundle = Bundle.open(out)
    assert bundle.manifest["source"]["is_flexi"] is True
    assert re.fullmatch(r"[0-9a-f]{64}", bundle.manifest["source"]["sha256"])
    assert bundle.plan() == get_plan(flexi_model("llama", "mixed"))
    assert (out / "tokenizer.json").is_file()
    assert result.stderr == ""  # --quiet: no progress bars


def test_export_a_plain_hf_folder_without_a_plan(hf_folder, tmp_path):
    out = tmp_path / "dense"
    result = run(str(hf_folder), "--out", str(out))
    assert result.exit_code == 0, result.output
    bundle = Bundle.open(out)
    plan = bundle.plan()
    assert plan.num_executed == 6 and plan.count("original") == 6
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
    assert bundle.manifest["totals"]["shared_initializers"] == 0
    assert bundle.manifest["source"]["is_flexi"] is False
    assert "weights" in result.stderr and "graph" in result.stderr  # tqdm progress bars on stderr


def test_dense_fp16_opset_options_reach_the_bundle(checkpoint, tmp_path):
    out = tmp_path / "dense16"
    result = run(str(checkpoint), "--out", str(out), "--dense", "--dtype", "fp16", "--opset", "20", "--quiet")
    assert result.exit_code == 0, result.output
    manifest = Bundle.open(out).manifest
    assert (manifest["dense"], manifest["dtype"], manifest["opset"], manifest["ir_version"]) == (True, "fp16", 20, 9)
    assert "dense (no sharing)" in result.stdout


def test_help_lists_every_option():
    result = CliRunner().invoke(main, ["export", "--help"])
    assert result.exit_code == 0
    for option in ("--out", "--dtype", "--opset", "--dense", "--overwrite", "--no-check", "--quiet"):
        assert option in result.output
    assert "FLEXI_OR_HF_DIR" in result.output


def test_a_client_warning_is_one_warning_line_on_stderr(tmp_path):
    folder = tmp_path / "hd32"
    tiny_model("llama", head_dim=32).save_pretrained(folder)  # hidden 64 / 4 heads = 16: optimum cannot run it
    result = CliRunner().invoke(main, ["export", str(folder), "--out", str(tmp_path / "b"), "--quiet", "--no-check"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if "optimum" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: optimum cannot run this bundle"), result.stderr
    assert "ClientCompatibilityWarning" not in result.stderr and ".py:" not in result.stderr
