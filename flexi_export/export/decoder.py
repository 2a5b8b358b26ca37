"""The whole decoder graph: embedding, RoPE tables, attention masks, the executed blocks, final norm, LM head.

Built from a :class:`~flexi_export.export.spec.ModelSpec` (the plan and the weights), never by tracing. The
result is a :class:`DecoderGraph`: nodes, I/O, the inline ``inv_freq`` initializer and the weight registry
whose entries the external-data writer turns into the remaining initializers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from onnx import NodeProto, TensorProto

from flexi_export.export.blocks import BlockContext, decoder_block, rms_norm
from flexi_export.export.graph import GraphBuilder
from flexi_export.export.io_spec import FLOAT_TYPES, IOSpec, decoder_io
from flexi_export.export.qblocks import gather_int8_rows, gather_nbits, quantized_matmul
from flexi_export.export.quant import QuantConfig
from flexi_export.export.spec import ModelSpec
from flexi_export.export.weights import AS_IS, TRANSPOSED, WeightRegistry


@dataclass
class DecoderGraph:
    """A built graph before its weights are written."""

    nodes: list[NodeProto]
    inline: list[TensorProto]
    io: IOSpec
    registry: WeightRegistry


def build_decoder(
    spec: ModelSpec, dtype: str, progress: Iterable[int] | None = None, quant: QuantConfig | None = None
) -> DecoderGraph:
    """Build the graph of ``spec`` in ``dtype`` (``fp32`` / ``fp16``: weights and activations), its block matrices
    (and with ``quant.quantize_embedding`` the embedding / LM head) quantized as ``quant`` says; ``progress``
    wraps the block loop."""
    d = spec.dims
    registry = WeightRegistry(spec.names, dtype)
    g = GraphBuilder(registry, FLOAT_TYPES[dtype], quant)
    io = decoder_io(len(spec.blocks), d.num_kv_heads, d.head_dim, d.vocab_size, dtype)
    cos_k, sin_k, cos_q, sin_q = _rope(g, spec)
    windows = sorted({b.window for b in spec.blocks}, key=lambda w: -1 if w is None else w)
    ctx = BlockContext(
        cos_k=cos_k,
        sin_k=sin_k,
        cos_q=cos_q,
        sin_q=sin_q,
        masks=_attention_masks(g, windows),
        num_heads=d.num_heads,
        num_kv_heads=d.num_kv_heads,
        head_dim=d.head_dim,
        eps=d.rms_norm_eps,
    )
    x = _embedding(g, spec)
    for index in progress if progress is not None else range(len(spec.blocks)):
        x = decoder_block(g, x, spec.blocks[index], ctx)
    x = rms_norm(g, x, spec.final_norm, d.rms_norm_eps, "/model/norm", "norm", None)
    _lm_head(g, x, spec)
    return DecoderGraph(nodes=g.nodes, inline=g.inline, io=io, registry=registry)


#   position_ids ─► Cast fp32 ─► Unsqueeze ─► Mul inv_freq = f ─► Cos(Concat(f, f)) ─────────────► cos
#                                                             └─► Sin(f) ─► Concat(-sin, sin) ─► sin_signed
def _rope(g: GraphBuilder, spec: ModelSpec) -> tuple[str, str, str, str]:
    """``cos`` and ``sin_signed`` for keys ``[B, 1, S, D]`` and queries ``[B, 1, 1, S, D]``, angles in fp32.

    transformers computes ``cos(Concat(f, f))`` and ``sin(Concat(f, f))``; the graph takes ``Sin`` of one half
    and concatenates it negated and plain, the same values (``sin_signed`` is what :func:`rotary` needs).
    """
    name = "/model/rotary_emb"
    inv_freq = g.inline_initializer("model.rotary_emb.inv_freq", spec.rope.inv_freq.astype(np.float32))
    pos = g.op("Cast", ["position_ids"], f"{name}/Cast", to=TensorProto.FLOAT)
    pos = g.op("Unsqueeze", [pos, g.ints(2)], f"{name}/Unsqueeze")
    freqs = g.op("Mul", [pos, inv_freq], f"{name}/Mul")  # [B, S, D / 2]
    cos = g.op("Cos", [g.op("Concat", [freqs, freqs], f"{name}/Concat", axis=-1)], f"{name}/Cos")
    sin = g.op("Sin", [freqs], f"{name}/Sin")
    sin = g.op("Concat", [g.op("Neg", [sin], f"{name}/Sin/Neg"), sin], f"{name}/Sin/Concat", axis=-1)
    out = []
    for fn, value in (("Cos", cos), ("Sin", sin)):
        if spec.rope.attention_scaling != 1.0:
            value = g.op("Mul", [value, g.f32const(spec.rope.attention_scaling)], f"{name}/{fn}/Scale")
        value = g.from_float(g.op("Unsqueeze", [value, g.ints(1)], f"{name}/{fn}/Unsqueeze"), f"{name}/{fn}/CastBack")
        out.append(value)  # [B, 1, S, D] (keys)
    for fn, value in (("Cos", out[0]), ("Sin", out[1])):
        out.append(g.op("Unsqueeze", [value, g.ints(1)], f"{name}/{fn}/Unsqueeze5"))  # [B, 1, 1, S, D] (queries)
    return out[0], out[1], out[2], out[3]


#   kv index t ∈ [0, P+S), query index q ∈ [P, P+S):  allowed = mask[b, t] and t <= q
#     (and, sliding window: n[b, t] > n[b, q] - window, with n = CumSum(mask) the count of real tokens so far)
#   additive mask = Where(allowed, 0, float32 min)  ─►  [B, 1, 1, S, P+S] (broadcast over kv heads and groups)
def _attention_masks(g: GraphBuilder, windows: list[int | None]) -> dict[int | None, str]:
    """Causal + padding masks (one per sliding-window size), indexed like transformers' ``masking_utils``.

    Causality is by cache index, not ``position_ids`` (transformers' ``causal_mask_function``). The cache is
    the full ``past + new`` concatenation, so a sliding-window layer keeps every token and masks the old ones.
    The window counts real tokens (``CumSum`` of the attention mask), not cache slots: with left padding, the
    only padding transformers generates with, the two are the same; onnxruntime-genai pads a batch on the
    right, so its padding sits *inside* the cache, and counting slots would let pad slots use up the window.
    """
    name = "/model/attn_mask"
    seq = g.op("Shape", ["input_ids"], f"{name}/SeqLen", start=1, end=2)
    total = g.op("Shape", ["attention_mask"], f"{name}/TotalLen", start=1, end=2)
    past = g.op("Sub", [total, seq], f"{name}/PastLen")
    total_s = g.op("Squeeze", [total, g.ints(0)], f"{name}/TotalLen/Squeeze")
    past_s = g.op("Squeeze", [past, g.ints(0)], f"{name}/PastLen/Squeeze")
    one, zero = g.const(1, np.int64), g.const(0, np.int64)
    kv = g.op("Range", [zero, total_s, one], f"{name}/KvRange")
    q = g.op("Range", [past_s, total_s, one], f"{name}/QRange")
    kv_row = g.op("Unsqueeze", [kv, g.ints(0)], f"{name}/KvRow")  # [1, T]
    q_col = g.op("Unsqueeze", [q, g.ints(1)], f"{name}/QCol")  # [S, 1]
    causal = g.op("LessOrEqual", [kv_row, q_col], f"{name}/Causal")  # [S, T]
    padding = g.op("Cast", ["attention_mask"], f"{name}/Padding", to=TensorProto.BOOL)
    padding = g.op("Unsqueeze", [padding, g.ints(1, 2, 3)], f"{name}/Padding/Unsqueeze")  # [B, 1, 1, 1, T]
    masks = {}
    if any(w is not None for w in windows):
        count = g.op("CumSum", ["attention_mask", g.const(1, np.int64)], f"{name}/RealTokens")  # [B, T]
        kv_count = g.op("Unsqueeze", [count, g.ints(1, 2, 3)], f"{name}/RealTokens/Kv")  # [B, 1, 1, 1, T]
        q_count = g.op("Slice", [count, past, total, g.ints(1)], f"{name}/RealTokens/Slice")  # [B, S]
        q_count = g.op("Unsqueeze", [q_count, g.ints(1, 2, 4)], f"{name}/RealTokens/Q")  # [B, 1, 1, S, 1]
    for window in windows:
        tag = "full" if window is None else f"window{window}"
        allowed = causal
        if window is not None:
            start = g.op("Sub", [q_count, g.const(window, np.int64)], f"{name}/{tag}/Start")
            inside = g.op("Greater", [kv_count, start], f"{name}/{tag}/Inside")  # [B, 1, 1, S, T]
            allowed = g.op("And", [causal, inside], f"{name}/{tag}/And")
        allowed = g.op("And", [padding, allowed], f"{name}/{tag}/Padding/And")  # [B, 1, 1, S, T]
        masks[window] = g.op(
            "Where",
            [allowed, g.f32const(0.0), g.f32const(float(np.finfo(np.float32).min))],
            f"{name}/{tag}/Where",
        )
    return masks


def _embedding(g: GraphBuilder, spec: ModelSpec) -> str:
    """``input_ids`` -> hidden states: ``Gather`` of the float table, or of quantized rows (unpacked after it)."""
    name = "/model/embed_tokens"
    if g.quant is not None and g.quant.quantize_embedding:
        gather = gather_nbits if g.quant.dtype == "int4" else gather_int8_rows
        return gather(g, spec.embed, "input_ids", name)
    table = g.registry.use(spec.embed, "embed_tokens", AS_IS, f"{name}/Gather")
    return g.op("Gather", [table, "input_ids"], f"{name}/Gather", axis=0)


#   tied:   h ─► Reshape [-1, H] ─► Gemm(·, embed[V, H], transB=1) ─► Reshape [B, S, V] ─► logits
#   untied: h ─► MatMul lm_head[H, V] ─► logits
#   quantized (--quantize-embedding): h ─► MatMulNBits / MatMulInteger ─► logits (a tied int4 head reads the
#   embedding's own packed rows: MatMulNBits wants [N = vocab, K = hidden] blocks, which are the table's rows)
def _lm_head(g: GraphBuilder, x: str, spec: ModelSpec) -> None:
    """Logits. A tied head reads the embedding initializer itself (``Gemm`` with ``transB=1``, no copy)."""
    name = "/lm_head"
    if g.quant is not None and g.quant.quantize_embedding:
        quantized_matmul(g, x, spec.embed if spec.tied else spec.lm_head, "lm_head", name, None, out="logits")
    elif spec.tied:
        hidden = spec.dims.hidden_size
        flat = g.op("Reshape", [x, g.ints(-1, hidden)], f"{name}/Reshape")
        weight = g.registry.use(spec.embed, "lm_head", AS_IS, f"{name}/Gemm")
        logits = g.op("Gemm", [flat, weight], f"{name}/Gemm", transB=1)
        shape = g.op("Shape", ["input_ids"], f"{name}/Shape")
        shape = g.op("Concat", [shape, g.ints(spec.dims.vocab_size)], f"{name}/Concat", axis=0)
        g.op_to("Reshape", [logits, shape], f"{name}/Reshape3d", ["logits"])
    else:
        weight = g.registry.use(spec.lm_head, "lm_head", TRANSPOSED, f"{name}/MatMul")
        g.op_to("MatMul", [x, weight], f"{name}/MatMul", ["logits"])
