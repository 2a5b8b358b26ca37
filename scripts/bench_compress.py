#!/usr/bin/env python
"""Compression quality on the reference model: the table of BENCHMARKS.md "## Compression quality (reference model)".

Rows, at each ratio (30% and 40% stored-parameter compression by default), all with the same calibration
sequences, the same training text and the same recovery token budget:

- dense: the reference model itself;
- ShortGPT: the lowest-BI blocks removed;
- ShortGPT + LoRA (fair baseline): the same blocks removed, standard LoRA on every kept block's matrices with
  exactly Flexi's extra parameter budget (adapters + norms + OFN of its replacement blocks), trained like Flexi;
- Flexi, no recovery / Flexi recovered: the library defaults (``compress`` without options);
- ablations (recovered): zero-init B instead of SVD, the other OFN settings (off / rms / layernorm), "previous
  kept block" choice instead of the SVD-residual distance, other adapter ranks (4 and 16; the achieved ratio
  moves with the rank, the pruned blocks stay the same).

Usage: ``.venv/bin/python scripts/bench_compress.py [--tokens N] [--ratios 0.3,0.4] [--write]``. ``--write``
replaces that section of BENCHMARKS.md (nothing else) and writes ``bench_results/compress.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flexi_export.compress.choose import distance_matrix  # noqa: E402
from flexi_export.compress.data import load_corpus, prepare_tokens  # noqa: E402
from flexi_export.compress.distill import teacher_view  # noqa: E402
from flexi_export.compress.evaluate import evaluate_model  # noqa: E402
from flexi_export.compress.influence import block_influence  # noqa: E402
from flexi_export.compress.init import initial_values  # noqa: E402
from flexi_export.compress.lora_baseline import add_lora  # noqa: E402
from flexi_export.compress.planner import PlanOptions, make_plan  # noqa: E402
from flexi_export.compress.recover import RecoveryConfig, recover  # noqa: E402
from flexi_export.model import build_flexi  # noqa: E402
from flexi_export.plan import SourceInfo  # noqa: E402
from flexi_export.reference.train import ensure_reference_model  # noqa: E402
from flexi_export.source import load_source  # noqa: E402
from flexi_export.stats import count_parameters, dense_parameters  # noqa: E402

HEADING = "## Compression quality (reference model)"
FAIR = "ShortGPT + LoRA (same params, tokens)"
DEFAULTS = {"rank": 8, "ofn": "none", "choice": "svd-residual", "init": "svd"}  # what `compress` uses by default


@dataclasses.dataclass
class Context:
    source: object
    dims: object
    data: object
    scores: list
    dense: dict
    args: argparse.Namespace
    path: Path


def _eval(model, ctx) -> dict:
    r = evaluate_model(model, ctx.data.heldout, progress=False)
    return {"perplexity": r.perplexity, "mean_loss": r.mean_loss, "tokens": r.tokens}


def _plan(ctx, ratio, method="flexi", choice=DEFAULTS["choice"], ofn=DEFAULTS["ofn"], rank=None):
    options = PlanOptions(method=method, ratio=ratio, rank=rank or ctx.args.rank, ofn=ofn, choice=choice)
    model = ctx.source.model

    def distances(pruned, kept):
        return distance_matrix(model, pruned, kept, options.rank, options.targets, progress=False)

    return make_plan(SourceInfo("llama", ctx.dims.num_blocks), ctx.dims, ctx.scores, options, distances)


def _recovery(ctx, lr: float | None = None) -> RecoveryConfig:
    return RecoveryConfig(tokens=ctx.args.tokens, batch_size=8, lr=lr or ctx.args.lr, seed=0)


def _row(name, ratio, model, ctx, trained=None, **extra) -> dict:
    stored = count_parameters(model).unique_params
    row = {
        "row": name,
        "target": ratio,
        "achieved_ratio": 1 - stored / dense_parameters(ctx.dims),
        "stored_parameters": stored,
        **_eval(model, ctx),
        "recovery_tokens": trained.tokens if trained else 0,
        "recovery_seconds": trained.seconds if trained else 0.0,
        **extra,
    }
    print(f"  {name:<38} ppl {row['perplexity']:9.3f}  ratio {row['achieved_ratio']:.4f}", flush=True)
    return row


def flexi_row(
    ctx, ratio, name, train=True, init=DEFAULTS["init"], ofn=DEFAULTS["ofn"], choice=DEFAULTS["choice"], rank=None
):
    result = _plan(ctx, ratio, choice=choice, ofn=ofn, rank=rank)
    model = ctx.source.model
    values = initial_values(model, result.plan, ctx.data.calibration, adapter_init=init, progress=False)
    student = build_flexi(model, result.plan, init=values)
    trained = None
    if train:
        trained = recover(
            student, teacher_view(model, student), ctx.data.train, _recovery(ctx), progress=ctx.args.jobs <= 1
        )
    return _row(name, ratio, student, ctx, trained, pruned=list(result.pruned), sources=result.sources)


def shortgpt_rows(ctx, ratio) -> list[dict]:
    model = ctx.source.model
    flexi = _plan(ctx, ratio)
    short = _plan(ctx, ratio, method="shortgpt")
    removal = build_flexi(model, short.plan)
    rows = [_row("ShortGPT removal", ratio, removal, ctx, pruned=list(short.pruned))]
    budget = flexi.stored_parameters - short.stored_parameters
    for lr in [ctx.args.lr, *ctx.args.baseline_lrs]:
        baseline = build_flexi(model, short.plan)
        split, names = add_lora(baseline, budget, PlanOptions().targets)
        trained = recover(
            baseline, model, ctx.data.train, _recovery(ctx, lr), trainable=names, progress=ctx.args.jobs <= 1
        )
        ranks = sorted(set(split.ranks.values()))
        name = FAIR if lr == ctx.args.lr else f"{FAIR}, lr {lr:g}"
        rows.append(_row(name, ratio, baseline, ctx, trained, lora_ranks=ranks, lr=lr))
    return rows


def ratio_rows(ctx, ratio: float) -> list[dict]:
    """Every row of one target ratio."""
    print(f"ratio {ratio}", flush=True)
    rows = shortgpt_rows(ctx, ratio)
    rows.append(flexi_row(ctx, ratio, "Flexi, no recovery", train=False))
    rows.append(flexi_row(ctx, ratio, "Flexi recovered"))
    if ctx.args.ablations:
        rows.append(flexi_row(ctx, ratio, "ablation: zero-init B (LoRA init)", init="zero"))
        for variant in (v for v in ("none", "rms", "layernorm") if v != DEFAULTS["ofn"]):
            rows.append(flexi_row(ctx, ratio, f"ablation: OFN {variant}", ofn=variant))
        rows.append(flexi_row(ctx, ratio, "ablation: previous-kept-block choice", choice="previous"))
        for rank in ctx.args.ablation_ranks:
            rows.append(flexi_row(ctx, ratio, f"ablation: rank {rank}", rank=rank))
    return rows


def _ratio_worker(args: argparse.Namespace, ratio: float) -> list[dict]:
    """One ratio in a fresh process (``--jobs``): the same setup, so the same data, scores and seeds."""
    torch.set_num_threads(args.threads)
    return ratio_rows(setup(args, quiet=True), ratio)


def run(ctx) -> list[dict]:
    dense = {"achieved_ratio": 0.0, "stored_parameters": dense_parameters(ctx.dims), "recovery_tokens": 0}
    rows = [{"row": "dense", "target": 0.0, **dense, **ctx.dense}]
    if ctx.args.jobs <= 1:
        return rows + [r for ratio in ctx.args.ratios for r in ratio_rows(ctx, ratio)]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=ctx.args.jobs, mp_context=spawn) as pool:
        futures = [pool.submit(_ratio_worker, ctx.args, ratio) for ratio in ctx.args.ratios]
        return rows + [r for f in futures for r in f.result()]


def setup(args, quiet: bool = False) -> Context:
    torch.manual_seed(0)
    path = ensure_reference_model("default")
    source = load_source(path)
    dims = source.layout.dims(source.model.config)
    rows = -(-args.tokens // args.seq_len)
    data = prepare_tokens(load_corpus(None), source.tokenizer, args.seq_len, args.calib, rows, args.eval, seed=0)
    scores = block_influence(source.model, data.calibration, progress=False)
    ctx = Context(source, dims, data, scores, {}, args, path)
    ctx.dense = _eval(source.model, ctx)
    if not quiet:
        print(f"reference model {path.name}: dense held-out perplexity {ctx.dense['perplexity']:.3f}", flush=True)
        print("block influence: " + ", ".join(f"{s:.4f}" for s in scores), flush=True)
    return ctx


def _gap(rows: list[dict], ratio: float, name: str, dense: float) -> float | None:
    by = {r["row"]: r["perplexity"] for r in rows if r["target"] == ratio}
    if "ShortGPT removal" not in by or name not in by:
        return None
    return (by["ShortGPT removal"] - by[name]) / (by["ShortGPT removal"] - dense)


def verdicts(rows: list[dict], dense: float, ratios: list[float]) -> list[str]:
    out = []
    for ratio in ratios:
        by = {r["row"]: r["perplexity"] for r in rows if r["target"] == ratio}
        gap = _gap(rows, ratio, "Flexi recovered", dense)
        fair = min(v for k, v in by.items() if k.startswith(FAIR))  # the baseline's best learning rate
        flexi = by["Flexi recovered"]
        line = f"- {ratio:.0%}: Flexi recovered closes {gap:.0%} of the ShortGPT-to-dense perplexity gap"
        line += f"{' (target >= 50%: met)' if gap >= 0.5 else ' (target >= 50%: NOT met)'}" if ratio == 0.3 else ""
        line += f"; {'beats' if flexi < fair else 'does NOT beat'} the fair baseline at its best learning rate"
        line += f" ({flexi:.3f} vs {fair:.3f})."
        out.append(line)
    return out


def markdown(rows: list[dict], ctx: Context, seconds: float, command: str) -> str:
    a, d = ctx.args, ctx.dims
    dense = ctx.dense["perplexity"]
    lines = [
        HEADING,
        "",
        f"Command: `{command}`. Date {datetime.date.today().isoformat()}; machine: {platform.machine()}, "
        f"{os.cpu_count()} CPU cores (shared), no GPU, torch {torch.__version__}, {a.jobs} process(es) of "
        f"{a.threads} thread(s); "
        f"1 run per row (fixed seeds, deterministic on CPU); whole script {seconds / 60:.1f} min.",
        "",
        f"Reference model: `ensure_reference_model('default')` (`{ctx.path.name}`: {d.num_blocks} blocks, hidden "
        f"{d.hidden_size}, intermediate {d.intermediate_size}, vocab {d.vocab_size}, "
        f"{dense_parameters(d) / 1e6:.1f}M parameters). Block Influence: {', '.join(f'{x:.4f}' for x in ctx.scores)}. "
        f"Every row uses the same {a.calib} calibration sequences and the same training text (reference corpus, "
        f"training split), sequences of {a.seq_len} tokens, and the same recovery budget of {a.tokens:,} tokens "
        f"(batch 8, AdamW lr {a.lr}, 5% warm-up, cosine, KL to the dense teacher at T=1). Held-out perplexity on "
        f"{ctx.data.heldout.shape[0]} sequences of the corpus' held-out documents (never used for calibration or "
        f"training). Flexi rows use the `compress` defaults (rank {a.rank}, OFN {DEFAULTS['ofn']}, SVD init, "
        "SVD-residual choice; OFN ablations use the least-squares gamma init); the fair baseline spends exactly "
        f"Flexi's extra parameters on standard LoRA over the kept blocks (B = 0 at start), at the same learning "
        "rate and, as extra rows, at "
        f"{', '.join(f'{x:g}' for x in a.baseline_lrs) or 'no other'} (the verdicts below use its best one). "
        "Gap closed = (ppl ShortGPT - ppl row) / (ppl ShortGPT - ppl dense).",
        "",
        "| target | row | achieved ratio | stored params | held-out ppl | mean loss | gap closed | recovery |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        gap = _gap(rows, r["target"], r["row"], dense) if r["target"] else None
        rec = f"{r['recovery_tokens']:,} tok, {r.get('recovery_seconds', 0):.0f} s" if r["recovery_tokens"] else "-"
        lines.append(
            f"| {r['target']:.0%} | {r['row']} | {r['achieved_ratio']:.4f} | {r.get('stored_parameters', 0):,} | "
            f"{r['perplexity']:.3f} | {r['mean_loss']:.4f} | {'-' if gap is None else f'{gap:.0%}'} | {rec} |"
        )
    lines += ["", "Targets:", *verdicts(rows, dense, a.ratios), ""]
    if not torch.cuda.is_available():
        lines += ["No GPU on this machine: the GPU-versus-CPU compression timings are not part of this run.", ""]
    return "\n".join(lines)


def write_section(text: str, path: Path) -> None:
    """Replace this script's section of BENCHMARKS.md (up to the next ``## `` heading); leave the rest alone."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(HEADING) + r"\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text + "\n", old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(new)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=131_072, help="recovery tokens per trained row")
    p.add_argument("--ratios", default="0.3,0.4")
    p.add_argument("--rank", type=int, default=DEFAULTS["rank"])
    p.add_argument("--lr", type=float, default=RecoveryConfig().lr)
    p.add_argument("--baseline-lrs", default="5e-3", help="extra learning rates for the fair baseline ('' none)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--calib", type=int, default=32, help="calibration sequences")
    p.add_argument("--eval", type=int, default=64, help="held-out sequences")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    p.add_argument("--jobs", type=int, default=2, help="ratios run in parallel processes (each --threads threads)")
    p.add_argument("--no-ablations", dest="ablations", action="store_false")
    p.add_argument("--ablation-ranks", default="4,16", help="other adapter ranks to try ('' none)")
    p.add_argument("--write", action="store_true", help="update BENCHMARKS.md and bench_results/compress.json")
    args = p.parse_args()
    args.ratios = [float(x) for x in args.ratios.split(",")]
    args.baseline_lrs = [float(x) for x in args.baseline_lrs.split(",") if x.strip()]
    args.ablation_ranks = [int(x) for x in args.ablation_ranks.split(",") if x.strip()]
    return args


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    ctx = setup(args)
    rows = run(ctx)
    seconds = time.perf_counter() - started
    command = ".venv/bin/python scripts/bench_compress.py " + " ".join(sys.argv[1:])
    text = markdown(rows, ctx, seconds, command.strip())
    print(text)
    if args.write:
        write_section(text, ROOT / "BENCHMARKS.md")
        out = ROOT / "bench_results" / "compress.json"
        out.parent.mkdir(exist_ok=True)
        body = {"rows": rows, "args": vars(args), "block_influence": ctx.scores, "seconds": seconds}
        out.write_text(json.dumps(body, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
