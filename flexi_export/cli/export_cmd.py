"""``flexi-export export``: a Flexi checkpoint or HF folder -> an ONNX bundle."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from flexi_export.cli.app import main


@main.command("export")
@click.argument("source", metavar="FLEXI_OR_HF_DIR", type=click.Path(path_type=str))
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=str),
    help="Bundle folder to write. It must not exist or be empty unless --overwrite is given.",
)
@click.option(
    "--dtype",
    default="fp32",
    show_default=True,
    help="fp32; fp16 (norms and softmax still computed in fp32); int8 or int4: block matrices quantized "
    "(int4: MatMulNBits, int8: MatMulInteger), adapters, norms, OFN and activations stay fp32.",
)
@click.option(
    "--block-size",
    type=int,
    default=None,
    help="int4: weights per quantization block along the input dimension, 16/32/64/128 [default: 32].",
)
@click.option("--asymmetric", is_flag=True, help="int4: per-block zero points (default: symmetric, none stored).")
@click.option(
    "--accuracy-level",
    type=int,
    default=None,
    help="int4: MatMulNBits accuracy_level; 4 lets onnxruntime compute with int8 activations (fastest), "
    "0 in fp32 [default: 4].",
)
@click.option(
    "--quantize-embedding",
    is_flag=True,
    help="int8/int4: quantize the embedding and LM head too (a tied one stays one copy; int8 needs an untied head).",
)
@click.option(
    "--prepack-external",
    is_flag=True,
    help="Also have onnxruntime save its prepacked weights next to the bundle (onnx/model.prepacked.onnx): "
    "sessions then map them instead of packing on the heap. Specific to this machine's CPU and onnxruntime.",
)
@click.option(
    "--target",
    type=click.Choice(["portable", "cpu"]),
    default="portable",
    show_default=True,
    help="portable: standard ONNX ops (every runtime); cpu: onnxruntime's fused contrib ops for its CPU provider "
    "(GroupQueryAttention, SkipSimplifiedLayerNormalization, packed q/k/v and gate/up), faster decoding.",
)
@click.option(
    "--opset",
    default=18,
    show_default=True,
    type=int,
    help="ONNX opset, 18..22 (18 is the most portable; onnxruntime 1.21 loads up to 22).",
)
@click.option(
    "--dense",
    is_flag=True,
    help="Export without sharing: every executed block gets its own copy of the weights it would share "
    "(adapters merged into them). Same function, for memory and speed comparisons.",
)
@click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists and is not empty.")
@click.option(
    "--no-check",
    is_flag=True,
    help="Skip the final onnxruntime replay of the reference prompts (onnx.checker still runs).",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def export_command(
    source: str,
    out: str,
    dtype: str,
    block_size: int | None,
    asymmetric: bool,
    accuracy_level: int | None,
    quantize_embedding: bool,
    prepack_external: bool,
    target: str,
    opset: int,
    dense: bool,
    overwrite: bool,
    no_check: bool,
    quiet: bool,
) -> None:
    """Export FLEXI_OR_HF_DIR (a Flexi checkpoint, or a Hugging Face model folder exported as the dense model)
    to an ONNX bundle with a KV cache: onnx/model.onnx + onnx/model.onnx_data (every shared weight stored
    once), config.json, generation_config.json, tokenizer files, genai_config.json, flexi_plan.json,
    manifest.json and reference.npz. The folder is written under a temporary name and renamed at the end."""
    from flexi_export.export import export_folder
    from flexi_export.table import human_bytes

    with _client_warnings_as_lines():
        bundle = export_folder(
            source,
            out,
            dtype=dtype,
            opset=opset,
            dense=dense,
            overwrite=overwrite,
            check=not no_check,
            progress=not quiet,
            block_size=block_size,
            symmetric=not asymmetric,
            accuracy_level=accuracy_level,
            quantize_embedding=quantize_embedding,
            prepack_external=prepack_external,
            target=target,
        )
    totals = bundle.manifest["totals"]
    kind = "dense (no sharing)" if dense else "shared"
    click.echo(f"bundle        {bundle.path} ({dtype}, opset {opset}, {kind}, target {target})")
    click.echo(
        f"initializers  {totals['initializers']} ({totals['shared_initializers']} read by several blocks), "
        f"{totals['parameters']:,} parameters"
    )
    click.echo(
        f"weights       {human_bytes(totals['unique_weight_bytes'])} stored once; "
        f"{human_bytes(totals['bytes_without_sharing'])} without sharing; "
        f"data file {human_bytes(totals['data_file_bytes'])}"
    )
    check = bundle.manifest.get("export_check")
    if check:
        worst = max(c["max_abs_logits_diff"] for c in check.values())
        agreement = min(c["top1_agreement"] for c in check.values())
        click.echo(
            f"check         onnxruntime vs torch: max |logits diff| {worst:.2e}, top-1 agreement {agreement:.3f}"
        )
    quant = bundle.manifest.get("quantization")
    if quant:
        moved = quant["vs_unquantized"]
        click.echo(
            f"quantization  {quant['dtype']} ({quant['op']}, {quant['granularity']}); vs the unquantized model: "
            f"prefill top-1 {moved['prefill_top1_agreement']:.3f}, greedy tokens {moved['greedy_agreement']:.3f}"
        )
    if bundle.manifest.get("prepacked"):
        prepacked = bundle.manifest["prepacked"]
        click.echo(f"prepacked     {prepacked['model']} ({human_bytes(prepacked['data_bytes'])}, onnxruntime "
                   f"{prepacked['onnxruntime']})")  # fmt: skip


@contextmanager
def _client_warnings_as_lines() -> Iterator[None]:
    """Show the exporter's client-compatibility warnings as one ``warning: ...`` line each on stderr (not Python's
    ``file:line: Category: message`` form); other warnings keep their usual format."""
    from flexi_export.export.clients import ClientCompatibilityWarning

    with warnings.catch_warnings():
        original = warnings.showwarning

        def show(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
            if issubclass(category, ClientCompatibilityWarning):
                click.echo(f"warning: {message}", err=True)
            else:
                original(message, category, *args, **kwargs)

        warnings.showwarning = show
        yield
