"""Export-time client compatibility (``flexi_export.export.clients``) and the graph behaviour the clients rely on.

The clients themselves run in ``tests/clients`` (slow, their own environments); these tests check the rules the
exporter applies without them: which config / I/O a client cannot express, the warning and the manifest entry.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from flexi_export.export import export_onnx
from flexi_export.export.clients import (
    CLIENTS,
    GENAI,
    OPTIMUM,
    TRANSFORMERS_JS,
    ClientCompatibilityWarning,
    client_issues,
    compatibility,
    warn_client_issues,
)
from flexi_export.export.io_spec import IOSpec, decoder_io
from flexi_export.verify.runtime import OrtDecoder
from tests.helpers import tiny_model


def _config(model_type: str = "llama", hidden: int = 64, heads: int = 4) -> SimpleNamespace:
    return SimpleNamespace(model_type=model_type, hidden_size=hidden, num_attention_heads=heads)


def _io(*caches: tuple[int, int]) -> IOSpec:
    """An I/O spec whose layer ``i`` has cache ``caches[i]`` = (kv heads, head_dim)."""
    specs = [decoder_io(1, heads, head_dim, 320, "fp32") for heads, head_dim in caches]
    inputs = specs[0].inputs[:3] + tuple(t for s in specs for t in s.inputs[3:])
    outputs = specs[0].outputs[:1] + tuple(t for s in specs for t in s.outputs[1:])
    return IOSpec(inputs, outputs, len(caches))


def _by_client(issues: list) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for issue in issues:
        out.setdefault(issue.client, []).append(issue.reason)
    return out


def test_a_standard_llama_bundle_suits_every_client():
    assert client_issues(_config(), _io((2, 16), (2, 16)), opset=18) == []
    assert all(entry == {"compatible": True, "issues": []} for entry in compatibility([]).values())
    assert set(compatibility([])) == set(CLIENTS)


def test_head_dim_other_than_hidden_over_heads_is_an_optimum_issue_only():
    issues = _by_client(client_issues(_config(), _io((2, 32), (2, 32)), opset=18))
    assert set(issues) == {OPTIMUM}
    assert "head_dim = hidden_size // num_attention_heads = 16" in issues[OPTIMUM][0]
    assert "head_dim 32" in issues[OPTIMUM][0]


def test_model_types_whose_head_dim_optimum_reads_from_the_config_are_not_flagged():
    assert client_issues(_config("gemma"), _io((2, 32)), opset=18) == []


def test_an_unknown_model_type_is_an_issue_for_the_three_clients_that_read_config_json():
    issues = _by_client(client_issues(_config("mytinylm"), _io((2, 16)), opset=18))
    assert set(issues) == {OPTIMUM, GENAI, TRANSFORMERS_JS}
    assert all("'mytinylm'" in reasons[0] for reasons in issues.values())


def test_per_layer_cache_shapes_are_an_issue_for_optimum_and_genai_not_transformers_js():
    issues = _by_client(client_issues(_config(), _io((2, 16), (1, 16)), opset=18))
    assert set(issues) == {OPTIMUM, GENAI}
    assert "1x16, 2x16" in issues[GENAI][0]


def test_an_opset_newer_than_transformers_js_loads_is_flagged_for_it():
    issues = _by_client(client_issues(_config(), _io((2, 16)), opset=27))
    assert set(issues) == {TRANSFORMERS_JS}
    assert "<= 26" in issues[TRANSFORMERS_JS][0]


def test_each_issue_becomes_one_warning_and_a_manifest_entry():
    issues = client_issues(_config("mytinylm"), _io((2, 16)), opset=18)
    with pytest.warns(ClientCompatibilityWarning) as caught:
        warn_client_issues(issues)
    assert [str(w.message) for w in caught] == [str(i) for i in issues]
    manifest = compatibility(issues)
    assert not manifest[OPTIMUM]["compatible"] and manifest[OPTIMUM]["issues"] == [issues[0].reason]
    assert manifest["ort-mobile"] == {"compatible": True, "issues": []}


def test_export_warns_and_records_when_optimum_cannot_run_the_bundle(tmp_path: Path):
    model = tiny_model("llama", head_dim=32)  # hidden 64 / 4 heads = 16
    with pytest.warns(ClientCompatibilityWarning, match="optimum cannot run this bundle"):
        bundle = export_onnx(model, tmp_path / "b", progress=False, check=False)
    clients = bundle.manifest["clients"]
    assert not clients[OPTIMUM]["compatible"] and clients[GENAI]["compatible"]


def test_a_bundle_every_client_can_run_exports_without_a_client_warning(bundle):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClientCompatibilityWarning)
        b = bundle("qwen2", "mixed")
    assert all(entry["compatible"] for entry in b.manifest["clients"].values())


def test_a_sliding_window_counts_real_tokens_so_right_padding_decodes_like_no_padding(bundle):
    """onnxruntime-genai pads a batch on the right, so pad slots sit inside the cache; the window (8 in the tiny
    Mistral) must count the real tokens, as with left padding, or the pads would use up the window."""
    decoder = OrtDecoder(bundle("mistral", "mixed").path, threads=1)
    prompt, pads = np.arange(10, 16, dtype=np.int64), 3
    steps = np.arange(40, 50, dtype=np.int64)  # 6 + 10 tokens: well past the window
    layouts = {
        "none": (prompt, np.ones(6, np.int64), 5),
        "left": (
            np.r_[np.zeros(pads, np.int64), prompt],
            np.r_[np.zeros(pads, np.int64), np.ones(6, np.int64)],
            pads + 5,
        ),
        "right": (np.r_[prompt, np.zeros(pads, np.int64)], np.r_[np.ones(6, np.int64), np.zeros(pads, np.int64)], 5),
    }
    logits = {}
    for name, (ids, mask, last) in layouts.items():
        pos = np.maximum(np.cumsum(mask) - 1, 0)[None]
        out, present = decoder.run(ids[None], mask[None], pos)
        rows = [out[0, last]]
        mask, next_pos = mask[None], pos[:, last : last + 1] + 1
        for token in steps:
            mask = np.concatenate([mask, [[1]]], axis=1)
            out, present = decoder.run(np.array([[token]]), mask, next_pos, decoder.as_past(present))
            rows.append(out[0, -1])
            next_pos = next_pos + 1
        logits[name] = np.stack(rows)
    np.testing.assert_allclose(logits["left"], logits["none"], atol=1e-4)
    np.testing.assert_allclose(logits["right"], logits["none"], atol=1e-4)
