"""``flexi-export compress MODEL --out DIR``: prune blocks and replace them by weight-shared blocks (FlexiGPT)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from flexi_export.cli.app import main

if TYPE_CHECKING:
    from flexi_export.compress.pipeline import CompressOptions

_CHOICES = ("svd-residual", "previous", "nearest")
_OFN = ("none", "layernorm", "rms")


@main.command("compress")
@click.argument("model", type=str)
@click.option("--out", required=True, type=click.Path(path_type=str), help="Output folder (Flexi checkpoint + report).")
@click.option(
    "--method",
    type=click.Choice(["flexi", "shortgpt"]),
    default="flexi",
    show_default=True,
    help="flexi: replace pruned blocks by shared blocks; shortgpt: remove the same blocks (baseline).",
)
@click.option("--ratio", type=float, help="Target stored-parameter compression, 0 < ratio < 1 (e.g. 0.3).")
@click.option("--num-blocks", type=int, help="Prune exactly this many blocks instead of a --ratio.")
@click.option("--rank", type=int, default=8, show_default=True, help="Adapter rank of each replacement matrix.")
@click.option("--alpha", type=float, help="Adapter alpha (scaling = alpha / rank); default: scaling 1.")
@click.option(
    "--choice",
    type=click.Choice(_CHOICES),
    default="svd-residual",
    show_default=True,
    help="How each pruned block's source is picked.",
)
@click.option("--max-reuse", type=int, help="At most this many pruned blocks may share one source block.")
@click.option(
    "--ofn",
    type=click.Choice(_OFN),
    default="none",
    show_default=True,
    help="Output feature normalisation on the replaced sub-layers.",
)
@click.option(
    "--ofn-init",
    type=click.Choice(["fit", "rms"]),
    default="fit",
    show_default=True,
    help="OFN gamma from calibration: least-squares fit, or per-channel RMS ratio.",
)
@click.option(
    "--init",
    "adapter_init",
    type=click.Choice(["svd", "zero"]),
    default="svd",
    show_default=True,
    help="Adapter init: SVD of W_pruned - W_source, or LoRA's zero B.",
)
@click.option("--extend", type=str, help="Insert identity-initialised shared blocks after these blocks, e.g. 3,5.")
@click.option(
    "--data",
    type=click.Path(path_type=str),
    help=".txt / .jsonl file or folder, or a saved `datasets` folder; default: the reference corpus.",
)
@click.option("--text-field", default="text", show_default=True, help="Text field of .jsonl rows / dataset columns.")
@click.option("--calib-sequences", type=int, default=64, show_default=True, help="Calibration sequences (BI, OFN).")
@click.option("--seq-len", type=int, default=256, show_default=True, help="Tokens per sequence.")
@click.option("--eval-sequences", type=int, default=128, show_default=True, help="Held-out sequences evaluated.")
@click.option("--tokens", type=int, default=1_000_000, show_default=True, help="Recovery token budget (0: none).")
@click.option(
    "--batch-size", type=int, default=8, show_default=True, help="Sequences per optimizer step (all processes)."
)
@click.option(
    "--micro-batch-size", type=int, default=0, help="Sequences per forward pass and process (0: whole batch)."
)
@click.option("--lr", type=float, default=2e-3, show_default=True, help="Peak AdamW learning rate.")
@click.option("--warmup", type=float, default=0.05, show_default=True, help="Warm-up, as a fraction of the steps.")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="Distillation temperature.")
@click.option("--kl", type=float, help="Weight of KL to the teacher (default 1 when pruning, 0 for --extend only).")
@click.option("--hidden-mse", type=float, default=0.0, show_default=True, help="Weight of the hidden-state MSE.")
@click.option("--ce", type=float, help="Weight of next-token CE (default 0 when pruning, 1 for --extend only).")
@click.option(
    "--checkpoint-every", type=int, default=100, show_default=True, help="Steps between checkpoints (0: never)."
)
@click.option("--checkpoint-dir", type=click.Path(path_type=str), help="Recovery checkpoints (default: OUT.ckpt).")
@click.option("--keep-checkpoints", is_flag=True, help="Keep the default checkpoint folder after success.")
@click.option("--resume", is_flag=True, help="Continue an interrupted recovery from its checkpoint.")
@click.option("--device", default="auto", show_default=True, help="auto (GPU when present), cpu or cuda.")
@click.option("--nproc", type=int, default=1, show_default=True, help="Local processes (DDP/FSDP); or use torchrun.")
@click.option(
    "--strategy",
    type=click.Choice(["auto", "ddp", "fsdp"]),
    default="auto",
    show_default=True,
    help="Multi-process engine: DDP, or FSDP for models that do not fit one GPU.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder (and a stale checkpoint).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def compress_command(**kw: Any) -> None:
    """Compress MODEL (a Hugging Face folder): score blocks by Block Influence, prune the least influential,
    replace each by a weight-shared copy of a kept block with SVD-initialised low-rank adapters, recover by
    distillation, and write a Flexi checkpoint plus compress_report.json / .md."""
    import json
    from pathlib import Path

    from flexi_export.compress.pipeline import compress
    from flexi_export.compress.report import JSON_NAME

    options = _options(kw)
    nproc = int(kw["nproc"])
    if nproc < 1:
        raise click.BadParameter("must be at least 1", param_hint="--nproc")
    if nproc == 1:
        report = compress(options)
    else:
        from flexi_export.compress.device import resolve_device
        from flexi_export.compress.distributed import spawn

        spawn(compress, nproc, (options,), device_type=resolve_device(options.device).type)
        report = json.loads((Path(options.out) / JSON_NAME).read_text())
    if report:  # empty on the other ranks of a torchrun launch: only rank 0 reports
        _summary(options.out, report)


def _options(kw: dict[str, Any]) -> CompressOptions:
    from flexi_export.compress.distill import default_loss
    from flexi_export.compress.extend import parse_blocks
    from flexi_export.compress.pipeline import CompressOptions
    from flexi_export.compress.planner import PlanOptions
    from flexi_export.compress.recover import RecoveryConfig

    plan = PlanOptions(
        method=kw["method"],
        ratio=kw["ratio"],
        num_blocks=kw["num_blocks"],
        rank=kw["rank"],
        alpha=kw["alpha"],
        ofn=kw["ofn"],
        choice=kw["choice"],
        max_reuse=kw["max_reuse"],
    )
    pruning = kw["ratio"] is not None or kw["num_blocks"] is not None
    recovery = RecoveryConfig(
        tokens=kw["tokens"],
        batch_size=kw["batch_size"],
        micro_batch_size=kw["micro_batch_size"],
        lr=kw["lr"],
        warmup=kw["warmup"],
        loss=default_loss(pruning, kw["kl"], kw["ce"], kw["temperature"], kw["hidden_mse"]),
        checkpoint_every=kw["checkpoint_every"],
        seed=kw["seed"],
        strategy=kw["strategy"],
    )
    return CompressOptions(
        model=kw["model"],
        out=kw["out"],
        plan=plan,
        adapter_init=kw["adapter_init"],
        ofn_init=kw["ofn_init"],
        extend=tuple(parse_blocks(kw["extend"])) if kw["extend"] else (),
        data=kw["data"],
        text_field=kw["text_field"],
        calib_sequences=kw["calib_sequences"],
        seq_len=kw["seq_len"],
        eval_sequences=kw["eval_sequences"],
        recovery=recovery,
        device=kw["device"],
        overwrite=kw["overwrite"],
        resume=kw["resume"],
        checkpoint_dir=kw["checkpoint_dir"],
        keep_checkpoints=kw["keep_checkpoints"],
        progress=not kw["quiet"],
    )


def _summary(out: str, report: dict[str, Any]) -> None:
    ratio = report["ratio"]
    click.echo(f"{'wrote':<17} {out}")
    click.echo(f"{'method':<17} {report['method']}, pruned {report['pruned'] or 'none'}")
    click.echo(
        f"{'stored':<17} {ratio['stored_parameters']:,} of {ratio['dense_parameters']:,} parameters "
        f"(ratio {ratio['achieved']:.6f})"
    )
    for name, result in report["evaluation"].items():
        if result:
            label = name.replace("_", " ")
            click.echo(f"{label:<17} perplexity {result['perplexity']:.3f} (mean loss {result['mean_loss']:.4f})")
