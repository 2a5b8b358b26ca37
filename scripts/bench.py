#!/usr/bin/env python
"""Storage, runtime memory, speed and export cost of Flexi bundles against our dense export, optimum's export of
the dense model and PyTorch eager, in one run; the goals verdicts. Writes the bench.py sections of BENCHMARKS.md.

Models (``--models``, comma-separated):

- ``reference``: the reference model (``ensure_reference_model('default')``, 10.7M parameters, trained) and its
  30% Flexi checkpoint from ``flexi-export compress --ratio 0.3 --tokens 0``;
- ``large``: a random Llama shaped like the issue-10 model (hidden 1024, 8 blocks, GQA 16/4, vocab 32000, fp32,
  ~156M parameters) and a 30% Flexi plan from ``make_plan`` (Block Influence on random tokens, SVD-initialised
  adapters): on the reference model onnxruntime's fixed overheads dominate, here the weights do;
- ``tiny``: a random 4-block hidden-64 model, for the tests.

For each: ``flexi-export export`` of the Flexi checkpoint (Flexi), ``--dense`` of the same checkpoint (our dense:
the same function without sharing), ``flexi-export export`` of the dense source, and ``optimum-cli export onnx
--task text-generation-with-past`` of the dense source in ``.venv-optimum`` (set up by
``scripts/clients/setup_envs.sh optimum``). Every runtime figure comes from a fresh process
(``device_tests/flexi_device.py probe``; PyTorch eager through ``bench_runtime.py torch``). Export cost adds a
random TinyLlama-1.1B-shaped model exported in fp16 (``--no-scaling`` skips it).

Usage: ``.venv/bin/python scripts/bench.py [--models reference,large] [--repeats 3] [--work out/bench] [--write]
[--quality]``. ``--write`` replaces the bench.py sections of BENCHMARKS.md (between ``<!-- bench.py:begin -->``
and ``<!-- bench.py:end -->``) and writes ``bench_results/bench.json``; ``--quality`` also re-runs
``scripts/bench_compress.py --write`` (~32 min), whose section this script never touches.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_models as bm  # noqa: E402
import bench_report  # noqa: E402
from bench_runtime import Options, Setting, Target, measure  # noqa: E402

# imported up front, with the ORT runner it loads: other engineers commit to this working tree while a bench runs
from flexi_export.verify.memory import weight_bytes  # noqa: E402

MODEL_SETS = ("reference", "large", "tiny")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prepare(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Source, Flexi checkpoint and the four exports of one model set (built or taken from the cache)."""
    work = args.work
    if name == "reference":
        from flexi_export.reference.train import ensure_reference_model

        source = ensure_reference_model("default", progress=False)
    else:
        source = bm.random_model(work, name)
    log(f"{name}: source {source}")
    checkpoint = bm.flexi_checkpoint(work, source, args.ratio, name, reference=name == "reference")
    log(f"{name}: Flexi checkpoint {checkpoint}")
    exports = {
        "flexi": bm.our_export(work, checkpoint, f"{name}-flexi"),
        "dense": bm.our_export(work, checkpoint, f"{name}-dense", dense=True),
        "dense_source": bm.our_export(work, source, f"{name}-dense-source"),
        "dense_source_nocheck": bm.our_export(work, source, f"{name}-dense-source-nocheck", check=False),
    }
    if args.optimum_problem is None:
        exports["optimum"] = bm.optimum_export(work, source, f"{name}-optimum", args.optimum_venv)
    for label, found in exports.items():
        state = "cached" if found["cached"] else f"{found['wall_s']:.0f} s"
        log(f"{name}: export {label} ({state}) {found['path']}")
    return {"source": str(source), "checkpoint": str(checkpoint), "exports": exports}


def runtime_plan(prepared: dict[str, Any], threads: list[int]) -> list[tuple[Target, Setting]]:
    """Every ORT export with prepacking off at each thread count and with onnxruntime's defaults at the largest;
    PyTorch eager of the dense source and of the Flexi model at each thread count."""
    ort_settings = [*(Setting("no-prepack", t) for t in threads), Setting("default", max(threads))]
    exports = prepared["exports"]
    targets = [Target(label, Path(exports[label]["path"])) for label in ("flexi", "dense", "dense_source")]
    if "optimum" in exports:
        targets.append(Target("optimum", Path(exports["optimum"]["path"]), plain=True))
    plan = [(t, s) for t in targets for s in ort_settings]
    torch_targets = [
        Target("torch_dense", Path(prepared["source"]), "torch"),
        Target("torch_flexi", Path(prepared["checkpoint"]), "torch"),
    ]
    return plan + [(t, s) for t in torch_targets for s in (Setting(None, t) for t in threads)]


def storage(prepared: dict[str, Any]) -> dict[str, Any]:
    """Bytes on disk of every export and the unique weight bytes from the manifests."""
    out: dict[str, Any] = {}
    for label, found in prepared["exports"].items():
        path = Path(found["path"])
        files = [p for p in path.rglob("*") if p.is_file() and p.name != bm.RECORD]
        onnx = [p for p in files if p.name.startswith("model.onnx")]
        row = {"folder_bytes": sum(p.stat().st_size for p in files), "onnx_bytes": sum(p.stat().st_size for p in onnx)}
        manifest = path / "manifest.json"
        if manifest.is_file():
            totals = json.loads(manifest.read_text())["totals"]
            row.update(
                {
                    k: totals[k]
                    for k in (
                        "unique_weight_bytes",
                        "bytes_without_sharing",
                        "data_file_bytes",
                        "padding_bytes",
                        "parameters",
                        "initializers",
                    )
                }
            )
            row["matmul_read_bytes"] = _matmul_read(json.loads(manifest.read_text()))
        out[label] = row
    return out


def _matmul_read(manifest: dict[str, Any]) -> int:
    """Weight bytes read by MatMul/Gemm (all touched by a forward pass; a Gather-only table is touched only at the
    rows of the tokens seen), as ``verify.memory`` counts them."""
    return weight_bytes(manifest)["matmul_read"]


def scaling(args: argparse.Namespace) -> dict[str, Any]:
    """Export cost of a random TinyLlama-1.1B-shaped model, saved in fp16 and exported with ``--dtype fp16``."""
    source = bm.random_model(args.work, "tinyllama", dtype="float16")
    log(f"tinyllama: source {source}")
    found = bm.our_export(args.work, source, "tinyllama-fp16-nocheck", dtype="fp16", check=False)
    totals = json.loads((Path(found["path"]) / "manifest.json").read_text())["totals"]
    state = "cached" if found["cached"] else f"{found['wall_s']:.0f} s"
    log(f"tinyllama: export ({state})")
    return {
        "export": found,
        "unique_weight_bytes": totals["unique_weight_bytes"],
        "parameters": totals["parameters"],
        "config": {**bm.COMMON, **bm.SHAPES["tinyllama"]},
    }


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import onnxruntime
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "code": _git(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "processor": _cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "load_average_at_start": load,
        "shared": "4 engineers shared this machine's 2 cores while it ran",
    }


def _git() -> str:
    """The commit measured, and whether the library's files differed from it (a shared working tree)."""

    def git(*a: str) -> str:
        proc = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=False)
        return proc.stdout.strip()

    dirty = git("status", "--porcelain", "--", "flexi_export", "device_tests")
    return f"commit {git('rev-parse', '--short', 'HEAD') or '?'}" + (
        f" + uncommitted changes in {len(dirty.splitlines())} library file(s)" if dirty else ""
    )


def _cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole bench; returns the JSON body."""
    started = time.perf_counter()
    result: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "models": {},
        "settings": {
            "prefill": args.prefill,
            "decode": args.decode,
            "repeats": args.repeats,
            "prefill_runs": args.prefill_runs,
            "ratio": args.ratio,
            "threads": args.threads,
        },
        "optimum_problem": args.optimum_problem,
    }
    opts = Options(args.prefill, args.decode, args.prefill_runs, args.repeats)
    for name in args.models:
        prepared = prepare(name, args)
        log(f"{name}: runtime ({args.repeats} fresh-process runs per cell)")
        cells = measure(runtime_plan(prepared, args.threads), opts, progress=log)
        runtime = {f"{target}|{setting}": cell for (target, setting), cell in cells.items()}
        result["models"][name] = {**prepared, "storage": storage(prepared), "runtime": runtime}
    result["raw_runs"] = opts.raw
    # what importing the exporter's stack alone costs: export peaks include it whatever the model size
    imports = "import torch, transformers, onnx, onnxruntime, flexi_export.export, flexi_export.source"
    result["import_baseline"] = bm.timed([sys.executable, "-c", imports])
    if args.scaling:
        result["scaling"] = scaling(args)
    if args.quality:
        command = [sys.executable, str(ROOT / "scripts" / "bench_compress.py"), "--write"]
        result["quality"] = bm.timed(command, log=args.work / "bench_compress.log")
    result["seconds"] = time.perf_counter() - started
    result["command"] = ".venv/bin/python scripts/bench.py " + " ".join(args.argv)
    result["goals"] = bench_report.goals(result)
    return result


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="reference,large", help=f"comma-separated, from {', '.join(MODEL_SETS)}")
    p.add_argument("--work", type=Path, default=ROOT / "out" / "bench", help="cache of models and exports")
    p.add_argument("--repeats", type=int, default=3, help="fresh-process runs per cell (medians)")
    p.add_argument("--prefill", type=int, default=128, help="prompt tokens")
    p.add_argument("--decode", type=int, default=32, help="decode steps per run (median ms/token)")
    p.add_argument("--prefill-runs", type=int, default=3, help="prefills per process (the first is cold)")
    p.add_argument("--threads", default="1,2", help="intra-op thread counts (comma-separated)")
    p.add_argument("--ratio", type=float, default=0.3, help="Flexi compression ratio")
    p.add_argument("--optimum-venv", type=Path, default=ROOT / ".venv-optimum")
    p.add_argument("--no-optimum", dest="optimum", action="store_false", help="leave optimum's export out")
    p.add_argument("--no-setup", dest="setup", action="store_false", help="do not run setup_envs.sh optimum")
    p.add_argument("--no-scaling", dest="scaling", action="store_false", help="skip the 1B-class export")
    p.add_argument("--quality", action="store_true", help="also run scripts/bench_compress.py --write (~32 min)")
    p.add_argument("--write", action="store_true", help="update BENCHMARKS.md and bench_results/bench.json")
    p.add_argument("--from-json", type=Path, help="measure nothing: re-render the sections (and goals) of this JSON")
    p.add_argument("--markdown", type=Path, default=ROOT / "BENCHMARKS.md", help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, default=ROOT / "bench_results" / "bench.json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        args.threads = sorted({int(t) for t in args.threads.split(",") if t.strip()})
    except ValueError:
        p.error("--threads takes comma-separated integers")
    if not args.threads or min(args.threads) < 1:
        p.error("--threads needs at least one count >= 1")
    unknown = [m for m in args.models if m not in MODEL_SETS]
    if unknown or not args.models or args.repeats < 1 or args.prefill < 1 or args.decode < 1 or args.prefill_runs < 1:
        p.error(f"--models from {', '.join(MODEL_SETS)}; --repeats/--prefill/--decode/--prefill-runs >= 1")
    if not 0 < args.ratio < 1:
        p.error("--ratio must be in (0, 1)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.from_json:
        result = json.loads(args.from_json.read_text())
        result["goals"] = bench_report.goals(result)
    else:
        args.work.mkdir(parents=True, exist_ok=True)
        args.optimum_problem = bm.setup_optimum(args.optimum_venv, args.setup) if args.optimum else "--no-optimum"
        if args.optimum_problem:
            log(f"optimum's export left out: {args.optimum_problem}")
        result = run(args)
    text = bench_report.markdown(result)
    print(text)
    if args.write:
        bench_report.write_section(text, args.markdown)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
        log(f"wrote {args.markdown} and {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
