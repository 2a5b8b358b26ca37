"""Replacement choice: the SVD-residual distance, the strategies and the reuse cap."""

from __future__ import annotations

import pytest
import torch

from flexi_export.compress.choose import (
    block_matrices,
    choose_sources,
    distance_matrix,
    svd_residual_distance,
)
from flexi_export.compress.svd import truncated_svd
from flexi_export.errors import CompressError
from flexi_export.plan import LINEAR_ROLES
from tests.helpers import tiny_model


def _hand_distance(model, i, j, rank):
    total = 0.0
    wi, wj = block_matrices(model, i), block_matrices(model, j)
    for role in LINEAR_ROLES:
        s = torch.linalg.svdvals((wi[role] - wj[role]).double())
        total += float(s[rank:].pow(2).sum() / wi[role].double().pow(2).sum())
    return total


def test_distance_is_the_normalised_tail_energy_of_the_difference():
    model = tiny_model("llama")
    got = distance_matrix(model, [4], [0, 2], rank=3, targets=LINEAR_ROLES, progress=False)
    assert got[4][0] == pytest.approx(_hand_distance(model, 4, 0, 3), rel=1e-6)
    assert got[4][2] == pytest.approx(_hand_distance(model, 4, 2, 3), rel=1e-6)


def test_a_matrix_without_adapter_counts_its_whole_difference():
    model = tiny_model("llama")
    wi, wj = block_matrices(model, 3), block_matrices(model, 1)
    with_all = svd_residual_distance(wi, wj, 2, LINEAR_ROLES)
    without_q = svd_residual_distance(wi, wj, 2, [r for r in LINEAR_ROLES if r != "q_proj"])
    q_full = float((wi["q_proj"] - wj["q_proj"]).double().pow(2).sum() / wi["q_proj"].double().pow(2).sum())
    q_tail = float(torch.linalg.svdvals((wi["q_proj"] - wj["q_proj"]).double())[2:].pow(2).sum())
    q_tail /= float(wi["q_proj"].double().pow(2).sum())
    assert without_q - with_all == pytest.approx(q_full - q_tail, rel=1e-5)


def test_svd_residual_finds_the_block_a_low_rank_adapter_can_reach():
    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # block 4 := block 1 + a rank-2 change on every matrix
        for role, w4 in block_matrices(model, 4).items():
            w1 = block_matrices(model, 1)[role]
            w4.copy_(w1 + torch.randn(w1.shape[0], 2, generator=gen) @ torch.randn(2, w1.shape[1], generator=gen))
    d = distance_matrix(model, [4], [0, 1, 2, 3, 5], rank=2, targets=LINEAR_ROLES, progress=False)
    assert d[4][1] == pytest.approx(0.0, abs=1e-6)  # fp32 rounding of the difference
    assert min(v for j, v in d[4].items() if j != 1) > 0.1
    assert choose_sources([4], [0, 1, 2, 3, 5], "svd-residual", d) == {4: 1}


def test_randomised_svd_matches_exact_on_large_matrices():
    gen = torch.Generator().manual_seed(0)
    matrix = torch.randn(200, 8, generator=gen) @ torch.randn(8, 150, generator=gen)
    matrix += 0.01 * torch.randn(200, 150, generator=gen)
    exact = truncated_svd(matrix, 6, exact_max_dim=1024)
    randomised = truncated_svd(matrix, 6, exact_max_dim=10)
    assert torch.allclose(exact.S, randomised.S, rtol=1e-4)
    assert randomised.tail_energy == pytest.approx(exact.tail_energy, rel=1e-2)
    again = truncated_svd(matrix, 6, exact_max_dim=10)
    assert torch.equal(again.U, randomised.U)  # seeded: reproducible


def test_strategies_previous_and_nearest():
    pruned, kept = [0, 3, 4], [1, 2, 5]
    assert choose_sources(pruned, kept, "previous") == {0: 1, 3: 2, 4: 2}
    assert choose_sources(pruned, kept, "nearest") == {0: 1, 3: 2, 4: 5}


def test_max_reuse_caps_each_source():
    distances = {3: {0: 0.1, 1: 0.5}, 4: {0: 0.2, 1: 0.6}, 5: {0: 0.3, 1: 0.4}}
    assert choose_sources([3, 4, 5], [0, 1], "svd-residual", distances) == {3: 0, 4: 0, 5: 0}
    capped = choose_sources([3, 4, 5], [0, 1], "svd-residual", distances, max_reuse=2)
    assert capped == {3: 0, 4: 0, 5: 1}
    assert max(list(capped.values()).count(j) for j in (0, 1)) <= 2
    with pytest.raises(CompressError, match="--max-reuse 1 is unreachable"):
        choose_sources([3, 4, 5], [0, 1], "svd-residual", distances, max_reuse=1)
    with pytest.raises(CompressError, match="unknown replacement choice"):
        choose_sources([3], [0], "closest")
