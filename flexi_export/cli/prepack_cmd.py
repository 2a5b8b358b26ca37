"""``flexi-export prepack BUNDLE``: have onnxruntime save its prepacked weights next to a bundle."""

from __future__ import annotations

from pathlib import Path

import click

from flexi_export.cli.app import main


@main.command("prepack")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--threads", type=int, default=2, show_default=True, help="onnxruntime intra-op threads.")
def prepack_command(bundle: Path, threads: int) -> None:
    """Create BUNDLE/onnx/model.prepacked.onnx(+_data): the graph onnxruntime optimised, with the weights it
    prepacks (int4 MatMulNBits needs prepacking for speed) saved as external data, so sessions memory-map them
    instead of packing copies on the heap. The packed layout depends on the CPU and the onnxruntime version: run
    this on the target machine (device_tests/flexi_prepack.py does the same with numpy + onnxruntime only)."""
    from flexi_export.export.prepack import prepack_bundle
    from flexi_export.table import human_bytes

    section = prepack_bundle(bundle, threads=threads)
    shared = sum(1 for sizes in section["blobs"].values() if len(sizes) > 1)
    click.echo(
        f"prepacked  {bundle / section['model']}: {len(section['blobs'])} weights packed, "
        f"{human_bytes(section['blob_bytes'])} of packed blobs, data file {human_bytes(section['data_bytes'])} "
        f"(onnxruntime {section['onnxruntime']}, {section['machine']})"
    )
    if shared:
        click.echo(f"note       {shared} weights were saved with more than one packed blob")
