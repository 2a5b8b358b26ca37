#!/usr/bin/env python
"""Quantized bundles on the reference model: the table of BENCHMARKS.md "## Quantized bundles (reference model)".

For a Flexi checkpoint of the reference model (``flexi-export compress <ref> --out X --ratio 0.3``) and for its
dense export, in fp32, fp16, int8 and int4 (int4: symmetric, block 32, accuracy level 4, embedding float),
measured in one run:

- file bytes (``model.onnx`` + data file) and unique weight bytes (manifest);
- memory in a fresh process each (``device_tests/flexi_device.py probe``: 128-token prefill, 32 decode steps,
  2 threads): peak (VmHWM of the whole process), anonymous (RssAnon) and PSS growth over the process's baseline
  just before the session is created, and decode ms/token (median of the 32 steps), with prepacking on
  (onnxruntime's default), off (``session.disable_prepacking=1``) and, for int8/int4, from the prepacked model
  onnxruntime saved with ``session.save_external_prepacked_constant_initializers`` (``flexi-export prepack``);
- held-out perplexity of the *bundle* (onnxruntime with the manifest's session options, on held-out sequences of
  the reference corpus), top-1 agreement with the fp32 bundle of the same kind on those positions, and greedy
  agreement (32 tokens from held-out prompts) with the fp32 bundle.

Usage: ``.venv/bin/python scripts/bench_quant.py --flexi CHECKPOINT [--work DIR] [--write]``. ``--write``
replaces only that section of BENCHMARKS.md and writes ``bench_results/quant.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flexi_export.compress.evaluate import heldout_sequences  # noqa: E402
from flexi_export.export import export_folder  # noqa: E402
from flexi_export.source import load_source  # noqa: E402
from flexi_export.verify.runtime import OrtDecoder, device, run_fresh  # noqa: E402

HEADING = "## Quantized bundles (reference model)"
DTYPES = ("fp32", "fp16", "int8", "int4")
KINDS = ("flexi", "dense")
MiB = 1 << 20


def export_all(checkpoint: Path, work: Path) -> dict[str, Path]:
    """Every (kind, dtype) bundle of ``checkpoint`` (int8/int4 with their prepacked model)."""
    out = {}
    for kind in KINDS:
        for dtype in DTYPES:
            label = f"{kind}-{dtype}"
            path = work / label
            print(f"export {label}", file=sys.stderr, flush=True)
            export_folder(checkpoint, path, dtype=dtype, dense=kind == "dense", overwrite=True, progress=False,
                          **({"prepack_external": True} if dtype in ("int8", "int4") else {}))  # fmt: skip
            out[label] = path
    return out


def memory(bundle: Path, mode: str, threads: int, repeats: int) -> dict[str, Any]:
    """``repeats`` fresh-process probes: growth over the baseline in bytes and peak (median over the probes, they
    differ by a few pages), decode ms/token (median over the probes of each probe's median step)."""
    probes = []
    for _ in range(repeats):
        p = run_fresh(bundle, "probe", "--mode", mode, "--threads", str(threads), "--prefill", "128", "--decode", "32")
        base, end = p["baseline"], p["after_decode"]
        probes.append({
            "peak": end["VmHWM"],
            "anon_growth": end["RssAnon"] - base["RssAnon"],
            "pss_growth": end["Pss"] - base["Pss"],
            "weight_pss": end["weights"]["pss"],
            "decode_ms_per_token": p["decode_ms_per_token"],
            "load_s": p["load_s"],
        })  # fmt: skip
    out = {key: float(np.median([p[key] for p in probes])) for key in probes[0]}
    out["decode_ms_runs"] = [p["decode_ms_per_token"] for p in probes]
    return out


def quality(bundle: Path, rows: np.ndarray, prompts: np.ndarray, threads: int, steps: int) -> dict[str, Any]:
    """Held-out NLL / perplexity, per-position argmax and greedy tokens of ``bundle`` (recommended options)."""
    described = device.Bundle(bundle)
    decoder = OrtDecoder(described.model, described.options("recommended", threads), threads)
    nll, count, argmax = 0.0, 0, []
    for start in range(0, len(rows), 4):
        ids = rows[start : start + 4]
        mask = np.ones_like(ids)
        pos = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape)
        logits = decoder.run(ids, mask, pos)[0].astype(np.float32)
        shifted = logits[:, :-1] - logits[:, :-1].max(-1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        nll -= float(np.take_along_axis(logp, ids[:, 1:, None], -1).sum())
        count += ids[:, 1:].size
        argmax.append(logits.argmax(-1))
    _, greedy = decoder.greedy(prompts, np.ones_like(prompts), steps)
    loss = nll / count
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "tokens": count,
        "argmax": np.concatenate(argmax),
        "greedy": greedy,
    }


def measure(bundles: dict[str, Path], checkpoint: Path, args: argparse.Namespace) -> dict[str, Any]:
    tokenizer = load_source(checkpoint).tokenizer
    rows, data_info = heldout_sequences(tokenizer, None, "text", 256, args.sequences)
    rows = rows.numpy().astype(np.int64)
    prompts = rows[: args.prompts, :32].copy()
    results: dict[str, Any] = {}
    for label, path in bundles.items():
        kind, dtype = label.split("-")
        print(f"measure {label}", file=sys.stderr, flush=True)
        manifest = json.loads((path / "manifest.json").read_text())
        files = path / "onnx" / "model.onnx", path / "onnx" / "model.onnx_data"
        modes = ["default", "no-prepack"] + (["prepacked"] if manifest.get("prepacked") else [])
        q = quality(path, rows, prompts, args.threads, args.steps)
        results[label] = {
            "kind": kind,
            "dtype": dtype,
            "file_bytes": sum(f.stat().st_size for f in files),
            "unique_bytes": manifest["totals"]["unique_weight_bytes"],
            "recommended": manifest["session_options"].get("config_entries", {}),
            "prepacked_data_bytes": (manifest.get("prepacked") or {}).get("data_bytes"),
            "memory": {mode: memory(path, mode, args.threads, args.repeats) for mode in modes},
            "perplexity": q["perplexity"],
            "loss": q["loss"],
            "heldout_tokens": q["tokens"],
            "_argmax": q["argmax"],
            "_greedy": q["greedy"],
        }
    for row in results.values():
        fp32 = results[f"{row['kind']}-fp32"]
        row["top1_agreement_fp32"] = float(np.mean(row["_argmax"] == fp32["_argmax"]))
        row["greedy_agreement_fp32"] = float(np.mean(row["_greedy"] == fp32["_greedy"]))
    for row in results.values():
        del row["_argmax"], row["_greedy"]
    return {"data": data_info, "rows": results}


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / MiB:.1f}"


def table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| bundle | file MiB | unique MiB | peak MiB (on / off / prepacked) | anon MiB (on / off / prepacked) "
        "| PSS MiB (on / off / prepacked) | decode ms/token (on / off / prepacked) | held-out ppl "
        "| top-1 vs fp32 | greedy vs fp32 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in results["rows"].items():
        mem = r["memory"]
        modes = ("default", "no-prepack", "prepacked")

        def cell(key: str, fmt: Any, mem: dict[str, Any] = mem, modes: tuple[str, ...] = modes) -> str:
            return " / ".join(fmt(mem[m][key]) if m in mem else "-" for m in modes)

        lines.append(
            f"| {label} | {_mib(r['file_bytes'])} | {_mib(r['unique_bytes'])} | {cell('peak', _mib)} "
            f"| {cell('anon_growth', _mib)} | {cell('pss_growth', _mib)} "
            f"| {cell('decode_ms_per_token', lambda v: f'{v:.2f}')} | {r['perplexity']:.2f} "
            f"| {r['top1_agreement_fp32']:.3f} | {r['greedy_agreement_fp32']:.3f} |"
        )
    return lines


def section(results: dict[str, Any], meta: dict[str, Any]) -> str:
    head = [
        HEADING,
        "",
        f"Command: `{meta['command']}`. Date {meta['date']}; machine: {meta['machine']}, {meta['cpus']} CPU cores "
        f"(shared with other engineers' work during the run: timings are indicative), onnxruntime "
        f"{meta['onnxruntime']}, {meta['threads']} threads; {meta['repeats']} fresh processes per memory cell "
        f"(median), decode = median over them of each one's median of 32 steps after a 128-token prefill; whole "
        f"script {meta['minutes']:.1f} min.",
        "",
        f"Model: `{meta['checkpoint']}` ({meta['checkpoint_note']}) and its `--dense` export. int8: MatMulInteger "
        "(weights int8 per output channel, activations per tensor); int4: MatMulNBits (symmetric, block 32, "
        "accuracy level 4); embedding / LM head float in both. *on*: prepacking on (onnxruntime's default); "
        "*off*: `session.disable_prepacking=1`; *prepacked*: the model `flexi-export prepack` saved (packed "
        "weights as mapped external data). Peak = VmHWM of the whole process; anon / PSS = growth over the "
        "process's baseline just before the session was created (after decode). Perplexity: onnxruntime on the "
        f"bundle itself (recommended session options), {next(iter(results['rows'].values()))['heldout_tokens']} "
        "predicted held-out tokens of the reference corpus; top-1 / greedy agreement with the fp32 bundle of the "
        f"same kind (all those positions / {meta['prompts']} held-out prompts x {meta['steps']} greedy tokens).",
        "",
    ]
    return "\n".join(head + table(results)) + "\n"


def write_section(text: str, path: Path) -> None:
    """Replace (or append) only this script's section of BENCHMARKS.md."""
    current = path.read_text() if path.is_file() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(HEADING)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(current):
        updated = pattern.sub(lambda _: text + "\n", current, count=1)
    else:
        updated = current.rstrip("\n") + "\n\n" + text
    path.write_text(updated.rstrip("\n") + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flexi", type=Path, required=True, help="Flexi checkpoint of the reference model")
    parser.add_argument("--note", default="30% Flexi", help="how the checkpoint was made (for the table)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/flexi-bench-quant"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="fresh-process probes per memory cell")
    parser.add_argument("--sequences", type=int, default=16, help="held-out sequences of 256 tokens")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--skip-export", action="store_true", help="reuse the bundles in --work")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(min(2, args.threads))
    import onnxruntime

    start = time.time()
    args.work.mkdir(parents=True, exist_ok=True)
    labels = [f"{k}-{d}" for k in KINDS for d in DTYPES]
    bundles = {x: args.work / x for x in labels} if args.skip_export else export_all(args.flexi, args.work)
    results = measure(bundles, args.flexi, args)
    meta = {
        "command": shlex.join([".venv/bin/python", "scripts/bench_quant.py", *sys.argv[1:]]),
        "date": datetime.date.today().isoformat(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "onnxruntime": onnxruntime.__version__,
        "threads": args.threads,
        "repeats": args.repeats,
        "minutes": (time.time() - start) / 60,
        "checkpoint": str(args.flexi),
        "checkpoint_note": args.note,
        "prompts": args.prompts,
        "steps": args.steps,
    }
    text = section(results, meta)
    print(text)
    if args.write:
        write_section(text, ROOT / "BENCHMARKS.md")
        out = ROOT / "bench_results" / "quant.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps({"meta": meta, **results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
