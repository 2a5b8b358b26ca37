"""``flexi-export demo``: the whole job end to end on the embedded reference model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from flexi_export.cli.app import main


@main.command("demo")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("graphs/demo"),
    show_default=True,
    help="Where the checkpoints, bundles and report go (stages are reused on a re-run).",
)
@click.option("--ratio", type=float, default=0.3, show_default=True, help="Target stored-parameter compression.")
@click.option("--quick", is_flag=True, help="The tiny reference model and a few recovery steps (about a minute).")
@click.option("--tokens", type=int, default=None, help="Recovery token budget (default: 250,000; 16,384 with --quick).")
@click.option("--threads", type=int, default=2, show_default=True, help="onnxruntime threads for verification.")
@click.option(
    "--json", "json_out", type=click.Path(path_type=Path), default=None, help="Also write the figures as JSON."
)
@click.option("--quiet", is_flag=True, help="No progress bars or stage lines; only the summary.")
def demo_command(out: Path, ratio: float, quick: bool, tokens: int | None, threads: int, json_out: Path | None,
                 quiet: bool) -> None:  # fmt: skip
    """Train (or reuse) the reference model, compress it FlexiGPT-style with a short recovery, export the Flexi
    and the dense ONNX bundles, verify parity and memory, and print one summary table. Nothing is downloaded;
    re-running reuses every finished stage, and an interrupted run continues where it stopped."""
    from flexi_export.demo import DemoOptions, run_demo, summary_table
    from flexi_export.errors import InputError

    if not 0 < ratio < 1:
        raise InputError(f"--ratio must be between 0 and 1, got {ratio}")
    summary = run_demo(DemoOptions(out, ratio, quick, tokens, threads, progress=not quiet))
    click.echo(summary_table(summary))
    if json_out is not None:
        json_out.write_text(json.dumps(summary, indent=1) + "\n")
    sys.exit(0 if summary["verification_passed"] else 1)
