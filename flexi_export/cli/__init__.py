"""Command-line interface: ``flexi-export``. Each command module registers itself on :data:`main`."""

from flexi_export.cli import compress_cmd, evaluate_cmd, export_cmd, info, plan_cmd, reference_cmd  # noqa: F401  (registers the commands)
from flexi_export.cli.app import main

__all__ = ["main"]
