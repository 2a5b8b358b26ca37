"""Model extension: insert weight-shared blocks that start as the identity.

``--extend 3,5`` inserts, right after kept block 3 and after kept block 5, a ``shared(source=3 | 5,
replaces=None)`` block: it runs the source block's matrices plus its own adapters, norms and OFN. Both of its
branch outputs go through OFN with ``gamma = 0`` (``build_flexi``'s default for an inserted block), so each
branch adds exactly zero to the residual stream and the extended model's logits equal the original's at step
0; recovery training then teaches the new adapters and gammas. Because the identity start relies on OFN, an
inserted block always has OFN (``rms`` when the run has ``--ofn none``).
"""

from __future__ import annotations

from collections.abc import Sequence

from flexi_export.errors import CompressError
from flexi_export.plan import AdapterSpec, BlockPlan, shared


def parse_blocks(text: str) -> list[int]:
    """``"3,5"`` -> ``[3, 5]`` (a clear error for anything else)."""
    try:
        blocks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CompressError(f"--extend takes comma-separated block numbers such as 3,5; got {text!r}") from None
    if not blocks:
        raise CompressError("--extend needs at least one block number")
    return blocks


def extend_plan(plan: BlockPlan, after: Sequence[int], adapter: AdapterSpec, ofn: str = "rms") -> BlockPlan:
    """``plan`` with a new shared block inserted after each kept source block in ``after`` (repeats allowed)."""
    if ofn == "none":
        raise CompressError("an inserted block starts as the identity through OFN gamma = 0, so it needs OFN")
    n = plan.source.num_blocks
    kept = {e.source for e in plan.entries if e.kind == "original"}
    for block in after:
        if not 0 <= block < n:
            raise CompressError(f"--extend: block {block} does not exist (the model has blocks 0..{n - 1})")
        if block not in kept:
            raise CompressError(f"--extend: block {block} is pruned by this plan; insert after a kept block")
    entries = []
    for entry in plan.entries:
        entries.append(entry)
        if entry.kind == "original":
            entries.extend(
                shared(entry.source, replaces=None, adapter=adapter, ofn=ofn) for b in after if b == entry.source
            )
    extended = BlockPlan(plan.source, tuple(entries), plan.provenance).validate()
    return extended.with_provenance(extended_after=sorted(after), inserted_blocks=len(after))
