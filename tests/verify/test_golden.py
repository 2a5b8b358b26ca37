"""The committed golden summary of the reference bundle's graph still matches what the exporter writes."""

from __future__ import annotations

import difflib

import pytest

from flexi_export.verify.summary import GOLDEN, GOLDEN_NAME, graph_summary, reference_summary


@pytest.mark.slow
def test_reference_graph_summary_matches_the_committed_golden_file(tmp_path):
    expected = (GOLDEN / f"{GOLDEN_NAME}.md").read_text()
    actual = reference_summary(workdir=tmp_path)
    if actual != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), actual.splitlines(True), "golden", "now", n=1))
        pytest.fail(f"the exported graph changed; review, then run scripts/update_golden.py:\n{diff[:4000]}")


def test_summary_lists_ops_owners_users_and_totals(tmp_path):
    from flexi_export.export import export_onnx
    from flexi_export.model import build_flexi
    from tests.helpers import mixed_plan, tiny_model

    export_onnx(build_flexi(tiny_model("qwen2"), mixed_plan("qwen2")), tmp_path / "b", check=False, progress=False)
    text = graph_summary(tmp_path / "b")
    assert "| Gemm | 1 |" in text  # tied embedding: Gather + Gemm(transB=1) on one initializer
    # block 1's q_proj is owned by executed block 1 and read by blocks 1 and 2 (the shared replacement)
    assert "| model.layers.1.self_attn.q_proj.weight | " in text and "| 1 | 1,2 | 64x64 |" in text
    assert "| unique_weight_bytes |" in text and "| bytes_without_sharing |" in text
