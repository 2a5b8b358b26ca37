"""``flexi-export evaluate MODEL``: held-out perplexity and mean token loss of an HF folder or Flexi checkpoint."""

from __future__ import annotations

import click

from flexi_export.cli.app import main


@main.command("evaluate")
@click.argument("model", type=str)
@click.option(
    "--data",
    type=click.Path(path_type=str),
    help=".txt / .jsonl file or folder, or a saved `datasets` "
    "folder; default: the reference corpus. Its held-out split is evaluated (the same split compress "
    "never trains on).",
)
@click.option("--text-field", default="text", show_default=True, help="Text field of .jsonl rows / dataset columns.")
@click.option(
    "--split",
    type=click.Choice(["heldout", "all"]),
    default="heldout",
    show_default=True,
    help="heldout: the held-out documents; all: every document of --data.",
)
@click.option("--seq-len", type=int, default=256, show_default=True, help="Tokens per evaluated sequence.")
@click.option("--max-sequences", type=int, default=128, show_default=True, help="At most this many sequences.")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto (GPU when present), cpu or cuda.")
@click.option("--json", "json_out", type=click.Path(path_type=str), help="Also write the result as JSON here.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def evaluate_command(
    model: str,
    data: str | None,
    text_field: str,
    split: str,
    seq_len: int,
    max_sequences: int,
    batch_size: int,
    device: str,
    json_out: str | None,
    quiet: bool,
) -> None:
    """Perplexity and mean next-token loss of MODEL on held-out text."""
    import json

    from flexi_export.compress.evaluate import evaluate_path
    from flexi_export.compress.report import atomic_write_text

    if max_sequences < 1:
        raise click.BadParameter("must be at least 1", param_hint="--max-sequences")
    result = evaluate_path(model, data, text_field, seq_len, max_sequences, split, device, batch_size, not quiet)
    click.echo(
        f"{model}: perplexity {result['perplexity']:.4f}, mean token loss {result['mean_loss']:.5f} "
        f"({result['tokens']:,} tokens, {result['sequences']} sequences of {result['seq_len']}, {result['device']})"
    )
    if json_out:
        atomic_write_text(json_out, json.dumps(result, indent=2, allow_nan=False) + "\n")
