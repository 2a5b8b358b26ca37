"""``flexi-export info PATH``: what a model folder holds, read from headers (no weights loaded)."""

from __future__ import annotations

import click

from flexi_export.cli.app import main


@main.command("info")
@click.argument("path", type=click.Path(path_type=str))
def info_command(path: str) -> None:
    """Describe an HF model folder or a Flexi checkpoint: architecture, blocks, parameters, unique bytes, plan."""
    from flexi_export.info import describe
    from flexi_export.plan_view import plan_table
    from flexi_export.table import human_bytes

    info = describe(path)
    d = info.dims
    plan = info.plan
    kind = "Flexi checkpoint" if info.is_flexi else "Hugging Face model"
    rows = [
        ("model", f"{info.path} ({d.model_type}, {kind})"),
        (
            "blocks",
            f"{plan.num_executed} executed of {plan.source.num_blocks} source blocks "
            f"({plan.count('original')} original, {plan.count('shared')} shared, {plan.count('removed')} removed)",
        ),
        (
            "shape",
            f"hidden {d.hidden_size}, intermediate {d.intermediate_size}, heads {d.num_heads} "
            f"(kv {d.num_kv_heads}, head_dim {d.head_dim}), vocab {d.vocab_size}, "
            f"tied embeddings {'yes' if d.tie_word_embeddings else 'no'}",
        ),
        ("stored", f"{info.stored_params:,} parameters, {human_bytes(info.stored_bytes)} ({', '.join(info.dtypes)})"),
        ("without sharing", f"{info.unshared_params:,} parameters"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key.ljust(width)}  {value}")
    if info.is_flexi:
        click.echo(f"{'plan'.ljust(width)}  fingerprint {plan.fingerprint()[:16]}")
        click.echo()
        click.echo(plan_table(plan))
