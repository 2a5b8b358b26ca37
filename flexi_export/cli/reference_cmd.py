"""``flexi-export reference``: train (or reuse) the reference model and print where it is."""

from __future__ import annotations

import click

from flexi_export.cli.app import main


@main.command("reference")
@click.option(
    "--size",
    type=click.Choice(["default", "tiny"]),
    default="default",
    show_default=True,
    help="'default' (10.7M parameters, about 10 minutes on 2 cores) or 'tiny' (for tests and demo --quick).",
)
@click.option("--force", is_flag=True, help="Retrain even when a cached model exists.")
def reference_command(size: str, force: bool) -> None:
    """Train the reference model (a small Llama on the Python standard library's own text) or reuse the cached
    one, then print its folder and held-out perplexity. Nothing is downloaded."""
    from flexi_export.reference.train import ensure_reference_model, load_result

    path = ensure_reference_model(size, force=force)
    result = load_result(path)
    click.echo(f"reference model ({size}): {path}")
    click.echo(
        f"held-out perplexity {result.heldout_perplexity:.2f} (untrained {result.initial_heldout_perplexity:.0f}, "
        f"vocabulary {result.spec.vocab_size}); trained on {result.train_tokens:,} tokens in {result.seconds:.0f} s"
    )
