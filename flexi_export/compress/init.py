"""Initial values of the replacement blocks' own parameters (computed first, then handed to ``build_flexi``).

Adapters (``init="svd"``): for pruned block ``i`` sharing kept block ``j`` and each adapted matrix,
``D = W_i - W_j = U S V^T``, ``B = U_r S_r^1/2 / sqrt(s)``, ``A = S_r^1/2 V_r^T / sqrt(s)`` where
``s = alpha / rank`` is the adapter scaling, so that ``W_j + s B A = W_j + SVD_r(D)``: the closest the
replacement can get to block ``i`` at rank ``r``. ``init="zero"`` keeps the LoRA default (A random, B zero:
the replacement starts as an exact copy of block ``j``).

OFN gamma (``ofn_init``): the statistics of the original block's branch outputs on calibration tokens, with
teacher forcing: each branch-output matrix (``o_proj``, ``down_proj``) of pruned block ``i`` sees the inputs it
gets in the dense model, ``o = W_i x`` is the original branch output, ``n = norm(W_j x + s B A x)`` the
normalised replacement output (the same inputs, the initial adapters). Then per output channel ``c``:

- ``fit`` (default): ``gamma_c = sum_t o_tc n_tc / sum_t n_tc^2``, the least-squares fit of ``gamma * n`` to ``o``;
- ``rms``: ``gamma_c = sqrt(sum_t o_tc^2 / sum_t n_tc^2)``, matching the per-channel RMS (sign-free).

The replacement's own norms start as the pruned block's norms (``build_flexi``'s default).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from flexi_export.compress.svd import EXACT_SVD_MAX_DIM, truncated_svd
from flexi_export.errors import CompressError
from flexi_export.layouts import layout_for
from flexi_export.model.build import get_module
from flexi_export.model.modules import OutputFeatureNorm
from flexi_export.plan import BlockEntry, BlockPlan

ADAPTER_INITS: tuple[str, ...] = ("svd", "zero")
OFN_INITS: tuple[str, ...] = ("fit", "rms")


def _replacements(plan: BlockPlan) -> list[tuple[int, BlockEntry]]:
    """``(executed index, entry)`` of every replacement block (shared, not inserted)."""
    return [(b.index, b.entry) for b in plan.executed() if b.entry.kind == "shared" and b.entry.replaces is not None]


@torch.no_grad()
def svd_adapter_init(
    source: nn.Module, plan: BlockPlan, exact_max_dim: int = EXACT_SVD_MAX_DIM, progress: bool = True
) -> dict[str, torch.Tensor]:
    """``lora_A`` / ``lora_B`` of every replacement block from the truncated SVD of ``W_i - W_j``."""
    layout = layout_for(source.config.model_type)
    layers = get_module(source, layout.layers)
    out: dict[str, torch.Tensor] = {}
    work = [
        (index, entry, role)
        for index, entry in _replacements(plan)
        if entry.adapter is not None
        for role in entry.adapter.targets
    ]
    for index, entry, role in tqdm(work, desc="SVD adapter init", disable=not progress, leave=False):
        adapter = entry.adapter
        assert adapter is not None
        path = layout.linears[role]
        w_i = get_module(layers[entry.replaces], path).weight
        w_j = get_module(layers[entry.source], path).weight
        svd = truncated_svd(w_i.float() - w_j.float(), adapter.rank, exact_max_dim)
        root = svd.S.sqrt() / math.sqrt(adapter.scaling)
        prefix = f"{layout.layers}.{index}.{path}"
        out[f"{prefix}.lora_B.weight"] = (svd.U * root[None, :]).to(w_i.dtype).contiguous()
        out[f"{prefix}.lora_A.weight"] = (root[:, None] * svd.Vh).to(w_i.dtype).contiguous()
    return out


class _BranchStats:
    """Per-channel sums ``sum o n``, ``sum n n``, ``sum o o`` for one branch output of one replacement."""

    def __init__(
        self, base: nn.Linear, adapter: tuple[torch.Tensor, torch.Tensor] | None, scaling: float, norm: nn.Module
    ) -> None:
        self.base = base
        self.adapter = adapter  # (A, B) of the replacement, or None when B starts at zero
        self.scaling = scaling
        self.norm = norm
        dim = base.out_features
        self.on = torch.zeros(dim, dtype=torch.float64, device=base.weight.device)
        self.nn = torch.zeros_like(self.on)
        self.oo = torch.zeros_like(self.on)

    def hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        x = args[0]
        y = nn.functional.linear(x, self.base.weight, self.base.bias)
        if self.adapter is not None:
            lora_a, lora_b = self.adapter
            y = y + self.scaling * (x @ lora_a.T.to(x.dtype)) @ lora_b.T.to(x.dtype)
        n = self.norm(y).double().reshape(-1, y.shape[-1])
        o = output.double().reshape(-1, output.shape[-1])
        self.on += (o * n).sum(0)
        self.nn += (n * n).sum(0)
        self.oo += (o * o).sum(0)

    def gamma(self, estimator: str) -> torch.Tensor:
        denominator = self.nn.clamp_min(1e-12)
        if estimator == "fit":
            return (self.on / denominator).float()
        return (self.oo / denominator).sqrt().float()


@torch.no_grad()
def ofn_gamma_init(
    source: nn.Module,
    plan: BlockPlan,
    adapters: dict[str, torch.Tensor],
    input_ids: torch.Tensor,
    estimator: str = "fit",
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """OFN gammas of every replacement block with OFN, from calibration rows ``input_ids`` (see module doc)."""
    if estimator not in OFN_INITS:
        raise CompressError(f"--ofn-init must be one of {', '.join(OFN_INITS)}, got {estimator!r}")
    layout = layout_for(source.config.model_type)
    layers = get_module(source, layout.layers)
    eps = float(source.config.rms_norm_eps)
    stats: dict[str, _BranchStats] = {}
    handles = []
    for index, entry in _replacements(plan):
        if entry.ofn == "none":
            continue
        scaling = entry.adapter.scaling if entry.adapter is not None else 1.0
        for role in layout.branch_outputs:
            path = layout.linears[role]
            prefix = f"{layout.layers}.{index}.{path}"
            base = get_module(layers[entry.source], path)
            lora_a, lora_b = adapters.get(f"{prefix}.lora_A.weight"), adapters.get(f"{prefix}.lora_B.weight")
            pair = (lora_a, lora_b) if lora_a is not None and lora_b is not None else None
            norm = OutputFeatureNorm(base.out_features, entry.ofn, eps, torch.ones(base.out_features))
            branch = _BranchStats(base, pair, scaling, norm.to(base.weight.device))
            stats[f"{prefix}.ofn.weight"] = branch
            handles.append(get_module(layers[entry.replaces], path).register_forward_hook(branch.hook))
    if not stats:
        return {}
    try:
        _run(source, input_ids, batch_size, progress, "OFN statistics")
    finally:
        for handle in handles:
            handle.remove()
    return {name: branch.gamma(estimator) for name, branch in stats.items()}


def _run(model: nn.Module, input_ids: torch.Tensor, batch_size: int, progress: bool, desc: str) -> None:
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, input_ids.shape[0], batch_size), desc=desc, disable=not progress, leave=False):
            model(input_ids=input_ids[start : start + batch_size].to(device), use_cache=False)
    finally:
        model.train(was_training)


def initial_values(
    source: nn.Module,
    plan: BlockPlan,
    calibration: torch.Tensor,
    adapter_init: str = "svd",
    ofn_init: str = "fit",
    exact_max_dim: int = EXACT_SVD_MAX_DIM,
    progress: bool = True,
    batch_size: int = 8,
    log: Callable[[str], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Every computed initial tensor of the replacement blocks, keyed by Flexi parameter name."""
    if adapter_init not in ADAPTER_INITS:
        raise CompressError(f"--init must be one of {', '.join(ADAPTER_INITS)}, got {adapter_init!r}")
    adapters = svd_adapter_init(source, plan, exact_max_dim, progress) if adapter_init == "svd" else {}
    gammas = ofn_gamma_init(source, plan, adapters, calibration, ofn_init, batch_size, progress)
    if log is not None:
        log(f"initialised {len(adapters) // 2} adapters ({adapter_init}) and {len(gammas)} OFN gammas ({ofn_init})")
    return {**adapters, **gammas}
