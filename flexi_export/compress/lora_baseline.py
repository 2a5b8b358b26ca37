"""The fair baseline: ShortGPT removal plus standard LoRA on the kept blocks, with Flexi's parameter budget.

Flexi stores, beyond the kept blocks, the replacement blocks' own parameters (adapters, norms, OFN). The
baseline removes the same blocks and spends that same number of parameters on ordinary LoRA adapters
(``y = W x + s B A x``, A random, B zero) on the kept blocks' matrices, distributing the ranks as evenly as
the budget allows (the first blocks get one rank more when it does not divide). It trains with the same loss,
data and token budget. This is a benchmark baseline: it is evaluated in PyTorch, not exported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from flexi_export.layouts import layout_for
from flexi_export.model.build import get_module, get_plan, set_module
from flexi_export.stats import linear_shapes


class LoRALinear(nn.Module):
    """``base(x) + scaling * lora_B(lora_A(x))`` with ``base`` a registered (frozen) child."""

    def __init__(
        self, base: nn.Linear, rank: int, scaling: float = 1.0, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        self.base = base
        self.scaling = scaling
        weight = base.weight
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=weight.device, dtype=weight.dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            bound = math.sqrt(6.0 / ((1 + 5.0) * base.in_features))  # kaiming_uniform_(a=sqrt(5)), as PEFT
            values = torch.empty(self.lora_A.weight.shape).uniform_(-bound, bound, generator=generator)
            self.lora_A.weight.copy_(values)
            self.lora_B.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * self.lora_B(self.lora_A(x))


@dataclass(frozen=True)
class LoRABudget:
    """Ranks per kept block and the parameters they use."""

    ranks: dict[int, int]
    params: int
    budget: int


def lora_ranks(budget: int, blocks: Sequence[int], per_rank: int) -> LoRABudget:
    """Ranks for ``blocks`` whose total ``per_rank * sum(ranks)`` is the largest not above ``budget``."""
    units = budget // per_rank
    base, extra = divmod(units, len(blocks))
    ranks = {b: base + (1 if k < extra else 0) for k, b in enumerate(blocks)}
    return LoRABudget(ranks, per_rank * units, budget)


def add_lora(
    model: PreTrainedModel, budget: int, targets: Sequence[str], seed: int = 0
) -> tuple[LoRABudget, list[str]]:
    """Wrap the targeted matrices of every executed block of ``model`` (built from a removal plan) in LoRA.

    Returns the rank split and the names of the new trainable parameters. ``model`` is changed in place (it is
    a freshly built model whose blocks share the source's weights; the source itself is untouched).
    """
    plan = get_plan(model)
    if plan is None or plan.count("shared"):
        raise ValueError("add_lora expects a model built from a removal (ShortGPT) plan")
    layout = layout_for(model.config.model_type)
    shapes = linear_shapes(layout.dims(model.config))
    per_rank = sum(sum(shapes[t]) for t in targets)
    layers = get_module(model, layout.layers)
    split = lora_ranks(budget, list(range(len(layers))), per_rank)
    generator = torch.Generator().manual_seed(seed)
    names = []
    for index, rank in split.ranks.items():
        if rank == 0:
            continue
        for role in targets:
            path = layout.linears[role]
            set_module(layers[index], path, LoRALinear(get_module(layers[index], path), rank, 1.0, generator))
            prefix = f"{layout.layers}.{index}.{path}"
            names += [f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"]
    return split, names
