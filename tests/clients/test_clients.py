"""The four external clients run exported bundles unchanged (``scripts/clients/check_clients.py``).

Slow: the first run creates the clients' environments (``scripts/clients/setup_envs.sh``: a venv with optimum-onnx
and CPU torch, a venv with onnxruntime-genai, transformers.js from npm); later runs reuse them. Needs PyPI, npm
and Node.js >= 18; nothing else is downloaded (the models are built here with random weights).
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from flexi_export.export import export_onnx
from flexi_export.export.clients import ClientCompatibilityWarning
from flexi_export.export.manifest import TOLERANCES
from tests.clients import models

ROOT = Path(__file__).resolve().parents[2]
CHECK = ROOT / "scripts" / "clients" / "check_clients.py"
CLIENT_ROWS = {
    "optimum",
    "onnxruntime-genai",
    "transformers.js",
    "ort-mobile (Fixed)",
    "ort-mobile (Runtime)",
}
#: greedy steps must be decided by more than 100x the logits difference fp32 bundles are held to
DECISIVE = 100 * TOLERANCES["fp32"]["logits_atol"]

pytestmark = pytest.mark.slow


def _export(make, out: Path, dtype: str = "fp32", target: str = "portable"):
    """Export ``make()``'s model; int4 skips the exporter's own check against torch (random weights quantize too
    coarsely for its top-1 bound; the clients are compared with onnxruntime's greedy run of the bundle)."""
    model, tokenizer = make()
    margin, eos = models.greedy_margin(model, tokenizer)
    assert margin > DECISIVE, f"{make.__name__}: greedy near-tie ({margin:.2g}): pick another seed"
    assert eos == 0, f"{make.__name__}: a reference row reaches EOS: pick another seed"
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClientCompatibilityWarning)  # these bundles must suit every client
        return export_onnx(
            model, out, tokenizer=tokenizer, dtype=dtype, target=target, progress=False, check=dtype == "fp32"
        )


def _check(*args: object) -> tuple[subprocess.CompletedProcess[str], list[dict]]:
    report = Path(args[-1])
    done = subprocess.run(
        [sys.executable, str(CHECK), *map(str, args[:-1]), "--report", str(report)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    print(done.stdout, done.stderr[-3000:])
    rows = json.loads((report / "clients.json").read_text()) if (report / "clients.json").is_file() else []
    return done, rows


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("client-bundles")
    return [
        _export(models.qwen2_tied, root / "qwen2-tied").path,
        _export(models.reference_flexi30, root / "reference-flexi30").path,
        _export(models.mistral_window, root / "mistral-window").path,
        _export(models.reference_flexi30, root / "reference-flexi30-int4", dtype="int4").path,
        # the fused graph (GroupQueryAttention, packed projections and adapters) in every client too
        _export(models.reference_flexi30, root / "reference-flexi30-cpu", target="cpu").path,
    ]


def test_every_client_loads_every_bundle_and_generates_the_reference_tokens(bundles, tmp_path):
    done, rows = _check(*bundles, tmp_path / "report")
    assert done.returncode == 0, done.stdout
    assert {(r["client"], r["bundle"]) for r in rows} == {(c, b.name) for c in CLIENT_ROWS for b in bundles}
    for row in rows:
        assert row["passed"] and row["loads"] and row["tokens_identical"], row
        compared, total = map(int, row["compared"].split("/"))
        assert compared == total == 3 * 16, row  # 3 prompts (single + batch of 2) x 16 tokens, no EOS cut-off
        if not row["client"].startswith("ort-mobile"):
            assert row["tokenizer"] == "identical", row
    assert "| optimum | qwen2-tied | yes | yes | 48/48 | identical |" in done.stdout
    usability = (tmp_path / "report" / "0-qwen2-tied" / "mobile" / "mobile_usability.txt").read_text()
    assert "Checking NNAPI" in usability and "CoreML" in usability
    for bundle in bundles:
        assert not any(p.name.startswith("tmp") for p in (bundle / "onnx").iterdir())  # the bundle stays untouched


def test_a_bundle_optimum_cannot_express_warns_at_export_and_fails_only_there(tmp_path):
    model, tokenizer = models.llama_wide_heads()
    with pytest.warns(ClientCompatibilityWarning, match=r"optimum cannot run .*head_dim = hidden_size"):
        bundle = export_onnx(model, tmp_path / "wide-heads", tokenizer=tokenizer, progress=False)
    assert not bundle.manifest["clients"]["optimum"]["compatible"]
    done, rows = _check(bundle.path, "--clients", "optimum,genai", tmp_path / "report")
    assert done.returncode == 1
    by_client = {r["client"]: r for r in rows}
    assert not by_client["optimum"]["passed"]
    assert "past_key_values" in by_client["optimum"]["error"]  # onnxruntime rejects the cache optimum built
    assert by_client["onnxruntime-genai"]["passed"]  # genai sizes the cache from genai_config's head_size
