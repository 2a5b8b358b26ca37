"""The ``--target cpu`` graph: onnxruntime's fused contrib ops where they pay on the CPU execution provider.

Same plan, same weights registry, same I/O contract as the portable graph (:mod:`~flexi_export.export.decoder`);
what changes is how a block is computed:

- ``SkipSimplifiedLayerNormalization`` for every norm after the first (the residual add and the RMSNorm in one
  kernel; its 4th output is the residual stream); the first is the standard-op RMSNorm, which onnxruntime fuses
  into ``SimplifiedLayerNormalization`` itself;
- ``GroupQueryAttention`` (com.microsoft) with its own rotary (``do_rotary=1``, cos/sin caches built from the
  model's actual ``inv_freq``, so llama3/linear/yarn scaling is exact). onnxruntime rotates a first prompt by
  cache index and ignores ``position_ids`` there, so the graph feeds it ``position_ids`` + the row's leading
  padding: unpadded and right-padded rows (onnxruntime-genai's batches) are rotated at the caller's positions,
  a left-padded row at its cache indices throughout. RoPE depends only on distances, so the logits are the
  model's either way; a left-padded row's cached keys are rotated by its padding count more than transformers'
  (an equivalent cache for this graph, not interchangeable with the portable graph's);
- packed projections: q/k/v as one ``[hidden, q+k+v]`` matrix and gate/up as one ``[hidden, 2 * inter]`` matrix;
  a shared block's adapters on them as one stacked ``A`` and one block-diagonal ``B`` (two MatMuls and an Add per
  pack, not three nodes per member plus a Split).

Sharing is kept: a packed matrix is derived from the *owner's* Parameters and registered under one key (the
identities of its parts), so the owner block and every block sharing it read the same single initializer;
each block's adapters stay its own tensors beside it (their deltas are added to the packed product), and
biases (Qwen2) are one packed bias added before attention (GroupQueryAttention has no bias input).

Attention masking: ``seqlens_k`` is ``total_length - 1`` for every row and the padding / sliding-window part of
the mask is an additive ``attention_bias`` computed in-graph from ``attention_mask`` (full-attention layers: the
padding row alone; sliding-window layers: the portable graph's cache-index grid), so left-padded batches and
Mistral's window give the transformers result exactly; GroupQueryAttention's own causal mask does the rest.
onnxruntime-genai's builder instead derives ``seqlens_k`` from the mask sum, which is only right for unpadded or
right-padded rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from onnx import TensorProto

from flexi_export.errors import ExportError
from flexi_export.export.blocks import linear, lora_delta, rms_norm
from flexi_export.export.decoder import DecoderGraph, _attention_masks, _embedding, _lm_head
from flexi_export.export.graph import GraphBuilder
from flexi_export.export.io_spec import FLOAT_TYPES, decoder_io, past_names, present_names
from flexi_export.export.qblocks import MS_DOMAIN, gather_block_quantized, quantized_matmul
from flexi_export.export.quant import QuantConfig
from flexi_export.export.spec import PACKED_TRANSFORMS, BlockSpec, Derived, LinearSpec, ModelSpec, TensorRef
from flexi_export.export.weights import AS_IS, TRANSPOSED, WeightRegistry

#: Export targets: the standard-op graph (default) and the fused onnxruntime CPU graph.
TARGETS = ("portable", "cpu")
#: Projections packed into one matrix: (packed role, member roles).
PACKS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def check_target(target: str, dtype: str) -> None:
    """Raise :class:`ExportError` for an unknown target or a dtype the fused CPU graph does not support."""
    if target not in TARGETS:
        raise ExportError(f"unsupported target {target!r}; supported: {', '.join(TARGETS)}")
    if target == "cpu" and dtype == "fp16":
        raise ExportError(
            "--target cpu supports fp32, int8 and int4: onnxruntime's x86-64 CPU provider has no fp16 kernels "
            "(use --target portable for fp16 bundles)"
        )


class _Packer:
    """Packed matrices and biases, one :class:`Derived` per distinct set of parts (so shared packs are one)."""

    def __init__(self, names: dict[int, str]) -> None:
        self._names = names
        self._packs: dict[tuple[object, ...], Derived] = {}

    def _name(self, ref: TensorRef) -> str:
        return ref.name if isinstance(ref, Derived) else self._names[id(ref)]

    def pack(self, refs: list[TensorRef], member: str, packed: str) -> Derived:
        """``refs`` concatenated along the output dimension (torch layout ``[sum out, in]``, or 1-D biases)."""
        shape = (sum(r.shape[0] for r in refs), *tuple(refs[0].shape[1:]))
        return self._derive("pack", refs, member, packed, shape, lambda ts: torch.cat(ts, dim=0))

    def block_diag(self, refs: list[TensorRef], member: str, packed: str) -> Derived:
        """``refs`` (adapter ``B`` matrices, torch layout ``[out_i, rank_i]``) as one block-diagonal
        ``[sum out, sum rank]`` matrix: ``concat(x A_i) @ block_diag(B_i)`` is every member's ``x A_i B_i`` side
        by side in one product."""
        shape = (sum(r.shape[0] for r in refs), sum(r.shape[1] for r in refs))
        return self._derive("block_diag", refs, member, packed, shape, lambda ts: torch.block_diag(*ts))

    def _derive(
        self,
        transform: str,
        refs: list[TensorRef],
        member: str,
        packed: str,
        shape: tuple[int, ...],
        combine: Callable[[list[torch.Tensor]], torch.Tensor],
    ) -> Derived:
        """One :class:`Derived` per (transform, parts): named after the first part with ``member`` -> ``packed``,
        computed by ``combine`` of the parts' tensors when the data file is written."""
        key = (transform, *(id(r) for r in refs))
        if key not in self._packs:
            parts = tuple(refs)

            def compute() -> torch.Tensor:
                with torch.no_grad():
                    return combine([p.compute() if isinstance(p, Derived) else p.detach() for p in parts])

            first = self._name(refs[0])
            if f".{member}." not in first:
                raise RuntimeError(f"cannot name the packed tensor of {first}")
            self._packs[key] = Derived(
                name=first.replace(f".{member}.", f".{packed}."),
                shape=shape,
                compute=compute,
                sources=tuple(s for r in refs for s in (r.sources if isinstance(r, Derived) else (self._name(r),))),
                transform=transform,
                parts=parts,
            )
        return self._packs[key]


def build_fused_decoder(
    spec: ModelSpec, dtype: str, progress: Iterable[int] | None = None, quant: QuantConfig | None = None
) -> DecoderGraph:
    """The ``--target cpu`` graph of ``spec`` (weights in ``dtype``, block matrices quantized as ``quant``)."""
    check_target("cpu", dtype)
    d = spec.dims
    registry = WeightRegistry(spec.names, dtype)
    g = GraphBuilder(registry, FLOAT_TYPES[dtype], quant)
    io = decoder_io(len(spec.blocks), d.num_kv_heads, d.head_dim, d.vocab_size, dtype)
    ctx = _context(g, spec)
    packer = _Packer(spec.names)
    x = _fused_embedding(g, spec)
    # the first norm has no residual to fuse: the standard-op RMSNorm, which onnxruntime itself fuses into
    # SimplifiedLayerNormalization (that op is onnxruntime's, registered in the ai.onnx domain, so onnx.checker
    # would reject it written out)
    h = rms_norm(
        g, x, spec.blocks[0].attn_norm, d.rms_norm_eps, "/model/layers.0/input_layernorm", "input_layernorm", 0
    )
    residual = x
    for index in progress if progress is not None else range(len(spec.blocks)):
        block = spec.blocks[index]
        base = f"/model/layers.{index}"
        attn = _attention(g, h, block, ctx, packer)
        h, residual = _skip_norm(g, attn, residual, block.mlp_norm, f"{base}/post_attention_layernorm", index, d)
        out = _mlp(g, h, block, packer)
        if index + 1 < len(spec.blocks):
            nxt = spec.blocks[index + 1]
            name = f"/model/layers.{index + 1}/input_layernorm"
            h, residual = _skip_norm(g, out, residual, nxt.attn_norm, name, index + 1, d)
        else:
            h, _ = _skip_norm(g, out, residual, spec.final_norm, "/model/norm", None, d)
    _lm_head(g, h, spec)
    return DecoderGraph(nodes=g.nodes, inline=g.inline, io=io, registry=registry)


def _fused_embedding(g: GraphBuilder, spec: ModelSpec) -> str:
    """The portable graph's lookup, except an untied int4 embedding of whole blocks: ``GatherBlockQuantized``
    (one node per step instead of ~12 unpacking ones). A tied table keeps the MatMulNBits layout its LM head
    reads, so that it stays one initializer."""
    q = g.quant
    untied_int4 = q is not None and q.quantize_embedding and q.dtype == "int4" and not spec.tied
    if untied_int4 and spec.dims.hidden_size % q.block_size == 0:  # type: ignore[union-attr]
        return gather_block_quantized(g, spec.embed, "input_ids", "/model/embed_tokens")
    return _embedding(g, spec)


#   skip (residual) ─┐
#   x (branch) ──────┴─► SkipSimplifiedLayerNormalization(gamma) ─► normed (output 0), x + skip (output 3)
def _skip_norm(
    g: GraphBuilder, x: str, skip: str, weight: TensorRef, name: str, block: int | None, d: Any
) -> tuple[str, str]:
    role = "norm" if block is None else name.rsplit("/", 1)[-1]
    gamma = g.registry.use(weight, role, AS_IS, name, block)
    outs = [f"{name}/output_0", "", "", f"{name}/output_3"]
    g.op_to("SkipSimplifiedLayerNormalization", [x, skip, gamma], name, outs, domain=MS_DOMAIN, epsilon=d.rms_norm_eps)
    return outs[0], outs[3]


def _context(g: GraphBuilder, spec: ModelSpec) -> dict[str, Any]:
    """Per-graph values: seqlens_k, total length, cos/sin caches, one attention bias per window size."""
    d = spec.dims
    name = "/model/attn_mask"
    total = g.op("Shape", ["attention_mask"], f"{name}/Total", start=1, end=2)  # [1] int64
    total32 = g.op("Cast", [total], f"{name}/Total/Cast", to=TensorProto.INT32)
    total_scalar = g.op("Squeeze", [total32, g.ints(0)], f"{name}/Total/Squeeze")
    batch = g.op("Shape", ["input_ids"], f"{name}/Batch", start=0, end=1)
    last = g.op("Sub", [total, g.ints(1)], f"{name}/SeqlensK/Sub")
    seqlens = g.op("Expand", [last, batch], f"{name}/SeqlensK/Expand")  # [B]: every row spans the whole cache
    seqlens = g.op("Cast", [seqlens], f"{name}/SeqlensK", to=TensorProto.INT32)
    windows = sorted({b.window for b in spec.blocks if b.window is not None})
    masks = _attention_masks(g, windows) if windows else {}  # [B, 1, 1, S, T] additive float32
    bias = {w: g.op("Squeeze", [m, g.ints(1)], f"{name}/bias/{w}/Squeeze") for w, m in masks.items()}
    if any(b.window is None for b in spec.blocks):
        # full attention: GroupQueryAttention's own causal mask (by cache index, as transformers) leaves only the
        # padding to mask, the same [T] row for every query: 6 nodes where the causal [S, T] grid took 20, which
        # onnxruntime runs at every decode step
        full = f"{name}/bias/full"
        padding = g.op("Cast", ["attention_mask"], f"{full}/Cast", to=TensorProto.BOOL)
        low = g.f32const(float(np.finfo(np.float32).min))
        padding = g.op("Where", [padding, g.f32const(0.0), low], f"{full}/Where")  # [B, T]
        padding = g.op("Unsqueeze", [padding, g.ints(1, 2)], f"{full}/Unsqueeze")  # [B, 1, 1, T]
        seq = g.op("Shape", ["input_ids"], f"{full}/SeqLen", start=1, end=2)
        rows = g.op("Concat", [g.ints(1, 1), seq, g.ints(1)], f"{full}/Shape", axis=0)
        bias[None] = g.op("Expand", [padding, rows], f"{full}/Expand")  # [B, 1, S, T]: onnxruntime wants S rows
    positions = np.arange(d.max_position_embeddings, dtype=np.float32)[:, None]
    angles = positions * spec.rope.inv_freq.astype(np.float32)[None, :]  # as transformers: fp32 products
    scale = np.float32(spec.rope.attention_scaling)
    cos = g.inline_initializer("model.rotary_emb.cos_cache", (np.cos(angles) * scale).astype(np.float32))
    sin = g.inline_initializer("model.rotary_emb.sin_cache", (np.sin(angles) * scale).astype(np.float32))
    # GroupQueryAttention rotates a first prompt by cache index whatever position_ids says; later steps read
    # position_ids. Adding each row's leading padding keeps both frames the same: a left-padded row is rotated by
    # cache index throughout (same distances, same logits), a right-padded one (onnxruntime-genai's batches)
    # by the caller's positions, which skip the padding slots inside its cache
    lead = g.op("ArgMax", ["attention_mask"], f"{name}/LeadingPadding", axis=1, keepdims=1)  # first real token
    positions = g.op("Add", ["position_ids", lead], f"{name}/RotaryPositions")
    return {
        "seqlens": seqlens,
        "total": total_scalar,
        "cos": cos,
        "sin": sin,
        "bias": bias,
        "positions": positions,
        "dims": d,
    }


#   x ─► MatMul W_packed [in, sum out] ─► [Add packed bias] ─► [+ packed adapter delta]
#     (members whose adapters cannot be packed: Split ─► + each member's delta)
def packed_linear(
    g: GraphBuilder, x: str, specs: list[LinearSpec], packed: str, name: str, block: int, packer: _Packer
) -> tuple[str, list[str] | None]:
    """One product for several projections of the same input. Returns ``(packed output, None)`` when the packed
    output already holds every member's adapter delta (no adapters, or adapters on every member with one scaling),
    else ``(packed output without deltas, per-member outputs with their deltas added)``."""
    if any(s.ofn is not None for s in specs):
        raise RuntimeError("output feature norms only follow o_proj / down_proj, never a packed projection")
    weight = packer.pack([s.weight for s in specs], specs[0].role, packed)
    if g.quant is not None:
        y = quantized_matmul(g, x, weight, f"{packed}.weight", f"{name}/MatMul", block)
    else:
        w = g.registry.use(weight, f"{packed}.weight", TRANSPOSED, f"{name}/MatMul", block)
        y = g.op("MatMul", [x, w], f"{name}/MatMul")
    biases = [s.bias for s in specs]
    if any(b is not None for b in biases):
        if any(b is None for b in biases):
            raise ExportError(f"{name}: some of {[s.role for s in specs]} have biases and some do not")
        bias = packer.pack(biases, specs[0].role, packed)  # type: ignore[arg-type]
        y = g.op("Add", [y, g.registry.use(bias, f"{packed}.bias", AS_IS, f"{name}/Add", block)], f"{name}/Add")
    if _packable_adapters(specs):
        return g.op("Add", [y, _packed_delta(g, x, specs, packed, name, block, packer)], f"{name}/lora/Add"), None
    deltas = [lora_delta(g, x, s, f"{name}/{s.role}", block) for s in specs]
    if all(delta is None for delta in deltas):
        return y, None
    sizes = g.ints(*(s.weight.shape[0] for s in specs))
    parts = g.op_n("Split", [y, sizes], f"{name}/Split", len(specs), axis=-1)
    outs = [
        part if delta is None else g.op("Add", [part, delta], f"{name}/{s.role}/lora/Add")
        for part, delta, s in zip(parts, deltas, specs, strict=True)
    ]
    return y, outs


def _packable_adapters(specs: list[LinearSpec]) -> bool:
    """True when every member has an adapter, all with one scaling: their deltas are then one product pair."""
    return all(s.lora_a is not None and s.lora_b is not None for s in specs) and len({s.scaling for s in specs}) == 1


#   x ─► MatMul [A_q; A_k; A_v]ᵀ [in, sum rank] ─► MatMul block_diag(B_q, B_k, B_v)ᵀ [sum rank, sum out] (─► * scaling)
def _packed_delta(
    g: GraphBuilder, x: str, specs: list[LinearSpec], packed: str, name: str, block: int, packer: _Packer
) -> str:
    """Every member's ``scaling * (x @ A_i) @ B_i``, concatenated like the packed product, in two MatMuls instead
    of two per member plus a Split and an Add each (onnxruntime spends ~10 us a node at decode). Block-specific
    tensors: stacked A's, and the B's on a block diagonal (its zero blocks are the only bytes added)."""
    role = specs[0].role
    a = packer.pack([s.lora_a for s in specs], role, packed)  # type: ignore[misc]
    b = packer.block_diag([s.lora_b for s in specs], role, packed)  # type: ignore[misc]
    a_name = g.registry.use(a, f"{packed}.lora_A", TRANSPOSED, f"{name}/lora_A/MatMul", block)
    b_name = g.registry.use(b, f"{packed}.lora_B", TRANSPOSED, f"{name}/lora_B/MatMul", block)
    low = g.op("MatMul", [x, a_name], f"{name}/lora_A/MatMul")
    delta = g.op("MatMul", [low, b_name], f"{name}/lora_B/MatMul")
    if specs[0].scaling != 1.0:  # onnxruntime fuses MatMul * constant into one FusedMatMul
        delta = g.op("Mul", [delta, g.fconst(specs[0].scaling)], f"{name}/lora/Mul")
    return delta


#   h ─► packed qkv (+ bias, + adapters) ─► GroupQueryAttention(rotary from position_ids, bias = padding/window
#        mask, past_key_values.i) ─► present.i.key / .value ; output ─► o_proj linear (+ adapter + OFN)
def _attention(g: GraphBuilder, h: str, spec: BlockSpec, ctx: dict[str, Any], packer: _Packer) -> str:
    i = spec.index
    base = f"/model/layers.{i}/attn"
    d = ctx["dims"]
    lin = spec.linears
    packed, parts = packed_linear(g, h, [lin[r] for r in PACKS["qkv_proj"]], "qkv_proj", f"{base}/qkv_proj", i, packer)
    q, k, v = (packed, "", "") if parts is None else parts
    past_k, past_v = past_names(i)
    out_k, out_v = present_names(i)
    inputs = [q, k, v, past_k, past_v, ctx["seqlens"], ctx["total"], ctx["cos"], ctx["sin"], ctx["positions"]]
    inputs.append(ctx["bias"][spec.window])
    node = f"{base}/GroupQueryAttention"
    out = g.op_to(
        "GroupQueryAttention",
        inputs,
        node,
        [f"{node}/output_0", out_k, out_v],
        domain=MS_DOMAIN,
        num_heads=d.num_heads,
        kv_num_heads=d.num_kv_heads,
        scale=float(d.head_dim**-0.5),
        do_rotary=1,
        rotary_interleaved=0,
        local_window_size=-1,  # the window is in attention_bias (transformers' cache-index rule, exactly)
    )[0]
    return linear(g, out, lin["o_proj"], f"{base}/o_proj", i)


#   h ─► packed gate_up (+ adapters) ─► Split ─► silu(gate) * up ─► down linear (+ adapter + OFN)
def _mlp(g: GraphBuilder, h: str, spec: BlockSpec, packer: _Packer) -> str:
    i = spec.index
    base = f"/model/layers.{i}/mlp"
    specs = [spec.linears[r] for r in PACKS["gate_up_proj"]]
    packed, parts = packed_linear(g, h, specs, "gate_up_proj", f"{base}/gate_up_proj", i, packer)
    if parts is None:
        sizes = g.ints(*(s.weight.shape[0] for s in specs))
        parts = g.op_n("Split", [packed, sizes], f"{base}/gate_up_proj/Split", 2, axis=-1)
    gate, up = parts
    act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{base}/act/Sigmoid")], f"{base}/act/Mul")
    return linear(g, g.op("Mul", [act, up], f"{base}/Mul"), spec.linears["down_proj"], f"{base}/down_proj", i)


def annotate_packs(manifest: dict[str, Any], registry: WeightRegistry, names: dict[int, str]) -> None:
    """Add ``parts`` (source, transform, scaling and torch shape of each member, in packing order) to the manifest
    rows of packed tensors, so a checker can rebuild them from the model."""
    by_name = {e.name: e for e in registry.entries}
    for row in manifest["initializers"]:
        entry = by_name.get(row["name"])
        if entry is None or entry.transform not in PACKED_TRANSFORMS:
            continue
        assert isinstance(entry.ref, Derived)
        parts = entry.ref.parts
        row["parts"] = [
            {"source": list(p.sources), "transform": p.transform, "scaling": p.scaling, "shape": list(p.shape)}
            if isinstance(p, Derived)
            else {"source": [names[id(p)]], "transform": "identity", "scaling": None, "shape": list(p.shape)}
            for p in parts
        ]
