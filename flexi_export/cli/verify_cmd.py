"""``flexi-export verify BUNDLE``: structure, parity and memory checks with a report."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from flexi_export.cli.app import main


@main.command("verify")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option(
    "--against",
    type=click.Path(path_type=Path),
    default=None,
    help="The Flexi checkpoint or HF folder the bundle was exported from: parity against PyTorch itself "
    "(prefill, presents, decode with past, batched left-padded, greedy). Default: reference.npz.",
)
@click.option(
    "--dense",
    "dense_bundle",
    type=click.Path(path_type=Path),
    default=None,
    help="The --dense export of the same source, for the Flexi vs dense memory comparison "
    "(exported on the fly when --against is given).",
)
@click.option("--memory-budget-mb", type=float, default=None, help="Fail when the peak (VmHWM) exceeds this.")
@click.option(
    "--report",
    "report_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where to write verification.json / .md / .png (default: BUNDLE.report next to the bundle).",
)
@click.option("--threads", type=int, default=2, show_default=True, help="onnxruntime intra-op threads.")
@click.option("--no-memory", is_flag=True, help="Skip the memory measurements (structure and parity only).")
@click.option("--quiet", is_flag=True, help="Print only the verdict and failures.")
def verify_command(
    bundle: Path,
    against: Path | None,
    dense_bundle: Path | None,
    memory_budget_mb: float | None,
    report_dir: Path | None,
    threads: int,
    no_memory: bool,
    quiet: bool,
) -> None:
    """Verify an exported BUNDLE: (a) structure (one initializer per parameter, no folded ops on weights,
    external data, values), (b) parity with PyTorch or reference.npz, (c) memory in fresh processes (weights
    memory-mapped and resident once, Flexi vs dense). Exits 0 only when every check passes; each failure names
    the check, the measured value, the bound and what to try."""
    from flexi_export.verify.report import failure_lines, status, write_report
    from flexi_export.verify.run import verify

    report = verify(bundle, against, dense_bundle, memory_budget_mb, threads, not no_memory, progress=not quiet)
    folder = report_dir or bundle.with_name(bundle.name + ".report")
    paths = write_report(report, folder)
    if not quiet:
        for check in report.checks:
            detail = check.skipped or "; ".join(check.problems)
            click.echo(f"{status(check)}  {check.name}" + (f"  ({detail})" if detail else ""))
    for line in failure_lines(report):
        click.echo(line, err=True)
    verdict = "PASSED" if report.passed else f"FAILED ({len(report.failures)} of {len(report.checks)} checks)"
    click.echo(f"verification {verdict}; report: {', '.join(str(p) for p in paths.values())}")
    sys.exit(0 if report.passed else 1)
