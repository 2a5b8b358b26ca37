"""Modules of a replacement (shared) block: a Linear that reuses another block's weights, plus its own
low-rank adapter and output feature normalisation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class OutputFeatureNorm(nn.Module):
    """Normalise each token's branch output and scale it per channel: ``norm(h) * weight``.

    ``variant="layernorm"``: ``(h - mean(h)) / sqrt(var(h) + eps)``; ``variant="rms"``: ``h / sqrt(mean(h^2) +
    eps)``. Statistics are over the hidden dimension of one token, computed in fp32 (like the model's RMSNorm)
    so that fp16/bf16 activations cannot overflow in the square.
    """

    def __init__(self, dim: int, variant: str, eps: float, gamma: torch.Tensor) -> None:
        super().__init__()
        if variant not in ("layernorm", "rms"):
            raise ValueError(f"unknown OFN variant {variant!r}")
        self.variant = variant
        self.eps = eps
        self.weight = nn.Parameter(gamma.detach().clone().reshape(dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        dtype = h.dtype
        x = h.float()
        if self.variant == "layernorm":
            x = x - x.mean(-1, keepdim=True)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x).to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, variant={self.variant}, eps={self.eps}"


class SharedLinear(nn.Module):
    """``y = base(x) + scaling * lora_B(lora_A(x))``, then the optional OFN.

    ``base`` is another block's ``nn.Linear``, held by reference and deliberately *not* registered as a
    submodule: its weight stays one ``nn.Parameter`` owned (and saved, moved, counted) by the original block,
    and every sharing block reads that same object. Never ``deepcopy`` a base: it would silently un-share it.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int | None = None,
        scaling: float = 1.0,
        lora_a: torch.Tensor | None = None,
        lora_b: torch.Tensor | None = None,
        ofn: OutputFeatureNorm | None = None,
    ) -> None:
        super().__init__()
        object.__setattr__(self, "base", base)  # a reference, not a child module (see class docstring)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.scaling = float(scaling)
        self.lora_A: nn.Linear | None = None
        self.lora_B: nn.Linear | None = None
        if rank is not None:
            weight = base.weight
            self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=weight.device, dtype=weight.dtype)
            self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                if lora_a is None:  # PEFT's default: A random, B zero, so the adapter starts as a no-op
                    nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
                else:
                    self.lora_A.weight.copy_(lora_a)
                if lora_b is None:
                    nn.init.zeros_(self.lora_B.weight)
                else:
                    self.lora_B.weight.copy_(lora_b)
        self.ofn = ofn

    @property
    def weight(self) -> nn.Parameter:
        """The shared base weight (the owner's ``nn.Parameter``)."""
        return self.base.weight

    @property
    def bias(self) -> nn.Parameter | None:
        """The shared base bias, if any."""
        return self.base.bias

    def delta_weight(self) -> torch.Tensor | None:
        """``scaling * B A`` (``[out, in]``), or None without an adapter."""
        if self.lora_A is None or self.lora_B is None:
            return None
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.base.weight, self.base.bias)
        if self.lora_A is not None and self.lora_B is not None:
            y = y + self.scaling * self.lora_B(self.lora_A(x))
        if self.ofn is not None:
            y = self.ofn(y)
        return y

    def extra_repr(self) -> str:
        rank = None if self.lora_A is None else self.lora_A.out_features
        return f"in={self.in_features}, out={self.out_features}, rank={rank}, scaling={self.scaling}"


class SharedNorm(nn.Module):
    """A norm that reuses another block's norm module by reference (plan entries with ``norms="source"``)."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "base", base)  # a reference, not a child: the owner saves and moves it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x)
