"""Write a :class:`~flexi_export.verify.run.VerificationReport` as JSON, Markdown and a PNG chart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flexi_export.table import markdown_table
from flexi_export.verify.run import VerificationReport
from flexi_export.verify.structure import CheckResult

MiB = 1 << 20
_PHASES = ("after_load", "after_prefill", "after_decode")


def status(check: CheckResult) -> str:
    """PASS, FAIL or SKIP."""
    if check.skipped:
        return "SKIP"
    return "PASS" if check.passed else "FAIL"


def failure_lines(report: VerificationReport) -> list[str]:
    """One line per problem: the check, the measured value and bound (in the problem text), what to try."""
    lines = []
    for check in report.failures:
        for problem in check.problems:
            lines.append(f"FAIL {check.name}: {problem}" + (f" -- try: {check.hint}" if check.hint else ""))
    return lines


def memory_rows(report: VerificationReport) -> list[list[str]]:
    """One row per (bundle, session options): increases over the baseline, in MiB, plus weight PSS and speed."""
    rows = []
    for label, modes in report.memory.items():
        for mode, p in modes.items():
            if p.get("skipped"):
                rows.append([label, mode, p["skipped"], "", "", "", "", "", ""])
                continue
            base, end = p["baseline"], p["after_decode"]
            rows.append(
                [
                    label,
                    mode,
                    f"{(end['VmHWM'] - base['VmRSS']) / MiB:.1f}",
                    f"{(p['after_load']['RssAnon'] - base['RssAnon']) / MiB:.1f}",
                    f"{(end['RssAnon'] - base['RssAnon']) / MiB:.1f}",
                    f"{(end['RssFile'] - base['RssFile']) / MiB:.1f}",
                    f"{(end['Pss'] - base['Pss']) / MiB:.1f}",
                    f"{end['weights']['pss'] / MiB:.1f}",
                    f"{p['decode_ms_per_token']:.1f}",
                ]
            )
    return rows


MEMORY_HEADERS = [
    "bundle",
    "session options",
    "peak +MiB",
    "anon after load +MiB",
    "anon after decode +MiB",
    "file-backed +MiB",
    "PSS +MiB",
    "weight PSS MiB",
    "decode ms/token",
]


def markdown(report: VerificationReport) -> str:
    """The report as Markdown: verdict, checks, memory table, failures with what to try."""
    m = report.manifest
    totals = m["totals"]
    lines = [
        f"# Verification of `{report.bundle}`",
        "",
        f"**{'PASSED' if report.passed else 'FAILED'}** in {report.seconds:.0f} s. dtype {m['dtype']}, "
        f"{'dense' if m.get('dense') else 'shared'} export, plan {str(m.get('plan_fingerprint'))[:16]}; "
        f"parity against {report.against or 'reference.npz'}.",
        "",
        f"Data file {totals['data_file_bytes'] / MiB:.2f} MiB; unique weights "
        f"{totals['unique_weight_bytes'] / MiB:.2f} MiB; "
        f"without sharing {totals['bytes_without_sharing'] / MiB:.2f} MiB.",
        "",
        "## Checks",
        "",
        markdown_table(
            ["check", "result", "figures / reason"], [[c.name, status(c), _figures(c)] for c in report.checks]
        ),
    ]
    if report.memory:
        lines += ["", "## Memory (increase over the process baseline taken just before the session)", ""]
        lines += [markdown_table(MEMORY_HEADERS, memory_rows(report))]
    fails = failure_lines(report)
    if fails:
        lines += ["", "## Failures", "", *(f"- {line}" for line in fails)]
    return "\n".join(lines) + "\n"


def _figures(check: CheckResult) -> str:
    if check.skipped:
        return check.skipped
    parts = []
    for key, value in check.figures.items():
        if isinstance(value, float):
            parts.append(f"{key} {value:.3g}")
        elif isinstance(value, int) and value > 1 << 16:
            parts.append(f"{key} {value / MiB:.2f} MiB")
        elif not isinstance(value, dict):
            parts.append(f"{key} {value}")
    return ", ".join(parts)


def chart(report: VerificationReport, path: Path) -> Path | None:
    """Bar chart (MiB) of file bytes, unique weight bytes, and peak / anonymous / file-backed / PSS increases
    after decode, for the bundle and the dense export, with the recommended session options."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _chart_series(report)
    if not series:
        return None
    labels = ["data file", "unique weights", "peak", "anonymous", "file-backed", "PSS"]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
        bars = ax.bar(xs, values, width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("MiB")
    ax.set_title("Flexi vs dense bundle (onnxruntime, recommended options, after prefill + decode)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _chart_series(report: VerificationReport) -> dict[str, list[float]]:
    series = {}
    manifests = {("dense" if report.manifest.get("dense") else "flexi"): report.manifest}
    if report.dense_manifest is not None:
        manifests["dense"] = report.dense_manifest
    for label, manifest in manifests.items():
        probed = report.memory.get(label, {}).get("recommended")
        if probed is None or probed.get("skipped"):
            continue
        base, end, totals = probed["baseline"], probed["after_decode"], manifest["totals"]
        series[label] = [
            totals["data_file_bytes"] / MiB,
            totals["unique_weight_bytes"] / MiB,
            (end["VmHWM"] - base["VmRSS"]) / MiB,
            (end["RssAnon"] - base["RssAnon"]) / MiB,
            (end["RssFile"] - base["RssFile"]) / MiB,
            (end["Pss"] - base["Pss"]) / MiB,
        ]
    return series


def write_report(report: VerificationReport, folder: str | Path) -> dict[str, Path]:
    """Write ``verification.json``, ``verification.md`` and ``verification.png`` into ``folder``."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Any] = {"json": out / "verification.json", "markdown": out / "verification.md"}
    paths["json"].write_text(json.dumps(report.to_json(), indent=1, default=_plain) + "\n")
    paths["markdown"].write_text(markdown(report))
    png = chart(report, out / "verification.png")
    if png is not None:
        paths["png"] = png
    return paths


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
