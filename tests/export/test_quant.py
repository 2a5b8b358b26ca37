"""Quantized bundles (int8 / int4): one packed copy per unique matrix, parity with the dequantized PyTorch model,
the quantizer's layouts as onnxruntime reads them, the prepacked model, and the options a user can get wrong."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from flexi_export.cli import main
from flexi_export.errors import ExportError
from flexi_export.export import export_onnx
from flexi_export.export.manifest import TOLERANCES
from flexi_export.export.prepack import prepack_bundle
from flexi_export.export.quant import COLUMNS, NBITS, QuantConfig, dequantize, quantize
from flexi_export.export.quant_reference import block_int8
from flexi_export.verify.runtime import device
from tests.export.util import ort_vs_quantized_reference as _ort_vs_reference

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _export(model, out, dtype, **kw):
    return export_onnx(model, out, dtype=dtype, progress=False, **kw)


def _unique_block_matrices(model) -> dict[int, str]:
    """id -> name of every distinct block matrix Parameter the executed blocks read."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for layer in model.model.layers:
        for module in layer.modules():
            base = getattr(module, "base", module)
            name = names.get(id(getattr(base, "weight", None)), "")
            if isinstance(base, torch.nn.Linear) and name.endswith(tuple(f"{m}.weight" for m in LINEARS)):
                out[id(base.weight)] = name
    return out


# ------------------------------------------------------------------------------------------ the quantizer
def _matmul_nbits_session(parts: dict[str, np.ndarray], k: int, n: int, block: int, level: int, rows: int):
    inputs = ["x", *parts]
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=block, accuracy_level=level)  # fmt: skip
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(value, name) for name, value in parts.items()],
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    proto = helper.make_model(graph, opset_imports=opsets)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(("symmetric", "block", "k"), [(True, 32, 64), (False, 16, 64), (True, 32, 40)])
def test_int4_parts_are_what_matmulnbits_reads(symmetric, block, k):
    """The packed parts, run by onnxruntime's MatMulNBits (fp32 compute), equal x @ dequantize(W)^T, and
    dequantize(W) is within one quantization step of W."""
    rng = np.random.default_rng(0)
    n = 48
    w = rng.standard_normal((n, k)).astype(np.float32)
    config = QuantConfig("int4", block, symmetric, 0)
    parts = quantize(w, NBITS, config)
    deq = dequantize(parts, NBITS, config, k)
    step = np.repeat(np.abs(parts["scales"]), block, axis=1)[:, :k]
    assert np.all(np.abs(deq - w) <= step * 1.0001)
    assert ("zero_points" in parts) == (not symmetric)
    x = rng.standard_normal((3, k)).astype(np.float32)
    got = _matmul_nbits_session(parts, k, n, block, 0, 3).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ deq.T, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("ties", [False, True])
def test_block_int8_emulates_matmulnbits_accuracy_level_4(ties):
    """The reference's activation rounding equals onnxruntime's int8 compute, also on rounding ties (activations
    that are multiples of one step, as a dequantized int4 embedding row is)."""
    rng = np.random.default_rng(2)
    k, n, rows = 64, 48, 16
    config = QuantConfig("int4", 32, True, 4)
    parts = quantize(rng.standard_normal((n, k)).astype(np.float32), NBITS, config)
    deq = dequantize(parts, NBITS, config, k)
    x = rng.integers(-8, 8, (rows, k)) * 0.37 if ties else rng.standard_normal((rows, k)) * 3
    x = x.astype(np.float32)
    got = _matmul_nbits_session(parts, k, n, 32, 4, rows).run(None, {"x": x})[0]
    want = block_int8(torch.from_numpy(x), 32).numpy() @ deq.T
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_int8_columns_are_per_output_channel_and_within_half_a_step():
    w = np.random.default_rng(1).standard_normal((24, 40)).astype(np.float32)
    config = QuantConfig("int8")
    parts = quantize(w, COLUMNS, config)
    assert parts["qweight"].shape == (40, 24) and parts["qweight"].dtype == np.int8
    assert parts["scales"].shape == (24,)
    deq = dequantize(parts, COLUMNS, config, 40)
    assert np.all(np.abs(deq - w) <= parts["scales"][:, None] * 0.5001)


# ------------------------------------------------------------------------------------------ int4 bundles
@pytest.fixture(scope="module")
def int4_mixed(tmp_path_factory, flexi_model):
    model = flexi_model("llama", "mixed")
    return model, _export(model, tmp_path_factory.mktemp("q") / "int4", "int4", accuracy_level=0)


def test_an_int4_bundle_of_a_shared_model_holds_one_packed_weight_per_unique_matrix(int4_mixed):
    model, bundle = int4_mixed
    rows = bundle.manifest["initializers"]
    unique = _unique_block_matrices(model)
    quantized = [r for r in rows if r.get("quantization") and r["role"].split(".")[0] in LINEARS]
    by_part = Counter(r["quantization"]["part"] for r in quantized)
    assert by_part == {"qweight": len(unique), "scales": len(unique)}  # symmetric: no zero points
    assert sorted(r["source"][0] for r in quantized if r["quantization"]["part"] == "qweight") == sorted(
        unique.values()
    )
    # a matrix of a shared block is read by the source block and by every block that shares it
    shared = [r for r in quantized if len(r["consuming_blocks"]) > 1]
    assert shared and all(len(r["consumers"]) == len(r["consuming_blocks"]) for r in shared)
    # no float copy of a block matrix; adapters and norms stay float32
    assert not any(r["name"] in unique.values() for r in rows)
    float_rows = {r["role"].split(".")[-1]: r["dtype"] for r in rows if not r.get("quantization")}
    assert float_rows["lora_A"] == float_rows["lora_B"] == "FLOAT"
    proto = onnx.load(str(bundle.onnx_path), load_external_data=False)
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    executed = len(model.model.layers)
    assert len(nbits) == executed * len(LINEARS)
    packed = {r["name"] for r in quantized}
    assert all(n.input[1] in packed and n.input[2] in packed for n in nbits)
    assert not [n for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in packed]


def test_int4_parity_with_the_dequantized_pytorch_model(int4_mixed):
    """accuracy_level 0 (fp32 compute): the graph equals the PyTorch model holding dequantize(quantize(W))."""
    model, bundle = int4_mixed
    assert bundle.manifest["export_check"]["batch"]["top1_agreement"] == 1.0
    got, want = _ort_vs_reference(bundle, model, bundle.manifest["quantization"])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    effect = bundle.manifest["quantization"]["vs_unquantized"]
    assert 0.0 <= effect["prefill_top1_agreement"] <= 1.0 and effect["max_abs_logits_diff"] > 1e-4


def test_int4_default_accuracy_level_is_within_the_documented_tolerance(tmp_path, flexi_model):
    """accuracy_level 4: onnxruntime quantizes activations to int8 per block; the reference rounds them too."""
    model = flexi_model("llama", "mixed")
    bundle = _export(model, tmp_path / "int4", "int4", block_size=16)
    tol = TOLERANCES["int4"]
    assert bundle.manifest["quantization"]["accuracy_level"] == 4
    got, want = _ort_vs_reference(bundle, model, bundle.manifest["quantization"])
    assert np.all(np.abs(got - want) <= tol["logits_atol"] + tol["logits_rtol"] * np.abs(want))
    assert np.mean(got.argmax(-1) == want.argmax(-1)) >= tol["top1_agreement_min"]


def test_a_tied_int4_embedding_is_one_packed_copy_read_by_the_lookup_and_the_lm_head(tmp_path, flexi_model):
    model = flexi_model("qwen2", "mixed")
    assert model.config.tie_word_embeddings
    bundle = _export(model, tmp_path / "tied", "int4", quantize_embedding=True, accuracy_level=0)
    rows = [r for r in bundle.manifest["initializers"] if r["source"] == ["model.embed_tokens.weight"]]
    assert sorted(r["quantization"]["part"] for r in rows) == ["qweight", "scales"]
    qweight = next(r for r in rows if r["quantization"]["part"] == "qweight")
    proto = onnx.load(str(bundle.onnx_path), load_external_data=False)
    readers = {n.op_type for n in proto.graph.node if qweight["name"] in n.input}
    assert readers == {"Gather", "MatMulNBits"}
    assert not any(r["name"].startswith("lm_head") for r in bundle.manifest["initializers"])
    got, want = _ort_vs_reference(bundle, model, bundle.manifest["quantization"])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------ int8 bundles
def test_int8_bundle_reads_int8_weights_as_stored_and_matches_the_reference(tmp_path, flexi_model):
    model = flexi_model("llama", "mixed")
    bundle = _export(model, tmp_path / "int8", "int8")
    rows = [r for r in bundle.manifest["initializers"] if r.get("quantization")]
    assert {r["dtype"] for r in rows if r["quantization"]["part"] == "qweight"} == {"INT8"}
    assert len([r for r in rows if r["quantization"]["part"] == "qweight"]) == len(_unique_block_matrices(model))
    proto = onnx.load(str(bundle.onnx_path), load_external_data=False)
    ops = Counter(n.op_type for n in proto.graph.node)
    assert ops["MatMulInteger"] == len(model.model.layers) * len(LINEARS)
    assert all(i.domain in ("", "ai.onnx") for i in proto.opset_import)  # standard ops only
    assert bundle.manifest["session_options"]["config_entries"]["session.disable_prepacking"] == "1"
    got, want = _ort_vs_reference(bundle, model, bundle.manifest["quantization"])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------ prepacked model
def test_prepack_saves_one_packed_blob_per_shared_matrix_and_the_prepacked_model_replays(int4_mixed, tmp_path):
    import shutil

    _, bundle = int4_mixed
    copy = tmp_path / "b"
    shutil.copytree(bundle.path, copy)
    section = prepack_bundle(copy, threads=1)
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["prepacked"] == section and (copy / section["data"]).stat().st_size == section["data_bytes"]
    rows = {r["name"]: r for r in manifest["initializers"]}
    shared = [n for n, r in rows.items() if r.get("quantization") and len(r["consuming_blocks"]) > 1]
    packed_shared = [n for n in shared if n in section["blobs"]]
    assert packed_shared and all(len(section["blobs"][n]) == 1 for n in packed_shared)
    report = device.replay(copy, mode="prepacked", threads=1, greedy=False)
    assert not report["problems"], report["problems"]


def test_prepack_command_writes_the_prepacked_model_and_refuses_a_non_bundle(int4_mixed, tmp_path):
    import shutil

    _, bundle = int4_mixed
    copy = tmp_path / "b"
    shutil.copytree(bundle.path, copy)
    result = CliRunner().invoke(main, ["prepack", str(copy), "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "prepacked" in result.output and (copy / "onnx" / "model.prepacked.onnx").is_file()
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["prepack", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "manifest.json is missing" in result.output


# ------------------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize(
    ("dtype", "options", "message"),
    [
        ("int4", {"block_size": 48}, "unsupported block size 48"),
        ("int4", {"accuracy_level": 2}, "unsupported accuracy level 2"),
        ("fp32", {"symmetric": False}, "--asymmetric only apply to --dtype int8 or int4"),
        ("fp16", {"quantize_embedding": True}, "--quantize-embedding only apply"),
        ("int8", {"symmetric": False}, "int8 weights are symmetric"),
        ("int8", {"block_size": 32}, "--block-size and --accuracy-level apply to int4"),
    ],
)
def test_bad_quantization_options_are_refused_before_anything_is_written(
    dtype, options, message, tmp_path, flexi_model
):
    out = tmp_path / "never"
    with pytest.raises(ExportError, match=message):
        _export(flexi_model("llama", "identity"), out, dtype, **options)
    assert not out.exists()


def test_int8_quantize_embedding_with_a_tied_embedding_is_refused(tmp_path, flexi_model):
    out = tmp_path / "never"
    with pytest.raises(ExportError, match="needs an untied LM head"):
        _export(flexi_model("qwen2", "identity"), out, "int8", quantize_embedding=True)
    assert not out.exists()


def test_cli_reports_bad_quantization_options_in_one_line(tmp_path):
    runner = CliRunner()
    missing = tmp_path / "missing"
    result = runner.invoke(main, ["export", str(missing), "--out", str(tmp_path / "o"), "--dtype", "int4",
                                  "--block-size", "48"])  # fmt: skip
    assert result.exit_code == 2 and "unsupported block size 48" in result.output
    result = runner.invoke(main, ["export", str(missing), "--out", str(tmp_path / "o"), "--asymmetric"])
    assert result.exit_code == 2 and "--asymmetric only apply to --dtype int8 or int4, not fp32" in result.output
    assert not (tmp_path / "o").exists()
