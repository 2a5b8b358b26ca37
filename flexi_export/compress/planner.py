"""make_plan: which blocks to prune (lowest Block Influence first) and what replaces them.

The number of pruned blocks is the smallest that brings the *stored* parameters of the Flexi model (adapters,
own norms and OFN gammas of the replacement blocks included) to the target compression ratio, ``1 - stored /
dense`` with both counts from :mod:`flexi_export.stats` (embeddings and LM head included); or exactly
``num_blocks``. ``method="shortgpt"`` removes the very same blocks instead of replacing them (the baseline), so
the two methods differ only in what stands in for a pruned block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from flexi_export.compress.choose import CHOICES, Distances, choose_sources
from flexi_export.errors import CompressError
from flexi_export.layouts import ModelDims
from flexi_export.plan import (
    LINEAR_ROLES,
    OFN_VARIANTS,
    AdapterSpec,
    BlockEntry,
    BlockPlan,
    SourceInfo,
    original,
    removed,
    shared,
)
from flexi_export.stats import dense_parameters, linear_shapes, plan_parameters

METHODS: tuple[str, ...] = ("flexi", "shortgpt")


@dataclass(frozen=True)
class PlanOptions:
    """What to prune and how to replace it (the ``compress`` options that shape the plan)."""

    method: str = "flexi"
    #: Target stored-parameter compression ``1 - stored / dense``, in (0, 1). Exclusive with ``num_blocks``.
    ratio: float | None = None
    num_blocks: int | None = None
    rank: int = 8
    alpha: float | None = None
    targets: tuple[str, ...] = LINEAR_ROLES
    ofn: str = "none"
    norms: str = "own"
    choice: str = "svd-residual"
    max_reuse: int | None = None

    def adapter(self) -> AdapterSpec:
        """The adapter spec of every replacement block."""
        return AdapterSpec(rank=self.rank, alpha=self.alpha, targets=tuple(self.targets))

    def check(self, dims: ModelDims) -> None:
        """Raise :class:`CompressError` for options that cannot work on a model with ``dims``."""
        if self.method not in METHODS:
            raise CompressError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if (self.ratio is None) == (self.num_blocks is None):
            raise CompressError("give exactly one of --ratio and --num-blocks")
        if self.ratio is not None and not 0.0 < self.ratio < 1.0:
            raise CompressError(f"--ratio must be strictly between 0 and 1, got {self.ratio}")
        if dims.num_blocks < 2:
            raise CompressError(f"the model has {dims.num_blocks} block; pruning needs at least 2 (one must stay)")
        if self.num_blocks is not None and not 1 <= self.num_blocks <= dims.num_blocks - 1:
            raise CompressError(
                f"--num-blocks {self.num_blocks} is impossible: the model has {dims.num_blocks} blocks, so "
                f"between 1 and {dims.num_blocks - 1} can be pruned (at least one block must stay)"
            )
        if self.method == "flexi":
            problems = self.adapter().problems()
            if problems:
                raise CompressError("; ".join(problems))
            check_rank(self.rank, self.targets, dims)
            if self.ofn not in OFN_VARIANTS:
                raise CompressError(f"--ofn must be one of {', '.join(OFN_VARIANTS)}, got {self.ofn!r}")
            if self.choice not in CHOICES:
                raise CompressError(f"--choice must be one of {', '.join(CHOICES)}, got {self.choice!r}")


def check_rank(rank: int, targets: Sequence[str], dims: ModelDims) -> None:
    """Raise :class:`CompressError` when ``rank`` exceeds the smaller side of a targeted matrix."""
    shapes = linear_shapes(dims)
    limit = min(min(shapes[t]) for t in targets)
    if rank > limit:
        worst = min(targets, key=lambda t: min(shapes[t]))
        raise CompressError(
            f"--rank {rank} is larger than the matrices allow: {worst} is {shapes[worst][1]}x{shapes[worst][0]}, "
            f"so the rank can be at most {limit}"
        )


@dataclass(frozen=True)
class PlanResult:
    """A plan plus the numbers the report needs."""

    plan: BlockPlan
    pruned: tuple[int, ...]
    sources: dict[int, int]
    ratio: float
    stored_parameters: int
    dense_parameters: int
    distances: dict[int, dict[int, float]] = field(default_factory=dict)


def compression_ratio(plan: BlockPlan, dims: ModelDims) -> float:
    """``1 - stored / dense`` parameters (negative for an extended model)."""
    return 1.0 - plan_parameters(plan, dims) / dense_parameters(dims)


def prune_order(scores: Sequence[float]) -> list[int]:
    """Blocks from the least to the most influential (ties: the earlier block first)."""
    return sorted(range(len(scores)), key=lambda i: (scores[i], i))


def _entries(num: int, pruned: set[int], options: PlanOptions, sources: dict[int, int]) -> tuple[BlockEntry, ...]:
    out = []
    for i in range(num):
        if i not in pruned:
            out.append(original(i))
        elif options.method == "shortgpt":
            out.append(removed(i))
        else:
            entry = shared(sources[i], replaces=i, adapter=options.adapter(), ofn=options.ofn)
            out.append(replace(entry, norms=options.norms))
    return tuple(out)


def blocks_to_prune(scores: Sequence[float], dims: ModelDims, options: PlanOptions, info: SourceInfo) -> int:
    """How many of the lowest-BI blocks to prune to reach ``options.ratio`` (Flexi accounting for both methods)."""
    if options.num_blocks is not None:
        return options.num_blocks
    assert options.ratio is not None
    sizing = replace(options, method="flexi")
    order = prune_order(scores)
    best = 0.0
    for k in range(1, dims.num_blocks):
        pruned = set(order[:k])
        keep = order[k]  # any kept source will do: a replacement's own parameters do not depend on it
        plan = BlockPlan(info, _entries(dims.num_blocks, pruned, sizing, dict.fromkeys(pruned, keep)))
        best = compression_ratio(plan, dims)
        if best >= options.ratio:
            return k
    raise CompressError(
        f"--ratio {options.ratio} is unreachable: replacing {dims.num_blocks - 1} of {dims.num_blocks} blocks "
        f"(rank {options.rank} adapters, norms and OFN included) reaches only {best:.4f}; the embeddings and LM "
        "head are never pruned (lower --ratio or --rank)"
    )


def make_plan(
    info: SourceInfo,
    dims: ModelDims,
    scores: Sequence[float],
    options: PlanOptions,
    distances_fn: Callable[[Sequence[int], Sequence[int]], Distances] | None = None,
    provenance: dict[str, Any] | None = None,
) -> PlanResult:
    """The compression plan for a source with ``dims`` and Block Influence ``scores``.

    ``distances_fn(pruned, kept)`` computes the replacement distance matrix (needed by ``method="flexi"``; it is
    stored in the plan's provenance whatever the ``choice``, so the choice can be reviewed).
    """
    options.check(dims)
    if len(scores) != dims.num_blocks:
        raise CompressError(f"{len(scores)} block scores for a model with {dims.num_blocks} blocks")
    k = blocks_to_prune(scores, dims, options, info)
    pruned = sorted(prune_order(scores)[:k])
    kept = [i for i in range(dims.num_blocks) if i not in pruned]
    distances: dict[int, dict[int, float]] = {}
    sources: dict[int, int] = {}
    if options.method == "flexi":
        if distances_fn is None:
            raise ValueError("method 'flexi' needs distances_fn")
        distances = {i: dict(row) for i, row in distances_fn(pruned, kept).items()}
        sources = choose_sources(pruned, kept, options.choice, distances, options.max_reuse)
    plan = BlockPlan(info, _entries(dims.num_blocks, set(pruned), options, sources)).validate()
    ratio = compression_ratio(plan, dims)
    record = _record(plan, dims, scores, options, pruned, kept, sources, distances)
    return PlanResult(
        plan=plan.with_provenance(**{**(provenance or {}), **record}),
        pruned=tuple(pruned),
        sources=sources,
        ratio=ratio,
        stored_parameters=plan_parameters(plan, dims),
        dense_parameters=dense_parameters(dims),
        distances=distances,
    )


def _record(
    plan: BlockPlan,
    dims: ModelDims,
    scores: Sequence[float],
    options: PlanOptions,
    pruned: list[int],
    kept: list[int],
    sources: dict[int, int],
    distances: dict[int, dict[int, float]],
) -> dict[str, Any]:
    """The plan's provenance: scores, pruning, ratio and (for Flexi) sources and the distance matrix."""
    record: dict[str, Any] = {
        "method": options.method,
        "block_influence": list(scores),
        "prune_order": prune_order(scores),
        "pruned": pruned,
        "target_ratio": options.ratio,
        "target_num_blocks": options.num_blocks,
        "achieved_ratio": compression_ratio(plan, dims),
        "stored_parameters": plan_parameters(plan, dims),
        "dense_parameters": dense_parameters(dims),
    }
    if options.method == "flexi":
        record.update(
            choice=options.choice,
            max_reuse=options.max_reuse,
            sources={str(i): j for i, j in sources.items()},
            source_distances={str(i): distances[i][j] for i, j in sources.items()},
            distance_matrix={
                "pruned": pruned,
                "kept": kept,
                "values": [[distances[i][j] for j in kept] for i in pruned],
            },
        )
    return record
