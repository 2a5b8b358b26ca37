"""The compression report: ``compress_report.json`` (machine-readable) and ``compress_report.md`` (for people)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from flexi_export.plan import BlockPlan

REPORT_FORMAT = "flexi-compress-report/1"
JSON_NAME = "compress_report.json"
MARKDOWN_NAME = "compress_report.md"


def block_rows(plan: BlockPlan) -> list[dict[str, Any]]:
    """One row per source block: its BI, fate (kept / replaced / removed) and, when replaced, source and distance."""
    prov = plan.provenance
    scores = prov.get("block_influence") or [None] * plan.source.num_blocks
    sources = {int(k): v for k, v in (prov.get("sources") or {}).items()}
    distances = {int(k): v for k, v in (prov.get("source_distances") or {}).items()}
    fate = {}
    for entry in plan.entries:
        if entry.kind == "original":
            fate[entry.source] = "kept"
        elif entry.kind == "removed":
            fate[entry.source] = "removed"
        elif entry.replaces is not None:
            fate[entry.replaces] = "replaced"
    return [
        {
            "block": i,
            "block_influence": scores[i],
            "fate": fate.get(i, "kept"),
            "source": sources.get(i),
            "distance": distances.get(i),
        }
        for i in range(plan.source.num_blocks)
    ]


def build_report(
    model: str,
    plan: BlockPlan,
    evaluations: dict[str, dict[str, Any] | None],
    recovery: dict[str, Any],
    timings: dict[str, float],
    data: dict[str, Any],
    settings: dict[str, Any],
) -> dict[str, Any]:
    """Assemble the JSON report (see docs/compress.md for the fields)."""
    prov = plan.provenance
    return {
        "format": REPORT_FORMAT,
        "model": model,
        "method": prov.get("method", "extend"),
        "plan_fingerprint": plan.fingerprint(),
        "blocks": block_rows(plan),
        "pruned": list(prov.get("pruned") or []),
        "extended_after": list(prov.get("extended_after") or []),
        "ratio": {
            "target": prov.get("target_ratio"),
            "target_num_blocks": prov.get("target_num_blocks"),
            "achieved": prov.get("achieved_ratio"),
            "stored_parameters": prov.get("stored_parameters"),
            "dense_parameters": prov.get("dense_parameters"),
        },
        "evaluation": evaluations,
        "recovery": recovery,
        "timings_s": timings,
        "data": data,
        "settings": settings,
    }


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown."""
    ratio = report["ratio"]
    lines = [
        f"# Compression report: {report['model']}",
        "",
        f"- method: **{report['method']}**, plan fingerprint `{report['plan_fingerprint'][:16]}`",
        f"- stored parameters: {ratio['stored_parameters']:,} of {ratio['dense_parameters']:,} dense "
        f"(achieved ratio **{_fmt(ratio['achieved'], 6)}**, target {_fmt(ratio['target'])})",
        f"- pruned blocks: {report['pruned'] or 'none'}; inserted after: {report['extended_after'] or 'none'}",
        f"- data: {report['data'].get('name')} ({report['data'].get('train_documents')} training documents, "
        f"{report['data'].get('heldout_documents')} held out), sequences of {report['data'].get('seq_len')} tokens",
        "",
        "| block | BI | fate | source | distance |",
        "|---:|---:|---|---:|---:|",
    ]
    for row in report["blocks"]:
        lines.append(
            f"| {row['block']} | {_fmt(row['block_influence'])} | {row['fate']} | {_fmt(row['source'])} "
            f"| {_fmt(row['distance'])} |"
        )
    lines += ["", "| model | held-out perplexity | mean token loss | tokens |", "|---|---:|---:|---:|"]
    for name, result in report["evaluation"].items():
        if result is not None:
            lines.append(
                f"| {name} | {_fmt(result['perplexity'], 3)} | {_fmt(result['mean_loss'])} | {result['tokens']:,} |"
            )
    rec = report["recovery"]
    lines += [
        "",
        f"Recovery: {rec.get('steps', 0)} steps, {rec.get('tokens', 0):,} tokens in {_fmt(rec.get('seconds'), 1)} s "
        f"({_fmt(rec.get('tokens_per_second'), 0)} tokens/s), final loss {_fmt(rec.get('final_loss'))}.",
        "",
        "Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report["timings_s"].items()),
        "",
    ]
    return "\n".join(lines)


def write_report(folder: str | Path, report: dict[str, Any]) -> None:
    """Write both report files into ``folder`` (the caller makes the folder atomic)."""
    folder = Path(folder)
    (folder / JSON_NAME).write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    (folder / MARKDOWN_NAME).write_text(render_markdown(report))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename (all-or-nothing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
