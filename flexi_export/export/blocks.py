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
from flexi_export.export.spec import BlockSpec, LinearSpec, OfnSpec, TensorRef
from flexi_export.export.weights import AS_IS, TRANSPOSED


@dataclass(frozen=True)
class BlockContext:
    """Values computed once per graph and read by every block."""

    #: RoPE tables ``[B, 1, S, head_dim]`` in the activation dtype.
    cos: str
    sin: str
    #: Additive attention mask ``[B, 1, S, P+S]`` (float32, 0 or the float32 minimum) per sliding window.
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
#   └──► MatMul lora_A[in,r] ─► MatMul lora_B[r,out] ─► Mul scaling ──┘
def linear(g: GraphBuilder, x: str, spec: LinearSpec, name: str, block: int) -> str:
    """``x @ W (+ b) + scaling * (x @ A) @ B``, then the OFN when the block has one on this output."""
    w = g.registry.use(spec.weight, f"{spec.role}.weight", TRANSPOSED, f"{name}/MatMul", block)
    y = g.op("MatMul", [x, w], f"{name}/MatMul")
    if spec.bias is not None:
        b = g.registry.use(spec.bias, f"{spec.role}.bias", AS_IS, f"{name}/Add", block)
        y = g.op("Add", [y, b], f"{name}/Add")
    if spec.lora_a is not None and spec.lora_b is not None:
        a = g.registry.use(spec.lora_a, f"{spec.role}.lora_A", TRANSPOSED, f"{name}/lora_A/MatMul", block)
        b = g.registry.use(spec.lora_b, f"{spec.role}.lora_B", TRANSPOSED, f"{name}/lora_B/MatMul", block)
        low = g.op("MatMul", [x, a], f"{name}/lora_A/MatMul")
        delta = g.op("MatMul", [low, b], f"{name}/lora_B/MatMul")
        # scaling is a separate constant so the stored lora_B equals the trained tensor exactly
        delta = g.op("Mul", [delta, g.fconst(spec.scaling)], f"{name}/lora/Mul")
        y = g.op("Add", [y, delta], f"{name}/lora/Add")
    if spec.ofn is not None:
        y = output_feature_norm(g, y, spec.ofn, f"{name}/ofn", f"{spec.role}.ofn", block)
    return y


#   x ─► Split halves (x1, x2) ─► Concat(-x2, x1) ─► Mul sin ─┐
#   x ─────────────────────────────────────────────► Mul cos ─┴─► Add
def rotary(g: GraphBuilder, x: str, ctx: BlockContext, name: str) -> str:
    """``x * cos + rotate_half(x) * sin`` on ``[B, H, S, head_dim]``."""
    x1, x2 = g.op_n("Split", [x], f"{name}/Split", 2, axis=-1, num_outputs=2)
    rotated = g.op("Concat", [g.op("Neg", [x2], f"{name}/Neg"), x1], f"{name}/Concat", axis=-1)
    return g.op(
        "Add",
        [g.op("Mul", [x, ctx.cos], f"{name}/MulCos"), g.op("Mul", [rotated, ctx.sin], f"{name}/MulSin")],
        f"{name}/Add",
    )


def _heads(g: GraphBuilder, x: str, heads: int, head_dim: int, name: str) -> str:
    """``[B, S, heads * head_dim]`` -> ``[B, heads, S, head_dim]``."""
    x = g.op("Reshape", [x, g.ints(0, 0, heads, head_dim)], f"{name}/Reshape")
    return g.op("Transpose", [x], f"{name}/Transpose", perm=[0, 2, 1, 3])


def _repeat_kv(g: GraphBuilder, x: str, ctx: BlockContext, name: str) -> str:
    """Grouped-query attention: ``[B, kv, T, D]`` -> ``[B, kv * rep, T, D]`` (each kv head repeated in place)."""
    rep = ctx.num_heads // ctx.num_kv_heads
    if rep == 1:
        return x
    x = g.op("Unsqueeze", [x, g.ints(2)], f"{name}/Unsqueeze")
    x = g.op("Expand", [x, g.ints(1, 1, rep, 1, 1)], f"{name}/Expand")
    return g.op("Reshape", [x, g.ints(0, ctx.num_heads, -1, ctx.head_dim)], f"{name}/Reshape")


#   h ─► q/k/v linears ─► heads ─► RoPE(q, k) ─► Concat(past, new) = present ─► repeat kv
#     ─► MatMul(q, kᵀ) * 1/sqrt(D) ─► [fp32] + mask ─► Softmax ─► MatMul v ─► merge heads ─► o linear
def attention(g: GraphBuilder, h: str, spec: BlockSpec, ctx: BlockContext) -> str:
    """Self-attention of one block with its KV cache (graph inputs ``past_key_values.{i}.*``)."""
    i = spec.index
    base = f"/model/layers.{i}/attn"
    lin = spec.linears
    q = _heads(g, linear(g, h, lin["q_proj"], f"{base}/q_proj", i), ctx.num_heads, ctx.head_dim, f"{base}/q")
    k = _heads(g, linear(g, h, lin["k_proj"], f"{base}/k_proj", i), ctx.num_kv_heads, ctx.head_dim, f"{base}/k")
    v = _heads(g, linear(g, h, lin["v_proj"], f"{base}/v_proj", i), ctx.num_kv_heads, ctx.head_dim, f"{base}/v")
    q = rotary(g, q, ctx, f"{base}/q_rotary")
    k = rotary(g, k, ctx, f"{base}/k_rotary")
    past_k, past_v = past_names(i)
    out_k, out_v = present_names(i)
    k_all = g.op_to("Concat", [past_k, k], f"{base}/k_cache/Concat", [out_k], axis=2)[0]
    v_all = g.op_to("Concat", [past_v, v], f"{base}/v_cache/Concat", [out_v], axis=2)[0]
    k_all = _repeat_kv(g, k_all, ctx, f"{base}/k_repeat")
    v_all = _repeat_kv(g, v_all, ctx, f"{base}/v_repeat")
    k_t = g.op("Transpose", [k_all], f"{base}/k_transpose", perm=[0, 1, 3, 2])
    scores = g.op("MatMul", [q, k_t], f"{base}/qk/MatMul")
    scores = g.op("Mul", [scores, g.fconst(ctx.head_dim**-0.5)], f"{base}/qk/Mul")
    scores = g.to_float(scores, f"{base}/qk/Cast")
    scores = g.op("Add", [scores, ctx.masks[spec.window]], f"{base}/mask/Add")
    probs = g.from_float(g.op("Softmax", [scores], f"{base}/Softmax", axis=-1), f"{base}/Softmax/CastBack")
    out = g.op("MatMul", [probs, v_all], f"{base}/pv/MatMul")
    out = g.op("Transpose", [out], f"{base}/merge/Transpose", perm=[0, 2, 1, 3])
    out = g.op("Reshape", [out, g.ints(0, 0, ctx.num_heads * ctx.head_dim)], f"{base}/merge/Reshape")
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
