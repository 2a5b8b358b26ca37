"""fp16 bundles: fp16 weights and activations, normalisation statistics and softmax in fp32."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto

from flexi_export.export import export_onnx
from flexi_export.model import build_flexi
from tests.export.util import decoder, reference_evaluator_run
from tests.helpers import mixed_plan, randomize_own, tiny_model


def _value_types(proto: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    types.update({v.name: v.type.tensor_type.elem_type for v in [*proto.graph.input, *proto.graph.output]})
    return types


def test_statistics_and_softmax_run_in_fp32_and_everything_else_in_fp16(bundle):
    b = bundle("qwen2", "mixed", dtype="fp16")
    proto = onnx.load(str(b.onnx_path), load_external_data=False)
    types = _value_types(proto)
    fp32_ops = [n for n in proto.graph.node if n.op_type in ("ReduceMean", "Softmax", "Pow")]
    assert len(fp32_ops) > 40
    assert all(types[n.input[0]] == TensorProto.FLOAT for n in fp32_ops)
    matmuls = [n for n in proto.graph.node if n.op_type in ("MatMul", "Gemm")]
    assert all(types[n.output[0]] == TensorProto.FLOAT16 for n in matmuls)
    assert types["logits"] == TensorProto.FLOAT16 and types["present.0.key"] == TensorProto.FLOAT16


def test_fp16_normalisation_cannot_overflow(tmp_path):
    """A residual stream around |x| = 400: x^2 overflows fp16 (max 65504), so a norm squared in fp16 would
    give inf / NaN; computed in fp32 the fp16 graph still agrees with the fp32 torch model."""
    model = randomize_own(build_flexi(tiny_model("llama"), mixed_plan("llama", ofn="rms")))
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(2000.0)
    b = export_onnx(model, tmp_path / "big", dtype="fp16", progress=False)
    case = b.reference()[1]
    keep = case.attention_mask.astype(bool)
    hidden = model.model.embed_tokens.weight[torch.from_numpy(case.input_ids[keep])]
    assert float(hidden.detach().pow(2).mean(-1).max()) > 65504  # the squares really exceed the fp16 range
    logits, presents = decoder(b).run(case.input_ids, case.attention_mask, case.position_ids)
    assert np.isfinite(logits).all() and all(np.isfinite(v).all() for v in presents.values())
    assert np.mean(logits[keep].argmax(-1) == case.logits[keep].argmax(-1)) >= 0.99
    # onnxruntime's x86 CPU EP silently runs fp16 norms in fp32; the ONNX reference evaluator computes the graph
    # in its own dtypes, so it shows the graph itself is overflow-safe
    semantics = reference_evaluator_run(b, case.input_ids, case.attention_mask, case.position_ids)
    assert semantics.dtype == np.float16 and np.isfinite(semantics).all()
    assert np.mean(semantics[keep].argmax(-1) == case.logits[keep].argmax(-1)) >= 0.99
