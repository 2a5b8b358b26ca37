"""Subgraph builders of quantized bundles: the quantized matrix products and the quantized embedding lookup.

Each quantized weight part is an initializer read *directly* by the op that needs it (``MatMulNBits``,
``MatMulInteger``, ``Gather``, ``Mul``): no DequantizeLinear, Reshape, Cast or Transpose ever takes a weight
(onnxruntime would fold it into a float copy on the heap). Unpacking and scaling happen on the *gathered rows*
of an embedding, which are activations. Activations stay float32; adapters, norms, OFN and biases stay float.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from flexi_export.export.graph import GraphBuilder
from flexi_export.export.quant import COLUMNS, NBITS, NBITS_ROWS, ROWS, QuantConfig
from flexi_export.export.spec import TensorRef

MS_DOMAIN = "com.microsoft"


#   x [.., K] ─► MatMulNBits(qweight [N, blocks, blob], scales [N, blocks] (, zero_points)) ─► y [.., N]
def matmul_nbits(
    g: GraphBuilder, x: str, ref: TensorRef, role: str, name: str, block: int | None, out: str | None = None
) -> str:
    """``x @ dequantize(W)^T`` with ``com.microsoft::MatMulNBits`` reading the packed int4 parts of ``ref``."""
    config = _config(g)
    node = f"{name}/MatMulNBits"
    parts = g.registry.use_quantized(ref, role, (NBITS, config), node, block)
    inputs = [x, parts["qweight"], parts["scales"]] + ([parts["zero_points"]] if "zero_points" in parts else [])
    n, k = ref.shape
    attrs = dict(domain=MS_DOMAIN, K=k, N=n, bits=config.bits, block_size=config.block_size)
    attrs["accuracy_level"] = config.accuracy_level
    if out is not None:
        return g.op_to("MatMulNBits", inputs, node, [out], **attrs)[0]
    return g.op("MatMulNBits", inputs, node, **attrs)


#   x ─► DynamicQuantizeLinear ─► x_q (uint8), x_scale, x_zero
#   MatMulInteger(x_q, qweight int8 [K, N], x_zero) ─► Cast fp32 ─► Mul(·, x_scale * scales [N]) ─► y
def matmul_integer(
    g: GraphBuilder, x: str, ref: TensorRef, role: str, name: str, block: int | None, out: str | None = None
) -> str:
    """``x @ dequantize(W)^T`` with standard ops: activations quantized per tensor at run time, the int8 weight
    (``[K, N]``, per-output-channel scales) read by ``MatMulInteger`` as stored (onnxruntime fuses the chain
    into ``DynamicQuantizeMatMul`` and keeps reading the same initializer)."""
    config = _config(g)
    nodes = {"qweight": f"{name}/MatMulInteger", "scales": f"{name}/Scale/Mul"}
    parts = g.registry.use_quantized(ref, role, (COLUMNS, config), nodes, block)
    xq, x_scale, x_zero = g.op_n("DynamicQuantizeLinear", [x], f"{name}/DynamicQuantizeLinear", 3)
    acc = g.op("MatMulInteger", [xq, parts["qweight"], x_zero], nodes["qweight"])
    acc = g.op("Cast", [acc], f"{name}/Cast", to=TensorProto.FLOAT)
    scale = g.op("Mul", [x_scale, parts["scales"]], nodes["scales"])
    if out is not None:
        return g.op_to("Mul", [acc, scale], f"{name}/Mul", [out])[0]
    return g.op("Mul", [acc, scale], f"{name}/Mul")


def quantized_matmul(
    g: GraphBuilder, x: str, ref: TensorRef, role: str, name: str, block: int | None, out: str | None = None
) -> str:
    """The bundle's quantized matrix product (int4: MatMulNBits, int8: MatMulInteger)."""
    fn = matmul_nbits if _config(g).dtype == "int4" else matmul_integer
    return fn(g, x, ref, role, name, block, out)


#   ids ─► Gather rows of qweight [V, blocks, blob] ─► low / high nibbles ─► codes [B, S, blocks, block_size]
#       ─► Cast ─► Sub zero ─► Mul (Gather rows of scales) ─► Reshape [B, S, blocks * block_size] (─► Slice H)
def gather_nbits(g: GraphBuilder, ref: TensorRef, ids: str, name: str) -> str:
    """Embedding lookup on int4 rows packed for MatMulNBits (the same parts a tied LM head reads)."""
    config = _config(g)
    hidden = ref.shape[1]
    size = config.block_size
    blocks = -(-hidden // size)
    nodes = {"qweight": f"{name}/Gather", "scales": f"{name}/scales/Gather", "zero_points": f"{name}/zero/Gather"}
    parts = g.registry.use_quantized(ref, "embed_tokens", (NBITS, config), nodes)
    rows = g.op("Gather", [parts["qweight"], ids], nodes["qweight"], axis=0)  # [B, S, blocks, blob]
    codes = _unpack(g, rows, (0, 0, blocks, size), f"{name}/unpack")
    codes = g.op("Cast", [codes], f"{name}/Cast", to=TensorProto.FLOAT)
    if config.symmetric:
        zero = g.f32const(float(1 << (config.bits - 1)))
    else:
        zrows = g.op("Gather", [parts["zero_points"], ids], nodes["zero_points"], axis=0)  # [B, S, zp bytes]
        zero = _unpack(g, zrows, (0, 0, -1), f"{name}/zero/unpack")
        zero = g.op("Slice", [zero, g.ints(0), g.ints(blocks), g.ints(-1)], f"{name}/zero/Slice")
        zero = g.op("Cast", [zero], f"{name}/zero/Cast", to=TensorProto.FLOAT)
        zero = g.op("Unsqueeze", [zero, g.ints(-1)], f"{name}/zero/Unsqueeze")
    scales = g.op("Gather", [parts["scales"], ids], nodes["scales"], axis=0)  # [B, S, blocks]
    scales = g.op("Unsqueeze", [scales, g.ints(-1)], f"{name}/scales/Unsqueeze")
    values = g.op("Mul", [g.op("Sub", [codes, zero], f"{name}/Sub"), scales], f"{name}/Mul")
    values = g.op("Reshape", [values, g.ints(0, 0, blocks * size)], f"{name}/Reshape")
    if blocks * size != hidden:
        values = g.op("Slice", [values, g.ints(0), g.ints(hidden), g.ints(-1)], f"{name}/Slice")
    return values


#   ids ─► GatherBlockQuantized(qweight [V, H / 2], scales [V, blocks] (, zero_points)) ─► x [B, S, H]
def gather_block_quantized(g: GraphBuilder, ref: TensorRef, ids: str, name: str) -> str:
    """Embedding lookup on int4 rows with onnxruntime's ``GatherBlockQuantized`` (``--target cpu``, untied
    embedding whose width is whole blocks): one node reading the file-backed table, dequantizing only the rows
    gathered. Same codes and scales as :func:`gather_nbits`, stored ``[V, H / 2]`` as the op wants."""
    config = _config(g)
    node = f"{name}/GatherBlockQuantized"
    parts = g.registry.use_quantized(ref, "embed_tokens", (NBITS_ROWS, config), node)
    inputs = [parts["qweight"], ids, parts["scales"]] + ([parts["zero_points"]] if "zero_points" in parts else [])
    attrs = dict(gather_axis=0, quantize_axis=1, block_size=config.block_size, bits=config.bits)
    return g.op("GatherBlockQuantized", inputs, node, domain=MS_DOMAIN, **attrs)


def _unpack(g: GraphBuilder, packed: str, shape: tuple[int, ...], name: str) -> str:
    """uint8 bytes ``[..., n]`` -> 4-bit codes ``[..., 2n]`` (low nibble first), reshaped to ``shape``."""
    low = g.op("BitwiseAnd", [packed, g.const(15, np.uint8)], f"{name}/BitwiseAnd")
    high = g.op("BitShift", [packed, g.const(4, np.uint8)], f"{name}/BitShift", direction="RIGHT")
    low = g.op("Unsqueeze", [low, g.ints(-1)], f"{name}/low/Unsqueeze")
    high = g.op("Unsqueeze", [high, g.ints(-1)], f"{name}/high/Unsqueeze")
    codes = g.op("Concat", [low, high], f"{name}/Concat", axis=-1)
    return g.op("Reshape", [codes, g.ints(*shape)], f"{name}/Reshape")


#   ids ─► Gather rows of qweight int8 [V, H] ─► Cast ─► Mul (Gather rows of scales [V], Unsqueeze) ─► x
def gather_int8_rows(g: GraphBuilder, ref: TensorRef, ids: str, name: str) -> str:
    """Embedding lookup on int8 rows with one scale per row (an untied int8 embedding)."""
    nodes = {"qweight": f"{name}/Gather", "scales": f"{name}/scales/Gather"}
    parts = g.registry.use_quantized(ref, "embed_tokens", (ROWS, _config(g)), nodes)
    rows = g.op("Gather", [parts["qweight"], ids], nodes["qweight"], axis=0)
    rows = g.op("Cast", [rows], f"{name}/Cast", to=TensorProto.FLOAT)
    scales = g.op("Gather", [parts["scales"], ids], nodes["scales"], axis=0)
    scales = g.op("Unsqueeze", [scales, g.ints(-1)], f"{name}/scales/Unsqueeze")
    return g.op("Mul", [rows, scales], f"{name}/Mul")


def _config(g: GraphBuilder) -> QuantConfig:
    if g.quant is None:
        raise RuntimeError("a quantized subgraph in a float graph")
    return g.quant
