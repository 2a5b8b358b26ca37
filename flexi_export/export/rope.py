"""Rotary embedding tables for the graph: ``inv_freq`` and the cos/sin scaling factor.

The graph computes ``cos``/``sin`` from ``position_ids`` and a small ``inv_freq`` initializer (``head_dim / 2``
floats) instead of storing a ``max_positions x head_dim`` table. ``inv_freq`` comes from transformers' own
``ROPE_INIT_FUNCTIONS`` for the config, so scaled variants (``llama3``, ``linear``, ``yarn``) are exactly the
frequencies the PyTorch model uses. Variants whose frequencies change with the sequence length at run time
(``dynamic``, ``longrope``) cannot be a constant and are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from flexi_export.errors import UnsupportedModelError

#: RoPE types whose frequencies depend on the current sequence length (transformers' ``dynamic_rope_update``).
_SEQUENCE_DEPENDENT = ("dynamic", "longrope")


@dataclass(frozen=True)
class RopeTables:
    """``inv_freq`` (float32, ``[head_dim / 2]``) and the factor applied to cos and sin."""

    inv_freq: np.ndarray
    attention_scaling: float
    rope_type: str


def rope_tables(config: Any) -> RopeTables:
    """The rotary tables of ``config`` (an executed transformers config of a supported family)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = str(params.get("rope_type", "default"))
    if rope_type in _SEQUENCE_DEPENDENT:
        raise UnsupportedModelError(
            f"rope_type {rope_type!r} changes its frequencies with the sequence length; the exporter supports "
            f"static RoPE only (default, linear, llama3, yarn)"
        )
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UnsupportedModelError("partial rotary embeddings (partial_rotary_factor != 1) are not supported")
    if rope_type == "default":
        inv_freq, scaling = _default_parameters(config, params)
    elif rope_type in ROPE_INIT_FUNCTIONS:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    else:
        raise UnsupportedModelError(f"unknown rope_type {rope_type!r}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    array = inv_freq.detach().to("cpu").float().numpy()
    if array.shape != (head_dim // 2,):
        raise UnsupportedModelError(
            f"RoPE has {array.shape[0]} frequencies, expected head_dim / 2 = {head_dim // 2} (partial rotary?)"
        )
    return RopeTables(inv_freq=np.ascontiguousarray(array), attention_scaling=float(scaling), rope_type=rope_type)


def _default_parameters(config: Any, params: dict[str, Any]) -> tuple[Any, float]:
    """Plain RoPE, as every supported family's ``compute_default_rope_parameters``."""
    import torch

    base = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
    return inv_freq, 1.0
