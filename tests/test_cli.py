"""The CLI: help, info, plan show, and one-line errors with a non-zero exit for every bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from flexi_export.checkpoint import save_flexi
from flexi_export.cli import main
from flexi_export.model import build_flexi
from flexi_export.plan import AdapterSpec, BlockPlan, SourceInfo, original, removed, shared
from tests.helpers import mixed_plan, tiny_model


def _run(*args: str):
    return CliRunner().invoke(main, list(args))


def _assert_one_line_error(result, expected: str) -> None:
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    source = tiny_model("llama")
    source.save_pretrained(root / "hf")
    save_flexi(build_flexi(source, mixed_plan("llama", ofn="rms")), root / "flexi")
    return root


def test_help_lists_the_commands():
    result = _run("--help")
    assert result.exit_code == 0
    for command in ("info", "plan"):
        assert command in result.output


def test_info_on_a_hugging_face_folder(folders):
    result = _run("info", str(folders / "hf"))
    assert result.exit_code == 0, result.output
    assert "llama, Hugging Face model" in result.output
    assert "6 executed of 6 source blocks" in result.output


def test_info_on_a_flexi_checkpoint_shows_the_plan(folders):
    result = _run("info", str(folders / "flexi"))
    assert result.exit_code == 0, result.output
    assert "7 executed of 6 source blocks (4 original, 3 shared, 1 removed)" in result.output
    assert "shared (inserted)" in result.output
    stored = int(result.output.split("stored")[1].split("parameters")[0].replace(",", "").strip())
    unshared = int(result.output.split("without sharing")[1].split("parameters")[0].replace(",", "").strip())
    assert stored < unshared


def test_plan_show_table_and_json(folders):
    result = _run("plan", "show", str(folders / "flexi"))
    assert result.exit_code == 0 and "fingerprint" in result.output and "removed" in result.output
    as_json = _run("plan", "show", "--json", str(folders / "flexi" / "flexi_plan.json"))
    assert json.loads(as_json.output)["format"] == "flexi-plan/1"


def test_nonexistent_path(tmp_path):
    _assert_one_line_error(_run("info", str(tmp_path / "nope")), "no such file or folder")


def test_folder_without_config(tmp_path):
    _assert_one_line_error(_run("info", str(tmp_path)), "config.json is missing")


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    _assert_one_line_error(
        _run("info", str(tmp_path)), "unsupported model_type 'gpt2'; supported: llama, mistral, qwen2"
    )


def test_plan_whose_shared_block_sources_a_removed_block(tmp_path):
    plan = BlockPlan(SourceInfo("llama", 3), (original(0), removed(1), shared(1, replaces=2, adapter=AdapterSpec(4))))
    (tmp_path / "flexi_plan.json").write_text(json.dumps(plan.to_json()))
    _assert_one_line_error(_run("plan", "show", str(tmp_path)), "sources block 1, which is removed")


def test_plan_with_adapter_rank_zero(tmp_path):
    plan = BlockPlan(SourceInfo("llama", 3), (original(0), original(1), shared(1, replaces=2, adapter=AdapterSpec(0))))
    (tmp_path / "flexi_plan.json").write_text(json.dumps(plan.to_json()))
    _assert_one_line_error(_run("plan", "show", str(tmp_path)), "adapter rank must be a positive integer, got 0")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_truncated_or_corrupt_weights(folders, tmp_path, damage):
    import shutil

    target = tmp_path / "flexi"
    shutil.copytree(folders / "flexi", target)
    weights = target / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 100)
    _assert_one_line_error(_run("info", str(target)), "model.safetensors")


def test_real_process_prints_one_line_and_exits_non_zero(tmp_path):
    """The installed console entry point, in its own process: no traceback, exit code 2."""
    proc = subprocess.run(
        [sys.executable, "-m", "flexi_export", "info", str(tmp_path / "missing")], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: no such file or folder")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
