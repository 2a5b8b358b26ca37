"""verify on quantized bundles: int8 and int4 exports pass every check (structure, integrity, parity against the
PyTorch model with the same quantization, memory vs the dense export of the same dtype), and a tampered packed
weight fails the value check."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from flexi_export.checkpoint import save_flexi
from flexi_export.cli import main
from flexi_export.export import export_onnx
from flexi_export.model import build_flexi
from flexi_export.plan import AdapterSpec, BlockPlan, SourceInfo, original, shared
from flexi_export.source import load_source
from flexi_export.verify.run import verify
from flexi_export.verify.structure import check_structure
from tests.helpers import randomize_own, tiny_model
from tests.verify.models import shared_flexi_checkpoint


@pytest.fixture(scope="module")
def quant_made(tmp_path_factory):
    """A Flexi checkpoint whose blocks 2 and 3 share block 1's matrices (0.25-1 MiB in fp32, so a weight copied
    to the heap is far above measurement noise) and its int8 and int4 bundles."""
    root = tmp_path_factory.mktemp("verify-quant")
    flexi = shared_flexi_checkpoint(root / "ck")
    for dtype in ("int8", "int4"):
        export_onnx(flexi, root / dtype, dtype=dtype, progress=False)
    return root


def _check(report, name):
    return next(c for c in report.checks if c.name == name)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_every_check_passes_on_a_quantized_bundle(quant_made, dtype):
    report = verify(quant_made / dtype, against=quant_made / "ck", progress=False)
    assert report.passed, [(c.name, c.problems) for c in report.failures]
    ratio = _check(report, "memory: sharing is real in RAM (Flexi / dense)")
    assert not ratio.skipped and report.dense_manifest["dtype"] == dtype  # compared with the dense export in dtype
    effect = _check(report, "quantization: agreement with the unquantized model (reported, not bounded)")
    assert 0.0 <= effect.figures["prefill_top1_agreement"] <= 1.0
    heap = _check(report, "memory: weights stay out of the heap").figures
    packed = heap["packed_weights_bound"]
    assert (packed > 0) == (dtype == "int4")  # int4 recommends prepacking: its packed copies are on the heap


@pytest.mark.slow
def test_verify_command_passes_on_quantized_bundles_without_the_torch_model(quant_made):
    for dtype in ("int8", "int4"):
        result = CliRunner().invoke(main, ["verify", str(quant_made / dtype), "--no-memory", "--quiet"])
        assert result.exit_code == 0, result.output


def test_a_tampered_packed_weight_fails_the_value_check(quant_made, tmp_path):
    """Two codes of the shared matrix changed, the manifest's hash updated to match: only the comparison with
    the source matrix quantized as the manifest says can catch it."""
    copy = tmp_path / "int4"
    shutil.copytree(quant_made / "int4", copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    name = "model.layers.1.self_attn.q_proj.weight.qweight"
    row = next(r for r in manifest["initializers"] if r["name"] == name)
    raw = np.memmap(copy / "onnx" / "model.onnx_data", dtype=np.uint8, mode="r+", offset=row["offset"],
                    shape=(row["bytes"],))  # fmt: skip
    raw[0] ^= 0x11
    raw.flush()
    row["sha256"] = hashlib.sha256(raw.tobytes()).hexdigest()
    del raw
    (copy / "manifest.json").write_text(json.dumps(manifest))
    model = load_source(quant_made / "ck").model
    checks = {c.name: c for c in check_structure(copy, model=model, ort_optimized=False)}
    problems = checks["values equal the source tensors"].problems
    assert problems == [f"{name}: differs from model.layers.1.self_attn.q_proj.weight quantized as the manifest says "
                        "(nbits, qweight)"]  # fmt: skip


@pytest.mark.slow
def test_a_tied_int4_embedding_passes_verify_with_its_packed_copy_on_the_heap(tmp_path):
    """--quantize-embedding on a tied model: one packed table, gathered from the file and packed for the LM head
    (the heap bound counts that packed copy; the file copy stays mapped)."""
    torch.set_num_threads(1)
    source = tiny_model("qwen2", hidden_size=256, intermediate_size=512, vocab_size=4096, num_hidden_layers=3)
    plan = BlockPlan(SourceInfo("qwen2", 3), (original(0), original(1), shared(1, 2, AdapterSpec(rank=4))))
    flexi = randomize_own(build_flexi(source, plan))
    save_flexi(flexi, tmp_path / "ck")
    # accuracy level 0: tiny random models put many activations on int8 rounding ties (docs/export.md)
    export_onnx(flexi, tmp_path / "b", dtype="int4", quantize_embedding=True, accuracy_level=0, progress=False)
    report = verify(tmp_path / "b", against=tmp_path / "ck", progress=False)
    assert report.passed, [(c.name, c.problems) for c in report.failures]
    heap = _check(report, "memory: weights stay out of the heap").figures
    table = [r for r in report.manifest["initializers"] if r["source"] == ["model.embed_tokens.weight"]]
    assert heap["packed_weights_bound"] >= 2 * sum(r["bytes"] for r in table)
