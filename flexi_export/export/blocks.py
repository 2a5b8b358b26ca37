"""Subgraph builders of one decoder block: RMSNorm, linear (+ adapter + OFN), RoPE, attention, SwiGLU MLP.

Every weight enters the graph through :class:`~flexi_export.export.weights.WeightRegistry`, directly as an
input of the op that uses it (MatMul, Gemm, Gather, Add, Mul): no Transpose, Reshape or Cast ever sits between
a weight and its consumer. Normalisation statistics and softmax run in fp32; in an fp16 graph the *activations*
are cast around them.
"""

from __future__ import annotations

from dataclasses import dataclass

from flexi_export.export.graph import GraphBuilder
from flexi_export.export.io_spec import past_names, present_names
from flexi_export.export.qblocks import quantized_matmul
from flexi_export.export.spec import BlockSpec, LinearSpec, OfnSpec, TensorRef
from flexi_export.export.weights import AS_IS, TRANSPOSED


@dataclass(frozen=True)
class BlockContext:
    """Values computed once per graph and read by every block."""

    #: RoPE tables in the activation dtype, for keys ``[B, 1, S, D]`` and queries ``[B, 1, 1, S, D]``:
    #: ``cos`` and ``sin_signed`` = ``sin`` with its first half negated (see :func:`rotary`).
    cos_k: str
    sin_k: str
    cos_q: str
    sin_q: str
    #: Additive attention mask ``[B, 1, 1, S, P+S]`` (float32, 0 or the float32 minimum) per sliding window.
    masks: dict[int | None, str]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float


#   x ─► [Cast fp32] ─► Pow 2 ─► ReduceMean ─► Add eps ─► Sqrt ─► Div(x, ·) ─► [Cast back] ─► Mul weight ─► y
def rms_norm(g: GraphBuilder, x: str, weight: TensorRef, eps: float, name: str, role: str, block: int | None) -> str:
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last axis, statistics in fp32 (as transformers)."""
    xf = g.to_float(x, f"{name}/Cast")
    sq = g.op("Pow", [xf, g.f32const(2.0)], f"{name}/Pow")
    var = g.op("ReduceMean", [sq, g.ints(-1)], f"{name}/ReduceMean", keepdims=1)
    std = g.op("Sqrt", [g.op("Add", [var, g.f32const(eps)], f"{name}/Add")], f"{name}/Sqrt")
    normed = g.from_float(g.op("Div", [xf, std], f"{name}/Div"), f"{name}/CastBack")
    w = g.registry.use(weight, role, AS_IS, f"{name}/Mul", block)
    return g.op("Mul", [w, normed], f"{name}/Mul")


#   h ─► [Cast fp32] ─► [Sub mean] ─► Pow 2 ─► ReduceMean ─► Add eps ─► Sqrt ─► Div ─► [Cast back] ─► Mul gamma
def output_feature_norm(g: GraphBuilder, h: str, ofn: OfnSpec, name: str, role: str, block: int) -> str:
    """OFN of a branch output: per-token normalisation (``layernorm`` centres first) and a per-channel gamma."""
    hf = g.to_float(h, f"{name}/Cast")
    if ofn.variant == "layernorm":
        mean = g.op("ReduceMean", [hf, g.ints(-1)], f"{name}/Mean", keepdims=1)
        hf = g.op("Sub", [hf, mean], f"{name}/Sub")
    sq = g.op("Pow", [hf, g.f32const(2.0)], f"{name}/Pow")
    var = g.op("ReduceMean", [sq, g.ints(-1)], f"{name}/ReduceMean", keepdims=1)
    std = g.op("Sqrt", [g.op("Add", [var, g.f32const(ofn.eps)], f"{name}/Add")], f"{name}/Sqrt")
    normed = g.from_float(g.op("Div", [hf, std], f"{name}/Div"), f"{name}/CastBack")
    gamma = g.registry.use(ofn.weight, role, AS_IS, f"{name}/Mul", block)
    return g.op("Mul", [gamma, normed], f"{name}/Mul")


#   x ─► MatMul W[in,out] ─► [Add bias] ──────────────────────────► Add ─► [OFN] ─► y
#   └──► MatMul lora_A[in,r] ─► MatMul lora_B[r,out] ─► [Mul scaling] ┘   (no Mul when scaling is exactly 1)
#   (quantized bundles: MatMulNBits / MatMulInteger in place of the first MatMul; the adapter path stays float)
def linear(g: GraphBuilder, x: str, spec: LinearSpec, name: str, block: int) -> str:
    """``x @ W (+ b) + scaling * (x @ A) @ B``, then the OFN when the block has one on this output."""
    if g.quant is not None:
        y = quantized_matmul(g, x, spec.weight, f"{spec.role}.weight", name, block)
    else:
        w = g.registry.use(spec.weight, f"{spec.role}.weight", TRANSPOSED, f"{name}/MatMul", block)
        y = g.op("MatMul", [x, w], f"{name}/MatMul")
    if spec.bias is not None:
        b = g.registry.use(spec.bias, f"{spec.role}.bias", AS_IS, f"{name}/Add", block)
        y = g.op("Add", [y, b], f"{name}/Add")
    delta = lora_delta(g, x, spec, name, block)
    if delta is not None:
        y = g.op("Add", [y, delta], f"{name}/lora/Add")
    if spec.ofn is not None:
        y = output_feature_norm(g, y, spec.ofn, f"{name}/ofn", f"{spec.role}.ofn", block)
    return y


#   x ─► Split halves (x1, x2) ─► Concat(x2, x1) ─► Mul sin_signed ─┐
#   x ──────────────────────────────────────────────────► Mul cos ─┴─► Add
def rotary(g: GraphBuilder, x: str, cos: str, sin_signed: str, name: str) -> str:
    """``x * cos + rotate_half(x) * sin`` on ``[..., S, head_dim]``.

    ``rotate_half(x) = Concat(-x2, x1)``; since both halves of ``sin`` are equal, ``rotate_half(x) * sin`` is
    ``Concat(x2, x1) * Concat(-sin_half, sin_half)``, bit for bit (negation is exact), with one node less.
    """
    x1, x2 = g.op_n("Split", [x], f"{name}/Split", 2, axis=-1, num_outputs=2)
    swapped = g.op("Concat", [x2, x1], f"{name}/Concat", axis=-1)
    return g.op(
        "Add",
        [g.op("Mul", [x, cos], f"{name}/MulCos"), g.op("Mul", [swapped, sin_signed], f"{name}/MulSin")],
        f"{name}/Add",
    )


def lora_delta(g: GraphBuilder, x: str, spec: LinearSpec, name: str, block: int | None) -> str | None:
    """``scaling * (x @ A) @ B`` of a shared block's adapter (None without one); ``name`` is the linear's node
    prefix."""
    if spec.lora_a is None or spec.lora_b is None:
        return None
    a = g.registry.use(spec.lora_a, f"{spec.role}.lora_A", TRANSPOSED, f"{name}/lora_A/MatMul", block)
    b = g.registry.use(spec.lora_b, f"{spec.role}.lora_B", TRANSPOSED, f"{name}/lora_B/MatMul", block)
    low = g.op("MatMul", [x, a], f"{name}/lora_A/MatMul")
    delta = g.op("MatMul", [low, b], f"{name}/lora_B/MatMul")
    # scaling is a separate constant so the stored lora_B equals the trained tensor exactly; x * 1.0 is exact,
    # so alpha = rank needs no node (each node costs onnxruntime ~5 KiB of heap and a kernel launch)
    if spec.scaling != 1.0:
        delta = g.op("Mul", [delta, g.fconst(spec.scaling)], f"{name}/lora/Mul")
    return delta


def _project_heads(g: GraphBuilder, h: str, spec: LinearSpec, heads: tuple[int, ...], name: str, block: int) -> str:
    """``linear(h)`` ``[B, S, prod(heads)]`` -> ``[B, *heads[:-1], S, D]`` (heads first, then tokens)."""
    x = linear(g, h, spec, f"{name}_proj", block)
    x = g.op("Reshape", [x, g.ints(0, 0, *heads)], f"{name}/Reshape")
    perm = [0, *range(2, len(heads) + 1), 1, len(heads) + 1]
    return g.op("Transpose", [x], f"{name}/Transpose", perm=perm)


#   h ─► q linear ─► Reshape [B, S, kv, rep, D] ─► Transpose [B, kv, rep, S, D] ─► RoPE
#   h ─► k/v linears ─► Reshape [B, S, kv, D] ─► Transpose [B, kv, S, D] ─► (k: RoPE) ─► Concat(past, ·) = present
#   MatMul(q, Unsqueeze(kᵀ) [B, kv, 1, D, T]) * 1/sqrt(D) ─► [fp32] + mask ─► Softmax ─► MatMul Unsqueeze(v)
#     ─► Transpose [B, S, kv, rep, D] ─► Reshape [B, S, H * D] ─► o linear
def attention(g: GraphBuilder, h: str, spec: BlockSpec, ctx: BlockContext) -> str:
    """Self-attention of one block with its KV cache (graph inputs ``past_key_values.{i}.*``).

    Grouped-query attention by broadcasting: the ``rep = heads / kv_heads`` query heads of a group sit on their
    own axis and MatMul broadcasts the group's single key/value head over it (query head ``kv * rep + r`` reads kv
    head ``kv``, as transformers' ``repeat_kv``) without materialising repeated keys and values.
    """
    i = spec.index
    base = f"/model/layers.{i}/attn"
    lin, kv, d = spec.linears, ctx.num_kv_heads, ctx.head_dim
    rep = ctx.num_heads // kv
    q = _project_heads(g, h, lin["q_proj"], (kv, rep, d), f"{base}/q", i)  # [B, kv, rep, S, D]
    k = _project_heads(g, h, lin["k_proj"], (kv, d), f"{base}/k", i)  # [B, kv, S, D]
    v = _project_heads(g, h, lin["v_proj"], (kv, d), f"{base}/v", i)
    q = rotary(g, q, ctx.cos_q, ctx.sin_q, f"{base}/q_rotary")
    k = rotary(g, k, ctx.cos_k, ctx.sin_k, f"{base}/k_rotary")
    past_k, past_v = past_names(i)
    out_k, out_v = present_names(i)
    k_all = g.op_to("Concat", [past_k, k], f"{base}/k_cache/Concat", [out_k], axis=2)[0]
    v_all = g.op_to("Concat", [past_v, v], f"{base}/v_cache/Concat", [out_v], axis=2)[0]
    k_t = g.op("Transpose", [k_all], f"{base}/k_transpose", perm=[0, 1, 3, 2])
    k_t = g.op("Unsqueeze", [k_t, g.ints(2)], f"{base}/k_group/Unsqueeze")  # [B, kv, 1, D, T]
    v_all = g.op("Unsqueeze", [v_all, g.ints(2)], f"{base}/v_group/Unsqueeze")  # [B, kv, 1, T, D]
    scores = g.op("MatMul", [q, k_t], f"{base}/qk/MatMul")  # [B, kv, rep, S, T]
    scores = g.op("Mul", [scores, g.fconst(d**-0.5)], f"{base}/qk/Mul")
    scores = g.to_float(scores, f"{base}/qk/Cast")
    scores = g.op("Add", [scores, ctx.masks[spec.window]], f"{base}/mask/Add")
    probs = g.from_float(g.op("Softmax", [scores], f"{base}/Softmax", axis=-1), f"{base}/Softmax/CastBack")
    out = g.op("MatMul", [probs, v_all], f"{base}/pv/MatMul")  # [B, kv, rep, S, D]
    out = g.op("Transpose", [out], f"{base}/merge/Transpose", perm=[0, 3, 1, 2, 4])
    out = g.op("Reshape", [out, g.ints(0, 0, ctx.num_heads * d)], f"{base}/merge/Reshape")
    return linear(g, out, lin["o_proj"], f"{base}/o_proj", i)


#   h ─► gate linear ─► x * Sigmoid(x) ─► Mul ◄─ up linear ◄─ h ;  ─► down linear
def mlp(g: GraphBuilder, h: str, spec: BlockSpec) -> str:
    """SwiGLU: ``down(silu(gate(h)) * up(h))``."""
    i = spec.index
    base = f"/model/layers.{i}/mlp"
    gate = linear(g, h, spec.linears["gate_proj"], f"{base}/gate_proj", i)
    up = linear(g, h, spec.linears["up_proj"], f"{base}/up_proj", i)
    act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{base}/act/Sigmoid")], f"{base}/act/Mul")
    return linear(g, g.op("Mul", [act, up], f"{base}/Mul"), spec.linears["down_proj"], f"{base}/down_proj", i)


#   x ─► RMSNorm ─► attention ─► Add x ─► RMSNorm ─► MLP ─► Add ─► next block
def decoder_block(g: GraphBuilder, x: str, spec: BlockSpec, ctx: BlockContext) -> str:
    """One pre-norm decoder block with residual connections."""
    i = spec.index
    base = f"/model/layers.{i}"
    h = rms_norm(g, x, spec.attn_norm, ctx.eps, f"{base}/input_layernorm", "input_layernorm", i)
    x = g.op("Add", [x, attention(g, h, spec, ctx)], f"{base}/attn/residual/Add")
    h = rms_norm(g, x, spec.mlp_norm, ctx.eps, f"{base}/post_attention_layernorm", "post_attention_layernorm", i)
    return g.op("Add", [x, mlp(g, h, spec)], f"{base}/mlp/residual/Add")
