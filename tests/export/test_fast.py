"""``--target cpu``: the fused onnxruntime graph (GroupQueryAttention, SkipSimplifiedLayerNormalization, packed
projections) computes the PyTorch model and keeps every shared weight one initializer."""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from flexi_export.cli import main
from flexi_export.errors import ExportError
from flexi_export.export import Bundle, export_onnx
from flexi_export.verify.runtime import device, position_ids_from_mask
from flexi_export.verify.structure import check_structure
from tests.export.util import decoder, max_excess, ort_vs_quantized_reference, random_ids, torch_step


@pytest.fixture(scope="module")
def cpu_bundle(bundle: Callable[..., Bundle]) -> Callable[..., Bundle]:
    """``cpu_bundle(family, plan, dtype="fp32", dense=False)``: the cached ``--target cpu`` export."""
    return functools.partial(bundle, target="cpu")


def _ops(bundle: Bundle) -> Counter[str]:
    return Counter(n.op_type for n in onnx.load(str(bundle.onnx_path), load_external_data=False).graph.node)


@pytest.mark.parametrize(
    ("family", "plan"), [("llama", "identity"), ("qwen2", "mixed"), ("llama", "mixed"), ("llama", "partial")]
)
def test_cpu_target_matches_torch_prefill_decode_and_cache(family, plan, flexi_model, cpu_bundle):
    model, bundle = flexi_model(family, plan), cpu_bundle(family, plan)
    ort = decoder(bundle)
    ids = random_ids(model.config.vocab_size, 2, 7)
    mask = np.ones_like(ids)
    pos = position_ids_from_mask(mask)
    ref_logits, ref_cache, cache = torch_step(model, ids, mask, pos)
    logits, present = ort.run(ids, mask, pos)
    assert max_excess(logits, ref_logits) <= 0
    for i, (key, value) in enumerate(ref_cache):  # rotary keys included: the cos/sin caches are the model's
        assert max_excess(present[f"present.{i}.key"], key) <= 0
        assert max_excess(present[f"present.{i}.value"], value) <= 0
    token = ref_logits[:, -1:].argmax(-1)
    mask2 = np.ones((2, 8), np.int64)
    ref_step, _, _ = torch_step(model, token, mask2, pos[:, -1:] + 1, cache)
    step, _ = ort.run(token, mask2, pos[:, -1:] + 1, ort.as_past(present))
    assert max_excess(step, ref_step) <= 0


@pytest.mark.parametrize(("family", "plan"), [("llama", "identity"), ("qwen2", "mixed"), ("mistral", "mixed")])
def test_cpu_target_replays_the_reference_with_identical_greedy_tokens(family, plan, cpu_bundle):
    """reference.npz: left-padded batch and sliding window (Mistral) included, greedy tokens identical."""
    result = device.replay(cpu_bundle(family, plan).path, threads=1)
    assert result["passed"], result["problems"]
    assert all(case["greedy_identical"] for case in result["cases"])


def test_cpu_target_graph_uses_the_fused_ops(cpu_bundle):
    bundle = cpu_bundle("llama", "mixed")
    ops, blocks = _ops(bundle), bundle.manifest["io"]["num_layers"]
    assert bundle.manifest["target"] == "cpu"
    assert ops["GroupQueryAttention"] == blocks
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * blocks
    assert "Softmax" not in ops and "Cos" not in ops


def test_a_shared_blocks_adapters_are_two_products_per_pack(cpu_bundle):
    """Adapters on every member: one stacked-A and one block-diagonal-B product per pack, so GroupQueryAttention
    reads the packed q/k/v; adapters on some members only: each member's own delta, added after a Split."""
    for plan, lora_matmuls, packed_qkv in (("mixed", 8, True), ("partial", 6, False)):
        nodes = onnx.load(str(cpu_bundle("llama", plan).onnx_path), load_external_data=False).graph.node
        block = [n for n in nodes if n.name.startswith("/model/layers.2/")]  # shared(1) in mixed_plan
        assert sum(1 for n in block if n.op_type == "MatMul" and "/lora_" in n.name) == lora_matmuls, plan
        gqa = next(n for n in block if n.op_type == "GroupQueryAttention")
        assert (gqa.input[1] == "") == packed_qkv, plan  # packed mode: k and v inputs left empty


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_packed_shared_matrix_is_one_initializer_read_by_every_sharing_block(family, flexi_model, cpu_bundle):
    bundle = cpu_bundle(family, "mixed")
    rows = {r["name"]: r for r in bundle.manifest["initializers"]}
    assert not [n for n in rows if n.endswith(("q_proj.weight", "gate_proj.weight"))]  # only packed matrices
    qkv = rows["model.layers.1.self_attn.qkv_proj.weight"]
    assert qkv["consuming_blocks"] == [1, 2]  # block 2 is shared(1) in mixed_plan
    assert qkv["transform"] == "pack" and [p["source"][0].split(".")[-2] for p in qkv["parts"]] == [
        "q_proj",
        "k_proj",
        "v_proj",
    ]
    # adapters stay the block's own, packed beside the shared pack: A's stacked, B's on a block diagonal
    prefix = "model.layers.2.self_attn.qkv_proj"
    a, b = rows[f"{prefix}.lora_A.weight"], rows[f"{prefix}.lora_B.weight"]
    assert a["consuming_blocks"] == b["consuming_blocks"] == [2]
    assert a["transform"] == "pack" and b["transform"] == "block_diag"
    assert [p["source"][0] for p in b["parts"]] == [f"model.layers.2.self_attn.{r}_proj.lora_B.weight" for r in "qkv"]
    assert sum(1 for n in rows if "qkv_proj.weight" in n) == 4  # source blocks 0, 1, 4, 5 own a pack each
    if family == "qwen2":
        assert rows["model.layers.1.self_attn.qkv_proj.bias"]["consuming_blocks"] == [1, 2]
    # packs and block diagonals count their members' parameters (the diagonal's zeros are layout)
    assert bundle.manifest["totals"]["parameters"] == sum(p.numel() for p in flexi_model(family, "mixed").parameters())
    failures = [r for r in check_structure(bundle.path, flexi_model(family, "mixed")) if not r.passed]
    assert not failures, [(r.name, r.problems) for r in failures]


@pytest.mark.slow
def test_cpu_target_int4_packs_and_quantizes_each_shared_matrix_once(flexi_model, cpu_bundle):
    bundle = cpu_bundle("llama", "mixed", dtype="int4")
    rows = {r["name"]: r for r in bundle.manifest["initializers"]}
    assert rows["model.layers.1.self_attn.qkv_proj.weight.qweight"]["consuming_blocks"] == [1, 2]
    assert _ops(bundle)["MatMulNBits"] == 4 * 7  # qkv, o, gate_up, down in each of the 7 executed blocks
    assert device.replay(bundle.path, threads=1)["passed"]


@pytest.mark.slow
def test_cpu_target_dense_export_packs_each_blocks_merged_matrices(flexi_model, cpu_bundle):
    bundle = cpu_bundle("llama", "mixed", dense=True)
    row = {r["name"]: r for r in bundle.manifest["initializers"]}["model.layers.2.self_attn.qkv_proj.weight"]
    assert row["consuming_blocks"] == [2] and row["parts"][0]["transform"] == "lora_merge"
    failures = [r for r in check_structure(bundle.path, flexi_model("llama", "mixed")) if not r.passed]
    assert not failures, [(r.name, r.problems) for r in failures]
    assert device.replay(bundle.path, threads=1)["passed"]


def test_unknown_target_and_fp16_cpu_target_fail_clearly(flexi_model, tmp_path):
    model = flexi_model("llama", "identity")
    with pytest.raises(ExportError, match="unsupported target 'gpu'"):
        export_onnx(model, tmp_path / "a", target="gpu", progress=False)
    with pytest.raises(ExportError, match="fp16"):
        export_onnx(model, tmp_path / "b", target="cpu", dtype="fp16", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_target_option(tmp_path):
    result = CliRunner().invoke(
        main, ["export", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--target", "tpu"]
    )
    assert result.exit_code == 2 and "tpu" in result.output


@pytest.mark.parametrize("symmetric", [True, False])
def test_cpu_target_untied_int4_embedding_is_one_gather_block_quantized(flexi_model, tmp_path, symmetric):
    """An untied int4 embedding: one GatherBlockQuantized reading the stored rows (the portable graph unpacks
    them with ~12 standard nodes), the same values as the dequantized PyTorch model, verify passes."""
    model = flexi_model("llama", "mixed")
    assert not model.config.tie_word_embeddings
    kw = {"quantize_embedding": True, "accuracy_level": 0, "symmetric": symmetric}
    bundle = export_onnx(model, tmp_path / "b", dtype="int4", target="cpu", progress=False, **kw)
    rows = [r for r in bundle.manifest["initializers"] if r["source"] == ["model.embed_tokens.weight"]]
    parts = {r["quantization"]["part"]: r for r in rows}
    assert set(parts) == ({"qweight", "scales"} if symmetric else {"qweight", "scales", "zero_points"})
    assert {r["quantization"]["op"] for r in rows} == {"GatherBlockQuantized"}
    hidden = model.config.hidden_size
    assert parts["qweight"]["shape"] == [model.config.vocab_size, hidden // 2]
    nodes = onnx.load(str(bundle.onnx_path), load_external_data=False).graph.node
    readers = [n for n in nodes if parts["qweight"]["name"] in n.input]
    assert [n.op_type for n in readers] == ["GatherBlockQuantized"]
    assert not [n for n in nodes if n.op_type in ("BitShift", "BitwiseAnd")]  # no unpacking subgraph
    got, want = ort_vs_quantized_reference(bundle, model, bundle.manifest["quantization"])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    failures = [r for r in check_structure(bundle.path, model) if not r.passed]
    assert not failures, [(r.name, r.problems) for r in failures]
