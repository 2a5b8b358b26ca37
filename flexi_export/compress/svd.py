"""Truncated SVD of weight differences: exact for small matrices, randomised for large ones."""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Matrices whose smaller side is at most this are decomposed exactly (``torch.linalg.svd``, fp64); larger ones
#: with the randomised low-rank SVD (``torch.svd_lowrank``, Halko et al.), whose cost grows with the rank only.
EXACT_SVD_MAX_DIM = 1024
#: Extra columns and power iterations of the randomised SVD (accuracy of the top-``r`` subspace).
OVERSAMPLE = 8
POWER_ITERATIONS = 4


@dataclass(frozen=True)
class TruncatedSVD:
    """``D ~= U diag(S) Vh`` with the ``rank`` largest singular values, plus ``||D||_F^2``."""

    U: torch.Tensor  # [out, r]
    S: torch.Tensor  # [r]
    Vh: torch.Tensor  # [r, in]
    total_energy: float

    @property
    def tail_energy(self) -> float:
        """``||D - SVD_r(D)||_F^2 = ||D||_F^2 - sum_{k<=r} s_k^2`` (never below 0)."""
        return max(self.total_energy - float(self.S.double().pow(2).sum()), 0.0)


def truncated_svd(
    matrix: torch.Tensor, rank: int, exact_max_dim: int = EXACT_SVD_MAX_DIM, seed: int = 0
) -> TruncatedSVD:
    """The ``rank`` leading singular triplets of ``matrix`` (on its own device).

    Exact when ``min(matrix.shape) <= exact_max_dim``; otherwise randomised with :data:`OVERSAMPLE` extra columns
    and :data:`POWER_ITERATIONS` power iterations, seeded so that the result is reproducible.
    """
    smaller = min(matrix.shape)
    if not 0 < rank <= smaller:
        raise ValueError(f"rank {rank} is outside 1..{smaller} for a {tuple(matrix.shape)} matrix")
    total = float(matrix.double().pow(2).sum())
    if smaller <= exact_max_dim:
        U, S, Vh = torch.linalg.svd(matrix.double(), full_matrices=False)
        return TruncatedSVD(
            U[:, :rank].float().contiguous(), S[:rank].float().contiguous(), Vh[:rank].float().contiguous(), total
        )
    q = min(rank + OVERSAMPLE, smaller)
    devices = [matrix.device] if matrix.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # svd_lowrank draws from the global RNG: keep it reproducible
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(matrix.float(), q=q, niter=POWER_ITERATIONS)
    return TruncatedSVD(U[:, :rank].contiguous(), S[:rank].contiguous(), V[:, :rank].T.contiguous(), total)
