"""Human views of a plan (tables for the CLI and reports)."""

from __future__ import annotations

from flexi_export.plan import BlockPlan
from flexi_export.table import text_table


def plan_rows(plan: BlockPlan) -> list[tuple[str, ...]]:
    """One row per entry: executed index (or -), kind, source, replaces, adapter rank, norms, OFN."""
    rows = []
    index = 0
    for entry in plan.entries:
        position = "-"
        if entry.executes:
            position = str(index)
            index += 1
        shared = entry.kind == "shared"
        rows.append(
            (
                position,
                entry.kind if not entry.inserted else "shared (inserted)",
                str(entry.source),
                "" if not shared else ("-" if entry.replaces is None else str(entry.replaces)),
                "" if not shared or entry.adapter is None else str(entry.adapter.rank),
                "" if not shared else entry.norms,
                "" if not shared else entry.ofn,
            )
        )
    return rows


def plan_table(plan: BlockPlan) -> str:
    """The plan as a fixed-width table."""
    headers = ("exec", "kind", "source", "replaces", "rank", "norms", "ofn")
    return text_table(headers, plan_rows(plan))
