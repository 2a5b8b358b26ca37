"""``flexi-export plan ...``: inspect block plans."""

from __future__ import annotations

import json

import click

from flexi_export.cli.app import main


@main.group("plan")
def plan_group() -> None:
    """Inspect block plans (flexi_plan.json)."""


@plan_group.command("show")
@click.argument("path", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print the plan's canonical JSON instead of a table.")
def show_command(path: str, as_json: bool) -> None:
    """Show the plan in PATH (a flexi_plan.json, or a folder holding one): entries, fingerprint, provenance."""
    from flexi_export.plan import BlockPlan
    from flexi_export.plan_view import plan_table

    plan = BlockPlan.load(path)
    if as_json:
        click.echo(json.dumps(plan.to_json(), indent=2, sort_keys=True))
        return
    src = plan.source
    click.echo(f"source       {src.name or '(unnamed)'} ({src.model_type}, {src.num_blocks} blocks)")
    click.echo(f"fingerprint  {plan.fingerprint()}")
    click.echo(
        f"blocks       {plan.num_executed} executed: {plan.count('original')} original, "
        f"{plan.count('shared')} shared, {plan.count('removed')} removed"
    )
    if plan.provenance:
        click.echo(f"provenance   {', '.join(sorted(plan.provenance))}")
    click.echo()
    click.echo(plan_table(plan))
