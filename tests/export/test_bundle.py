"""The bundle: files, configs, manifest, I/O contract, graph layout and reference.npz, as DESIGN.md specifies."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from tokenizers import Tokenizer

from flexi_export.errors import ExportError, UnsupportedModelError
from flexi_export.export import export_onnx
from flexi_export.export.check import check_onnx
from flexi_export.export.external_data import PAGE, alignment_for
from flexi_export.export.rope import rope_tables
from flexi_export.model import get_plan
from flexi_export.stats import count_parameters
from tests.export.util import char_tokenizer, decoder
from tests.helpers import FAMILIES, tiny_config, tiny_model


def _graph(b):
    return onnx.load(str(b.onnx_path), load_external_data=False)


def test_bundle_has_the_files_of_the_design(bundle):
    b = bundle("llama", "mixed")
    names = {p.relative_to(b.path).as_posix() for p in b.path.rglob("*") if p.is_file()}
    assert names == {
        "config.json",
        "generation_config.json",
        "genai_config.json",
        "flexi_plan.json",
        "manifest.json",
        "reference.npz",
        "onnx/model.onnx",
        "onnx/model.onnx_data",
    }


def test_tokenizer_files_are_written_and_used_for_the_reference_prompts(tmp_path, flexi_model):
    tokenizer = char_tokenizer()
    b = export_onnx(flexi_model("qwen2", "mixed"), tmp_path / "b", tokenizer=tokenizer, progress=False)
    assert (b.path / "tokenizer.json").is_file() and (b.path / "tokenizer_config.json").is_file()
    prefix = tokenizer("def fibonacci")["input_ids"]
    assert b.reference()[0].input_ids[0, : len(prefix)].tolist() == prefix
    reloaded = Tokenizer.from_file(str(b.path / "tokenizer.json"))
    assert reloaded.encode("import os").ids == tokenizer("import os")["input_ids"]


@pytest.mark.parametrize("family", FAMILIES)
def test_config_keeps_the_standard_model_type_and_counts_executed_blocks(family, bundle, flexi_model):
    b = bundle(family, "mixed")
    config = json.loads((b.path / "config.json").read_text())
    executed = get_plan(flexi_model(family, "mixed")).num_executed
    assert config["model_type"] == family
    assert config["num_hidden_layers"] == executed == 7
    assert config["transformers.js_config"]["use_external_data_format"] is True
    genai = json.loads((b.path / "genai_config.json").read_text())
    decoder_config = genai["model"]["decoder"]
    assert decoder_config["filename"] == "onnx/model.onnx"
    assert decoder_config["num_hidden_layers"] == executed
    assert (decoder_config["num_key_value_heads"], decoder_config["head_size"]) == (2, 16)
    assert genai["search"]["past_present_share_buffer"] is False
    assert json.loads((b.path / "flexi_plan.json").read_text())["entries"][3] == {"kind": "removed", "source": 3}
    assert b.plan().fingerprint() == b.manifest["plan_fingerprint"]


def test_io_contract_names_order_and_dims(bundle):
    b = bundle("mistral", "mixed")
    graph = _graph(b).graph

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    inputs, outputs = list(graph.input), list(graph.output)
    assert [i.name for i in inputs[:3]] == ["input_ids", "attention_mask", "position_ids"]
    assert [i.name for i in inputs[3:7]] == [
        "past_key_values.0.key",
        "past_key_values.0.value",
        "past_key_values.1.key",
        "past_key_values.1.value",
    ]
    assert [o.name for o in outputs[:3]] == ["logits", "present.0.key", "present.0.value"]
    assert len(inputs) == 3 + 2 * 7 and len(outputs) == 1 + 2 * 7
    assert dims(inputs[1]) == ["batch_size", "past_sequence_length + sequence_length"]
    assert dims(inputs[3]) == ["batch_size", 2, "past_sequence_length", 16]
    assert dims(outputs[0]) == ["batch_size", "sequence_length", 320]
    assert dims(outputs[1]) == ["batch_size", 2, "past_sequence_length + sequence_length", 16]
    assert inputs[0].type.tensor_type.elem_type == TensorProto.INT64
    assert b.manifest["io"]["inputs"][3]["shape"] == ["batch_size", 2, "past_sequence_length", 16]


def test_default_opset_18_and_ir_version_8_pass_checker_and_strict_shape_inference(bundle):
    b = bundle("qwen2", "mixed")
    proto = _graph(b)
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", 18)]
    assert proto.ir_version == 8 == b.manifest["ir_version"]
    check_onnx(b.onnx_path)  # raises on failure
    inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    assert len(inferred.graph.value_info) > len(proto.graph.node) // 2


def test_opset_22_exports_with_ir_version_10_and_runs(tmp_path, flexi_model):
    b = export_onnx(flexi_model("llama", "mixed"), tmp_path / "op22", opset=22, progress=False)
    assert _graph(b).opset_import[0].version == 22 and b.manifest["ir_version"] == 10
    case = b.reference()[1]
    logits, _ = decoder(b).run(case.input_ids, case.attention_mask, case.position_ids)
    keep = case.attention_mask.astype(bool)
    assert np.max(np.abs(logits[keep] - case.logits[keep])) < 1e-4


def test_check_onnx_reports_an_invalid_graph_as_an_export_error(bundle, tmp_path):
    proto = _graph(bundle("llama", "identity"))
    proto.graph.node[5].input[0] = "no_such_value"
    path = tmp_path / "bad.onnx"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(ExportError, match="not valid ONNX"):
        check_onnx(path)


def test_tied_embedding_is_one_initializer_read_by_gather_and_gemm_trans_b(bundle):
    graph = _graph(bundle("qwen2", "mixed")).graph
    embed = "model.embed_tokens.weight"
    readers = {n.op_type: n for n in graph.node if embed in n.input}
    assert set(readers) == {"Gather", "Gemm"}
    assert next(a.i for a in readers["Gemm"].attribute if a.name == "transB") == 1
    assert not any(t.name == "lm_head.weight" for t in graph.initializer)


def test_untied_lm_head_is_a_matmul_on_its_transposed_weight(bundle):
    graph = _graph(bundle("llama", "mixed")).graph
    head = next(t for t in graph.initializer if t.name == "lm_head.weight")
    assert list(head.dims) == [64, 320]
    assert [n.op_type for n in graph.node if "lm_head.weight" in n.input] == ["MatMul"]


def test_adapters_are_named_after_the_executed_block_in_peft_layout(bundle):
    b = bundle("llama", "mixed")
    graph = _graph(b).graph
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    assert shapes["model.layers.2.self_attn.q_proj.lora_A.weight"] == [64, 4]  # [in, r]
    assert shapes["model.layers.2.self_attn.q_proj.lora_B.weight"] == [4, 64]  # [r, out]
    assert shapes["model.layers.2.mlp.down_proj.ofn.weight"] == [64]
    assert shapes["model.layers.2.input_layernorm.weight"] == [64]  # own norms
    assert shapes["model.layers.1.self_attn.q_proj.weight"] == [64, 64]
    node_names = {n.name for n in graph.node}
    assert {"/model/layers.2/attn/q_proj/MatMul", "/model/layers.2/attn/q_proj/lora_A/MatMul"} <= node_names


def test_manifest_rows_totals_and_session_options(bundle, flexi_model):
    b = bundle("llama", "mixed")
    manifest = b.manifest
    counts = count_parameters(flexi_model("llama", "mixed"))
    totals = manifest["totals"]
    assert totals["unique_weight_bytes"] == counts.unique_bytes
    assert totals["bytes_without_sharing"] == counts.unshared_bytes
    assert totals["data_file_bytes"] == b.data_path.stat().st_size
    rows = manifest["initializers"]
    assert sum(r["bytes"] for r in rows) == totals["unique_weight_bytes"]
    for row in rows:
        assert row["offset"] % alignment_for(row["bytes"]) == 0
        assert set(row) >= {"name", "role", "owner_block", "consuming_blocks", "dtype", "shape", "bytes", "sha256"}
    paged = [r for r in rows if r["bytes"] >= PAGE]
    assert paged and all(r["offset"] % PAGE == 0 for r in paged)
    assert totals["data_file_bytes"] < totals["unique_weight_bytes"] + PAGE  # small tensors packed into gaps
    assert manifest["session_options"]["config_entries"] == {"session.disable_prepacking": "1"}
    assert manifest["tolerances"]["logits_atol"] == 1e-4
    assert manifest["dense"] is False and manifest["dtype"] == "fp32"


def test_dense_bundle_stores_every_block_privately(bundle):
    b = bundle("llama", "mixed", dense=True)
    manifest = b.manifest
    assert manifest["dense"] is True
    assert manifest["totals"]["shared_initializers"] == 0
    assert manifest["totals"]["bytes_without_sharing"] == manifest["totals"]["unique_weight_bytes"]
    rows = {r["name"]: r for r in manifest["initializers"]}
    merged = rows["model.layers.2.self_attn.q_proj.weight"]
    assert merged["transform"] == "lora_merge" and merged["source"][0] == "model.layers.1.self_attn.q_proj.weight"
    assert not any("lora_" in name for name in rows)
    shared = bundle("llama", "mixed").manifest["totals"]
    assert manifest["totals"]["unique_weight_bytes"] > shared["unique_weight_bytes"]


def test_reference_npz_holds_a_single_and_a_left_padded_batch_case(bundle):
    b = bundle("mistral", "mixed")
    cases = {c.name: c for c in b.reference()}
    assert set(cases) == {"single", "batch"}
    batch = cases["batch"]
    assert batch.input_ids.shape[0] == 2 and batch.attention_mask[1, 0] == 0  # the shorter prompt is left-padded
    assert batch.position_ids[1, -1] == batch.attention_mask[1].sum() - 1
    assert batch.logits.shape == (*batch.input_ids.shape, 320) and batch.logits.dtype == np.float32
    assert batch.greedy.shape == (2, 16) and batch.greedy.dtype == np.int64
    with np.load(b.path / "reference.npz") as data:
        assert float(data["tol.logits_atol"]) == 1e-4
    assert (b.path / "reference.npz").stat().st_size < 200_000


def test_rope_inv_freq_is_the_models_own_including_llama3_scaling(flexi_model):
    model = flexi_model("llama", "mixed")
    tables = rope_tables(model.config)
    assert tables.rope_type == "llama3"
    np.testing.assert_array_equal(tables.inv_freq, model.model.rotary_emb.inv_freq.numpy())
    default = rope_tables(tiny_config("mistral"))
    assert default.rope_type == "default" and default.attention_scaling == 1.0
    np.testing.assert_array_equal(default.inv_freq, tiny_model("mistral").model.rotary_emb.inv_freq.numpy())


def test_sequence_dependent_rope_is_refused():
    config = tiny_config("llama", rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(UnsupportedModelError, match="dynamic"):
        rope_tables(config)
