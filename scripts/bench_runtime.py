#!/usr/bin/env python
"""Runtime measurements of scripts/bench.py: onnxruntime probes and PyTorch eager, each in a fresh process.

onnxruntime: ``device_tests/flexi_device.py probe`` (the project's one ORT runner) through ``run_fresh``; a plain
ONNX folder (optimum's export) is probed with ``--plain``. PyTorch eager: this file's ``torch`` command, which
loads the model (an HF folder or a Flexi checkpoint) with ``load_source`` and times the same prefill and greedy
decode with transformers' KV cache.

Runs are interleaved (every target once, then again) so that the load of a shared machine falls on every target
alike and the ratios between targets stay meaningful even when absolute times move.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MEMORY_KEYS = ("VmHWM", "RssAnon", "RssFile", "Pss")
STAGES = ("baseline", "after_load", "after_prefill", "after_decode")


@dataclass(frozen=True)
class Target:
    """Something to run: an ORT bundle (``kind`` "ort", ``plain`` for a folder without manifest) or a model
    folder run by PyTorch eager (``kind`` "torch")."""

    name: str
    path: Path
    kind: str = "ort"
    plain: bool = False


@dataclass(frozen=True)
class Setting:
    """How to run it: onnxruntime session mode (None for torch) and intra-op threads."""

    mode: str | None
    threads: int

    @property
    def label(self) -> str:
        return f"{self.mode or 'eager'}/{self.threads}t"


@dataclass
class Options:
    """Shared run parameters."""

    prefill: int = 128
    decode: int = 32
    prefill_runs: int = 3
    repeats: int = 3
    raw: list[dict[str, Any]] = field(default_factory=list)


def ort_probe(target: Target, setting: Setting, opts: Options) -> dict[str, Any]:
    """One fresh-process ``flexi_device.py probe``."""
    from flexi_export.verify.runtime import run_fresh

    args = ["--mode", str(setting.mode), *_run_args(setting, opts)]
    return run_fresh(target.path, "probe", *args, *(["--plain"] if target.plain else []))


def _run_args(setting: Setting, opts: Options) -> list[str]:
    """Threads, prompt length, decode steps and prefill repeats, as both probes take them."""
    threads, prefill, decode, runs = map(str, (setting.threads, opts.prefill, opts.decode, opts.prefill_runs))
    return ["--threads", threads, "--prefill", prefill, "--decode", decode, "--prefill-runs", runs]


def torch_probe(target: Target, setting: Setting, opts: Options) -> dict[str, Any]:
    """One fresh-process PyTorch eager run (this file's ``torch`` command)."""
    command = [sys.executable, str(Path(__file__).resolve()), "torch", "--model", str(target.path)]
    command += _run_args(setting, opts)
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"torch run of {target.path} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(proc.stdout)


def measure(
    plan: list[tuple[Target, Setting]], opts: Options, progress: Callable[[str], None] = print
) -> dict[tuple[str, str], dict[str, Any]]:
    """Run every (target, setting) ``opts.repeats`` times, interleaved; the summary per cell."""
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    total, done, start = len(plan) * opts.repeats, 0, time.perf_counter()
    for repeat in range(opts.repeats):
        for target, setting in plan:
            run = (torch_probe if target.kind == "torch" else ort_probe)(target, setting, opts)
            runs.setdefault((target.name, setting.label), []).append(run)
            opts.raw.append({"target": target.name, "setting": setting.label, "repeat": repeat, **_brief(run)})
            done += 1
            progress(
                f"  [{done}/{total}] {target.name} {setting.label}: prefill {run['prefill_ms']:.1f} ms, "
                f"decode {run['decode_ms_per_token']:.2f} ms/token ({time.perf_counter() - start:.0f} s)"
            )
    return {cell: summarize(found) for cell, found in runs.items()}


def _brief(run: dict[str, Any]) -> dict[str, Any]:
    """A run without the per-mapping residency lists (hundreds of rows per snapshot; the sums stay)."""
    out = dict(run)
    for stage in STAGES:
        weights = (out.get(stage) or {}).get("weights")
        if weights:
            out[stage] = {**out[stage], "weights": {k: v for k, v in weights.items() if k != "by_offset"}}
    return out


def _median(values: Iterable[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    return statistics.median(found) if found else None


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the fresh-process runs of one cell: warm prefill (each run's median of its repeated prefills;
    the cold first prefill when there is none), cold prefill, decode ms/token, load time, and every memory figure
    at every stage (bytes)."""
    out: dict[str, Any] = {
        "runs": len(runs),
        "prefill_ms": _median(_median(r["prefill_ms_warm"]) or r["prefill_ms"] for r in runs),
        "prefill_cold_ms": _median(r["prefill_ms"] for r in runs),
        "decode_ms_per_token": _median(r["decode_ms_per_token"] for r in runs),
        "load_s": _median(r.get("load_s") for r in runs),
        "prefill_top1": runs[0].get("prefill_top1"),
    }
    for stage in STAGES:
        if all(stage in r and r[stage] for r in runs):
            out[stage] = {k: _median(r[stage].get(k) for r in runs) for k in MEMORY_KEYS}
            if all("weights" in r[stage] for r in runs):
                out[stage]["weights_pss"] = _median(r[stage]["weights"]["pss"] for r in runs)
                out[stage]["weights_mapped"] = _median(r[stage]["weights"]["mapped"] for r in runs)
    if "kv_cache_bytes" in runs[0]:
        out["kv_cache_bytes"] = runs[0]["kv_cache_bytes"]
    return out


# ----------------------------------------------------------------------------------------------- torch eager
def torch_eager(model_dir: Path, threads: int, prefill: int, decode: int, prefill_runs: int) -> dict[str, Any]:
    """Prefill and greedy decode of ``model_dir`` with PyTorch eager (fp32, transformers' KV cache)."""
    import numpy as np
    import torch

    from flexi_export.source import load_source

    torch.set_num_threads(threads)
    model = load_source(model_dir).model.eval()
    vocab = model.config.vocab_size
    ids = torch.from_numpy(np.random.default_rng(0).integers(3, vocab, size=(1, prefill), dtype=np.int64))
    result: dict[str, Any] = {
        "threads": threads,
        "prefill_tokens": prefill,
        "decode_steps": decode,
        "torch": torch.__version__,
    }
    with torch.inference_mode():
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        result["prefill_ms"] = (time.perf_counter() - start) * 1000
        result["prefill_top1"] = int(out.logits[0, -1].argmax())
        past, logits, times = out.past_key_values, out.logits, []
        for _ in range(decode):
            token = logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            times.append(time.perf_counter() - start)
            past, logits = out.past_key_values, out.logits
        warm = []
        for _ in range(prefill_runs - 1):
            start = time.perf_counter()
            model(input_ids=ids, use_cache=True)
            warm.append((time.perf_counter() - start) * 1000)
    result["decode_ms_per_token"] = statistics.median(times) * 1000 if times else None
    result["prefill_ms_warm"] = warm
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description="PyTorch eager timing of a model folder (prints JSON)")
    parser.add_argument("job", choices=["torch"])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefill", type=int, default=128)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--prefill-runs", type=int, default=3)
    args = parser.parse_args()
    result = torch_eager(args.model, args.threads, args.prefill, args.decode, args.prefill_runs)
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
