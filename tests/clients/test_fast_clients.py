"""``--target cpu`` bundles in onnxruntime-genai: its right-padded batches, sliding window and int4 included."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flexi_export.export import export_onnx
from tests.clients import models

ROOT = Path(__file__).resolve().parents[2]
CHECK = ROOT / "scripts" / "clients" / "check_clients.py"
SETUP = ROOT / "scripts" / "clients" / "setup_envs.sh"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def genai_environment() -> None:
    """Create .venv-genai if needed (a no-op when it is up to date), so a clean clone runs these tests too."""
    subprocess.run(["bash", str(SETUP), "genai"], check=True, cwd=ROOT, timeout=900)


@pytest.mark.parametrize(("make", "dtype", "options"), [
    (models.qwen2_tied, "fp32", {}),
    (models.mistral_window, "fp32", {}),
    (models.reference_flexi30, "int4", {}),
    (models.mistral_window, "int4", {"quantize_embedding": True}),  # untied: GatherBlockQuantized embedding
])  # fmt: skip
def test_onnxruntime_genai_generates_the_reference_tokens_from_a_cpu_target_bundle(make, dtype, options, tmp_path):
    model, tokenizer = make()
    out = tmp_path / make.__name__
    check = dtype == "fp32"
    export_onnx(model, out, tokenizer=tokenizer, dtype=dtype, target="cpu", progress=False, check=check, **options)
    report = tmp_path / "report"
    command = [sys.executable, str(CHECK), str(out), "--clients", "genai", "--no-setup", "--report", str(report)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    rows = json.loads((report / "clients.json").read_text())
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert rows and all(r["passed"] and r["tokens_identical"] for r in rows), rows
