"""verify: every check passes on a real export, and each can fail (the issue's negative cases)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from flexi_export.cli import main
from flexi_export.errors import BundleError
from flexi_export.export import export_onnx
from flexi_export.verify import memory
from flexi_export.verify.integrity import check_integrity
from flexi_export.verify.report import write_report
from flexi_export.verify.run import verify
from tests.verify import surgery
from tests.verify.models import shared_flexi_checkpoint

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A Flexi checkpoint (blocks 2 and 3 share block 1's matrices) of a model whose matrices are 0.25-1 MiB,
    so that a weight copied to the heap is far above measurement noise, plus its shared and dense bundles."""
    root = tmp_path_factory.mktemp("verify")
    flexi = shared_flexi_checkpoint(root / "ck")
    export_onnx(flexi, root / "flexi", progress=False)
    export_onnx(flexi, root / "dense", dense=True, progress=False)
    return root


SHARED_Q = "model.layers.1.self_attn.q_proj.weight"
_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj")  # fmt: skip
SHARED = [f"model.layers.1.{m}.weight" for m in _MODULES]


def _check(report, name):
    return next(c for c in report.checks if c.name == name)


@pytest.mark.slow
def test_every_check_passes_on_a_flexi_export_and_the_report_is_written(made, tmp_path):
    report = verify(made / "flexi", against=made / "ck", dense_bundle=made / "dense", progress=False)
    assert report.passed, [c.problems for c in report.failures]
    ratio = _check(report, "memory: sharing is real in RAM (Flexi / dense)").figures
    assert abs(ratio["resident_ratio"] / ratio["unique_ratio"] - 1) <= 0.05 and ratio["unique_ratio"] < 0.8
    assert set(report.memory) == {"flexi", "dense"} and set(report.memory["flexi"]) == {"recommended", "default"}
    paths = write_report(report, tmp_path / "report")
    data = json.loads(paths["json"].read_text())
    assert data["passed"] and len(data["checks"]) == len(report.checks)
    assert "| memory: weights resident once | PASS |" in paths["markdown"].read_text()
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_the_torch_model_parity_replays_reference_npz(made):
    report = verify(made / "flexi", check_memory=False, progress=False)
    assert report.passed
    replay = _check(report, "parity: reference.npz replay")
    assert all(case["greedy_identical"] for case in replay.figures.values())


def test_a_shared_weight_written_twice_fails_the_structure_check(made, tmp_path):
    bundle = surgery.copy_bundle(made / "flexi", tmp_path / "b")
    copy = surgery.duplicate_shared_weight(bundle, SHARED_Q)
    report = verify(bundle, against=made / "ck", check_memory=False, progress=False)
    problems = _check(report, "one initializer per parameter").problems
    assert any(copy in p and "not a parameter of the model" in p for p in problems)
    assert any("not distinct parameters (a copy)" in p for p in _check(report, "no duplicate contents").problems)
    assert not report.passed


@pytest.mark.slow
def test_a_transpose_on_shared_weights_fails_structure_and_measures_more_heap(made, tmp_path):
    bundle = surgery.copy_bundle(made / "flexi", tmp_path / "b")
    surgery.transpose_shared_weights(bundle, SHARED)
    report = verify(bundle, check_memory=False, progress=False)
    assert any("Transpose" in p for p in _check(report, "no folded ops on weights").problems)
    clean = memory.probe(made / "flexi", threads=1, prefill=16, decode=2)
    folded = memory.probe(bundle, threads=1, prefill=16, decode=2)
    grown = [p["after_load"]["RssAnon"] - p["baseline"]["RssAnon"] for p in (clean, folded)]
    transposed = sum(
        surgery.row(json.loads((made / "flexi" / "manifest.json").read_text()), n)["bytes"] for n in SHARED
    )
    assert grown[1] - grown[0] > 0.8 * transposed, (grown, transposed)  # onnxruntime folded each into a heap copy


def test_a_tampered_weight_fails_parity_with_a_clear_diff(made, tmp_path):
    bundle = surgery.copy_bundle(made / "flexi", tmp_path / "b")
    surgery.tamper_weight(bundle, "model.layers.4.mlp.down_proj.weight", 1.5, update_manifest=True)
    report = verify(bundle, against=made / "ck", check_memory=False, progress=False)
    prefill = _check(report, "parity: prefill logits and presents")
    assert any("prefill logits differ by up to" in p for p in prefill.problems)
    assert prefill.figures["max_abs_logits_diff"] > 1e-2
    values = _check(report, "values equal the source tensors").problems
    assert any("model.layers.4.mlp.down_proj.weight: values differ" in p for p in values)


def test_a_budget_below_the_measured_peak_fails(made):
    report = verify(made / "flexi", budget_mb=1, progress=False)
    budget = _check(report, "memory: peak within budget")
    assert budget.problems and "> budget 1 MiB" in budget.problems[0]
    assert budget.figures["peak"] > 1 * MiB


def test_a_manifest_that_does_not_match_the_data_file_is_refused_before_anything_runs(made, tmp_path):
    bundle = surgery.copy_bundle(made / "flexi", tmp_path / "b")
    surgery.tamper_weight(bundle, SHARED_Q, 2.0, update_manifest=False)
    with pytest.raises(BundleError, match=r"does not match manifest\.json: model\.layers\.1\.self_attn\.q_proj"):
        check_integrity(bundle)
    result = CliRunner().invoke(main, ["verify", str(bundle), "--report", str(tmp_path / "r")])
    assert result.exit_code == 2 and result.output.startswith("error: ") and "Traceback" not in result.output
    assert not (tmp_path / "r").exists()  # refused before anything ran or was written


def test_cli_exit_codes_and_failure_lines(made, tmp_path):
    ok = CliRunner().invoke(main, ["verify", str(made / "flexi"), "--no-memory", "--report", str(tmp_path / "ok")])
    assert ok.exit_code == 0, ok.output
    assert "verification PASSED" in ok.output and (tmp_path / "ok" / "verification.md").is_file()
    bad = CliRunner().invoke(main, ["verify", str(made / "flexi"), "--memory-budget-mb", "1", "--quiet",
                                    "--report", str(tmp_path / "bad")])  # fmt: skip
    assert bad.exit_code == 1
    line = next(x for x in bad.output.splitlines() if x.startswith("FAIL memory: peak within budget"))
    assert "MiB (VmHWM, whole process) > budget 1 MiB -- try:" in line


@pytest.mark.slow
def test_device_tests_pass_where_torch_transformers_and_flexi_export_cannot_be_imported(made, tmp_path):
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers', 'flexi_export'):\n"
        "            raise ImportError(f'{name} is blocked: device tests must not need it')\n"
        "sys.meta_path.insert(0, _Block())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "blocked" in probe.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(ROOT / "device_tests"), "--bundle", str(made / "flexi"),
         "-p", "no:cacheprovider", "-q", "--memory-budget-mb", "4000"],
        env=env, capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "4 passed" in proc.stdout and "flexi-export device summary" in proc.stdout
