"""The ``flexi-export`` command group. Commands live in sibling modules and only parse options, then call the
library; heavy imports (torch, transformers) happen inside commands so that ``--help`` stays fast."""

from __future__ import annotations

import sys
from typing import Any

import click

from flexi_export import __version__
from flexi_export.errors import FlexiError


class FlexiGroup(click.Group):
    """Turns user-caused errors into one line on stderr and a non-zero exit (never a traceback)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FlexiError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: outputs are written all-or-nothing, nothing half-written was left", err=True)
            sys.exit(130)
        except OSError as exc:  # disk full, permission denied, ...: the user's environment, not our bug
            click.echo(f"error: {exc.strerror or exc} ({exc.filename or ''})", err=True)
            sys.exit(1)


@click.group(cls=FlexiGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="flexi-export")
def main() -> None:
    """Compress a Hugging Face decoder LLM FlexiGPT-style (prune blocks, replace them by weight-shared copies
    with low-rank adapters), export it to ONNX with each shared weight stored once, and verify with
    onnxruntime that it is exact and small in memory."""
