"""Command-line interface: ``flexi-export``. Each command module registers itself on :data:`main`."""

# importing a command module registers its command on `main`
from flexi_export.cli import (  # noqa: F401
    compress_cmd,
    demo_cmd,
    evaluate_cmd,
    export_cmd,
    info,
    plan_cmd,
    prepack_cmd,
    reference_cmd,
    verify_cmd,
)
from flexi_export.cli.app import main

__all__ = ["main"]
