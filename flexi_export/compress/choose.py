"""Which kept block replaces each pruned block.

Strategies (``--choice``):

- ``svd-residual`` (FlexiGPT-style): ``d(i, j) = sum_m ||D_m - SVD_r(D_m)||_F^2 / ||W_i^m||_F^2`` with
  ``D_m = W_i^m - W_j^m`` over the block matrices ``m`` (q, k, v, o, gate, up, down): the share of block ``i``'s
  weight energy that ``W_j`` plus a rank-``r`` adapter cannot recover at initialisation. A matrix without an
  adapter counts its whole difference. Pick ``argmin_j d(i, j)`` over kept blocks.
- ``previous``: the nearest kept block before ``i`` (after it when none is before).
- ``nearest``: the kept block closest in depth (the earlier one on a tie).

``max_reuse`` caps how many pruned blocks may share one source; the assignment is then greedy over all
(pruned, kept) pairs from the most to the least preferred, which is the plain argmin when there is no cap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from flexi_export.compress.svd import EXACT_SVD_MAX_DIM, truncated_svd
from flexi_export.errors import CompressError
from flexi_export.layouts import layout_for
from flexi_export.model.build import get_module

CHOICES: tuple[str, ...] = ("svd-residual", "previous", "nearest")

#: ``distances[i][j]`` for pruned ``i`` and kept ``j``.
Distances = Mapping[int, Mapping[int, float]]


def block_matrices(model: nn.Module, block: int) -> dict[str, torch.Tensor]:
    """Role -> weight ``[out, in]`` of source block ``block`` (no copies)."""
    layout = layout_for(model.config.model_type)
    layer = get_module(model, layout.layers)[block]
    return {role: get_module(layer, path).weight.detach() for role, path in layout.linears.items()}


def svd_residual_distance(
    pruned: Mapping[str, torch.Tensor],
    candidate: Mapping[str, torch.Tensor],
    rank: int,
    targets: Sequence[str],
    exact_max_dim: int = EXACT_SVD_MAX_DIM,
) -> float:
    """``sum_m ||D_m - SVD_r(D_m)||^2 / ||W_i^m||^2`` over the roles of ``pruned`` (see the module docstring)."""
    total = 0.0
    for role, w_i in pruned.items():
        diff = w_i.float() - candidate[role].float()
        norm = float(w_i.double().pow(2).sum()) or 1.0  # an all-zero matrix: its difference counts as is
        if role in targets:
            residual = truncated_svd(diff, rank, exact_max_dim).tail_energy
        else:
            residual = float(diff.double().pow(2).sum())
        total += residual / norm
    return total


def distance_matrix(
    model: nn.Module,
    pruned: Sequence[int],
    kept: Sequence[int],
    rank: int,
    targets: Sequence[str],
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict[int, dict[int, float]]:
    """``d(i, j)`` for every pruned ``i`` and kept ``j`` (SVDs run on ``device``, the model's by default).

    Only two blocks' matrices are on ``device`` at a time, so a model kept in host memory never has to fit it.
    """
    out: dict[int, dict[int, float]] = {}

    def matrices(block: int) -> dict[str, torch.Tensor]:
        return {k: v.to(device) if device is not None else v for k, v in block_matrices(model, block).items()}

    bar = tqdm(total=len(pruned) * len(kept), desc="replacement distances", disable=not progress, leave=False)
    with bar, torch.no_grad():
        for i in pruned:
            w_i = matrices(i)
            out[i] = {}
            for j in kept:
                out[i][j] = svd_residual_distance(w_i, matrices(j), rank, targets)
                bar.update(1)
    return out


def _preference(strategy: str, i: int, j: int, distances: Distances | None) -> tuple[float, ...]:
    if strategy == "svd-residual":
        assert distances is not None
        return (distances[i][j], abs(i - j), j)
    if strategy == "previous":
        return (0 if j < i else 1, abs(i - j), j)
    if strategy == "nearest":
        return (abs(i - j), j)
    raise CompressError(f"unknown replacement choice {strategy!r}; choose one of {', '.join(CHOICES)}")


def choose_sources(
    pruned: Sequence[int],
    kept: Sequence[int],
    strategy: str = "svd-residual",
    distances: Distances | None = None,
    max_reuse: int | None = None,
) -> dict[int, int]:
    """Map each pruned block to the kept block whose weights it will share."""
    if strategy not in CHOICES:
        raise CompressError(f"unknown replacement choice {strategy!r}; choose one of {', '.join(CHOICES)}")
    if strategy == "svd-residual" and distances is None:
        raise ValueError("the svd-residual choice needs the distance matrix")
    if not kept:
        raise CompressError("no kept block is left to share weights from")
    if max_reuse is not None:
        if max_reuse < 1:
            raise CompressError(f"--max-reuse must be at least 1, got {max_reuse}")
        if max_reuse * len(kept) < len(pruned):
            raise CompressError(
                f"--max-reuse {max_reuse} is unreachable: {len(pruned)} pruned blocks cannot be spread over "
                f"{len(kept)} kept blocks with at most {max_reuse} each"
            )
    pairs = sorted((_preference(strategy, i, j, distances), i, j) for i in pruned for j in kept)
    uses = dict.fromkeys(kept, 0)
    chosen: dict[int, int] = {}
    for _, i, j in pairs:
        if i in chosen or (max_reuse is not None and uses[j] >= max_reuse):
            continue
        chosen[i] = j
        uses[j] += 1
    return dict(sorted(chosen.items()))
