"""Structure checks: they pass on real bundles, and each one fails on a graph corrupted the way it guards against."""

from __future__ import annotations

import copy
import platform
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from flexi_export.export import export_onnx
from flexi_export.model import build_flexi
from flexi_export.verify.structure import (
    FOLDED_OPS,
    check_duplicates,
    check_external_data,
    check_initializers,
    check_no_weight_ops,
    check_ort_optimized,
    check_structure,
    check_values,
    external_weights,
)
from tests.helpers import FAMILIES, mixed_plan, tiny_model

SHARED_Q = "model.layers.1.self_attn.q_proj.weight"  # block 1's q_proj, also read by executed block 2


def _load(b):
    return onnx.load(str(b.onnx_path), load_external_data=False), copy.deepcopy(b.manifest)


def _copy_bundle(b, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(b.path, out)
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dense", [False, True])
def test_every_structure_check_passes_on_exported_bundles(family, dense, flexi_model, bundle):
    model = flexi_model(family, "mixed")
    results = check_structure(bundle(family, "mixed", dense=dense).path, model)
    assert [r.name for r in results if not r.passed] == [], [r.problems for r in results]
    assert len(results) == 6


def test_a_shared_weight_is_one_initializer_read_by_both_blocks(bundle):
    proto, manifest = _load(bundle("llama", "mixed"))
    readers = sorted(n.name for n in proto.graph.node if SHARED_Q in n.input)
    assert readers == ["/model/layers.1/attn/q_proj/MatMul", "/model/layers.2/attn/q_proj/MatMul"]
    names = [t.name for t in proto.graph.initializer]
    assert names.count(SHARED_Q) == 1
    assert not any(n.startswith("model.layers.2.self_attn.q_proj.weight") for n in names)
    row = next(r for r in manifest["initializers"] if r["name"] == SHARED_Q)
    assert row["owner_block"] == 1 and row["consuming_blocks"] == [1, 2]


def test_zero_initialised_lora_b_tensors_stay_their_own_initializers(tmp_path):
    """A freshly built Flexi model has all-zero lora_B: equal bytes, distinct parameters, distinct names."""
    model = build_flexi(tiny_model("llama"), mixed_plan("llama"))
    b = export_onnx(model, tmp_path / "zero", progress=False)
    lora_b = {n for n, _ in model.named_parameters() if n.endswith("lora_B.weight")}
    proto, manifest = _load(b)
    assert lora_b and lora_b <= {t.name for t in proto.graph.initializer}
    duplicates = check_duplicates(proto, b.data_path, manifest)
    assert duplicates.passed and duplicates.figures["equal_by_value_groups"] >= 1
    assert check_initializers(proto, manifest, model).passed


# ---------------------------------------------------------------------------------------------- negative tests
def _duplicate_shared_weight(proto, manifest, declare: bool):
    """Give executed block 2 its own copy of block 1's q_proj (same bytes, a second initializer)."""
    original = external_weights(proto)[SHARED_Q]
    twin = copy.deepcopy(original)
    twin.name = "model.layers.2.self_attn.q_proj.weight"
    proto.graph.initializer.append(twin)
    node = next(n for n in proto.graph.node if n.name == "/model/layers.2/attn/q_proj/MatMul")
    node.input[1] = twin.name
    row = next(r for r in manifest["initializers"] if r["name"] == SHARED_Q)
    row["consumers"].remove(node.name)
    if declare:
        manifest["initializers"].append({**row, "name": twin.name, "consumers": [node.name], "transform": "copy"})
    return twin.name


def test_check_initializers_fails_on_a_copied_shared_weight(flexi_model, bundle):
    proto, manifest = _load(bundle("llama", "mixed"))
    twin = _duplicate_shared_weight(proto, manifest, declare=False)
    result = check_initializers(proto, manifest, flexi_model("llama", "mixed"))
    assert not result.passed
    assert any(twin in p and "not in the manifest" in p for p in result.problems)
    assert any(twin in p and "not a parameter" in p for p in result.problems)


def test_check_initializers_fails_on_a_missing_parameter_and_an_embedded_weight(flexi_model, bundle):
    proto, manifest = _load(bundle("llama", "mixed"))
    weights = external_weights(proto)
    gone = "model.layers.2.self_attn.q_proj.lora_B.weight"
    proto.graph.initializer.remove(weights[gone])
    manifest["initializers"] = [r for r in manifest["initializers"] if r["name"] != gone]
    norm = weights["model.norm.weight"]
    embedded = numpy_helper.from_array(np.ones(list(norm.dims), np.float32), norm.name)
    proto.graph.initializer.remove(norm)
    proto.graph.initializer.append(embedded)
    problems = check_initializers(proto, manifest, flexi_model("llama", "mixed")).problems
    assert any(gone in p and "no initializer" in p for p in problems)
    assert any("model.norm.weight" in p and "embedded" in p for p in problems)


def test_check_duplicates_fails_on_a_declared_copy_in_a_shared_bundle(bundle):
    b = bundle("llama", "mixed")
    proto, manifest = _load(b)
    _duplicate_shared_weight(proto, manifest, declare=True)
    result = check_duplicates(proto, b.data_path, manifest)
    assert not result.passed and "not distinct parameters" in result.problems[0]
    assert check_duplicates(*_load(b)[:1], b.data_path, b.manifest).passed


@pytest.mark.parametrize("op_type", FOLDED_OPS)
def test_check_no_weight_ops_fails_when_an_op_reads_a_weight(op_type, bundle):
    proto, _ = _load(bundle("qwen2", "mixed"))
    assert check_no_weight_ops(proto).passed
    inputs = [SHARED_Q] + (["/scale"] if op_type == "DequantizeLinear" else [])
    attrs = {"to": TensorProto.FLOAT16} if op_type == "Cast" else {}
    proto.graph.node.append(helper.make_node(op_type, inputs, ["/bad/output_0"], name="/bad", **attrs))
    result = check_no_weight_ops(proto)
    assert not result.passed and "/bad" in result.problems[0]


def test_check_external_data_fails_on_misalignment_overlap_location_and_size(bundle, tmp_path):
    b = bundle("llama", "mixed")
    proto, manifest = _load(b)
    assert check_external_data(proto, b.data_path, manifest).passed
    weights = external_weights(proto)
    embed = {i.key: i for i in weights["model.embed_tokens.weight"].external_data}
    embed["offset"].value = str(int(embed["offset"].value) + 4)  # unaligned and overlapping its neighbour
    {i.key: i for i in weights["model.norm.weight"].external_data}["location"].value = "elsewhere.bin"
    problems = check_external_data(proto, b.data_path, manifest).problems
    assert any("not aligned" in p for p in problems)
    assert any("overlap" in p for p in problems)
    assert any("elsewhere.bin" in p for p in problems)
    folder = _copy_bundle(b, tmp_path)
    data = folder / "onnx" / "model.onnx_data"
    with open(data, "ab") as f:  # a file holding more than its weights (e.g. a stale second copy)
        f.write(b"\0" * manifest["totals"]["unique_weight_bytes"])
    proto, _ = _load(b)
    assert any("more than unique weights" in p for p in check_external_data(proto, data, manifest).problems)


def test_check_values_fails_when_a_stored_weight_differs(flexi_model, bundle, tmp_path):
    b = bundle("mistral", "mixed")
    model = flexi_model("mistral", "mixed")
    folder = _copy_bundle(b, tmp_path)
    data = folder / "onnx" / "model.onnx_data"
    proto, manifest = _load(b)
    assert check_values(proto, data, manifest, model).passed
    row = next(r for r in manifest["initializers"] if r["name"] == SHARED_Q)
    with open(data, "r+b") as f:
        f.seek(row["offset"] + 8)
        f.write(np.float32(123.0).tobytes())
    problems = check_values(proto, data, manifest, model).problems
    assert any(SHARED_Q in p and "values differ" in p for p in problems)
    assert any(SHARED_Q in p and "sha256" in p for p in problems)


def test_check_ort_optimized_fails_when_onnxruntime_folds_a_copy(bundle, tmp_path):
    """Reshape(embedding) -> Gather: onnxruntime folds the Reshape into a second, weight-sized tensor."""
    b = bundle("qwen2", "mixed")
    folder = _copy_bundle(b, tmp_path)
    proto, _ = _load(b)
    embed = external_weights(proto)["model.embed_tokens.weight"]
    shape = numpy_helper.from_array(np.array(list(embed.dims), np.int64), "/bad/shape")
    proto.graph.initializer.append(shape)
    proto.graph.node.insert(0, helper.make_node("Reshape", [embed.name, shape.name], ["/bad/output_0"], name="/bad"))
    gather = next(n for n in proto.graph.node if n.op_type == "Gather" and embed.name in n.input)
    gather.input[0] = "/bad/output_0"
    path = folder / "onnx" / "model.onnx"
    path.write_bytes(proto.SerializeToString())
    result = check_ort_optimized(path)
    assert not result.passed and any("weight-sized copy" in p for p in result.problems)
    assert check_ort_optimized(b.onnx_path).passed


def test_fp16_bundle_structure_holds_but_the_x86_cpu_ep_upcasts_its_weights(flexi_model, bundle):
    """In the file an fp16 bundle is as clean as fp32; on the x86 CPU EP onnxruntime inserts fp32 copies
    (documented in docs/export.md and the manifest's session options note)."""
    b = bundle("llama", "mixed", dtype="fp16")
    results = {r.name: r for r in check_structure(b.path, flexi_model("llama", "mixed"))}
    assert all(r.passed for name, r in results.items() if name != "onnxruntime keeps the weights")
    assert all(t.data_type == TensorProto.FLOAT16 for t in external_weights(_load(b)[0]).values())
    assert "x86-64" in b.manifest["session_options"]["note"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        ort_result = results["onnxruntime keeps the weights"]
        assert not ort_result.passed and ort_result.figures["new_weight_sized"] > 0
