"""Parameter accounting: what a Flexi model stores, and what it would store without sharing.

:func:`count_parameters` measures a built model; :func:`plan_parameters` predicts the same number from a plan
and the model's dimensions without building anything (the compressor searches ratios with it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from flexi_export.layouts import ModelDims
from flexi_export.model.modules import OutputFeatureNorm, SharedLinear, SharedNorm
from flexi_export.plan import BlockEntry, BlockPlan


@dataclass(frozen=True)
class ParamCounts:
    """Parameter and byte totals of a model."""

    #: Each parameter counted once (what a checkpoint or bundle stores).
    unique_params: int
    unique_bytes: int
    #: As if every executed block held its own copy of what it shares.
    unshared_params: int
    unshared_bytes: int
    #: Parts of ``unique_params``.
    adapter_params: int
    ofn_params: int

    def to_json(self) -> dict[str, int]:
        """JSON-ready dict."""
        return asdict(self)


def count_parameters(model: nn.Module) -> ParamCounts:
    """Measure ``model``: unique parameters (shared ones once) and the unshared equivalent."""
    unique = dict(model.named_parameters())
    unique_params = sum(p.numel() for p in unique.values())
    unique_bytes = sum(p.numel() * p.element_size() for p in unique.values())
    extra_params = extra_bytes = 0
    adapter = ofn = 0
    for module in model.modules():
        if isinstance(module, (SharedLinear, SharedNorm)):
            for p in module.base.parameters():
                extra_params += p.numel()
                extra_bytes += p.numel() * p.element_size()
        if isinstance(module, SharedLinear) and module.lora_A is not None and module.lora_B is not None:
            adapter += module.lora_A.weight.numel() + module.lora_B.weight.numel()
        if isinstance(module, OutputFeatureNorm):
            ofn += module.weight.numel()
    return ParamCounts(
        unique_params=unique_params,
        unique_bytes=unique_bytes,
        unshared_params=unique_params + extra_params,
        unshared_bytes=unique_bytes + extra_bytes,
        adapter_params=adapter,
        ofn_params=ofn,
    )


def linear_shapes(dims: ModelDims) -> dict[str, tuple[int, int]]:
    """``(in_features, out_features)`` of each block matrix."""
    h, i = dims.hidden_size, dims.intermediate_size
    q_out = dims.num_heads * dims.head_dim
    kv_out = dims.num_kv_heads * dims.head_dim
    return {
        "q_proj": (h, q_out),
        "k_proj": (h, kv_out),
        "v_proj": (h, kv_out),
        "o_proj": (q_out, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def block_matrix_parameters(dims: ModelDims) -> int:
    """Parameters of one block's matrices and their biases (what a shared block reuses)."""
    return sum(
        fan_in * fan_out + (fan_out if role in dims.bias_roles else 0)
        for role, (fan_in, fan_out) in linear_shapes(dims).items()
    )


def block_parameters(dims: ModelDims) -> int:
    """Parameters of one original block: matrices, biases and its two norms."""
    return block_matrix_parameters(dims) + 2 * dims.hidden_size


def shared_block_parameters(entry: BlockEntry, dims: ModelDims) -> int:
    """Parameters a shared block owns: adapters, norms (unless shared with the source) and OFN gammas."""
    total = 0
    if entry.adapter is not None:
        shapes = linear_shapes(dims)
        total += sum(entry.adapter.rank * sum(shapes[t]) for t in entry.adapter.targets)
    if entry.norms == "own":
        total += 2 * dims.hidden_size
    if entry.ofn != "none":
        total += 2 * dims.hidden_size  # one gamma per branch (attention output, MLP output)
    return total


def shared_reference_parameters(entry: BlockEntry, dims: ModelDims) -> int:
    """Parameters a shared block uses by reference (its source's matrices, and norms when ``norms="source"``)."""
    return block_matrix_parameters(dims) + (2 * dims.hidden_size if entry.norms == "source" else 0)


def non_block_parameters(dims: ModelDims) -> int:
    """Embedding, final norm and LM head (once if tied)."""
    embed = dims.vocab_size * dims.hidden_size
    return embed + dims.hidden_size + (0 if dims.tie_word_embeddings else embed)


def plan_parameters(plan: BlockPlan, dims: ModelDims) -> int:
    """Unique parameters of the Flexi model of ``plan`` over a source with ``dims`` (no model needed)."""
    total = non_block_parameters(dims)
    for entry in plan.entries:
        if entry.kind == "original":
            total += block_parameters(dims)
        elif entry.kind == "shared":
            total += shared_block_parameters(entry, dims)
    return total


def plan_unshared_parameters(plan: BlockPlan, dims: ModelDims) -> int:
    """:func:`plan_parameters` plus what every shared block would need as its own copy without sharing."""
    extra = sum(shared_reference_parameters(e, dims) for e in plan.entries if e.kind == "shared")
    return plan_parameters(plan, dims) + extra


def dense_parameters(dims: ModelDims) -> int:
    """Parameters of the source model itself."""
    return non_block_parameters(dims) + dims.num_blocks * block_parameters(dims)
