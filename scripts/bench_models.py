#!/usr/bin/env python
"""The models and exports scripts/bench.py measures, built once and cached in its work folder.

Every artifact lives in a folder whose name carries a key of what it depends on (model shape and seed, source
files, command-line options, the exporter's source code, the optimum environment), so a later run reuses it and a
change rebuilds it. Exports are timed when they are made (wall time and peak RSS of the command's whole process
tree, from ``os.wait4``); the record is kept beside the export, so a cached export keeps the figures of the run
that made it (``cached: true`` in the JSON says so).

Also a command line, run as a fresh process so that building a 1B model never inflates the bench's own memory:
``python scripts/bench_models.py random --shape large --out DIR`` (a random Llama, saved with save_pretrained)
and ``python scripts/bench_models.py flexi --source DIR --out DIR --ratio 0.3`` (a Flexi checkpoint of it).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: Random Llama shapes. ``large`` is the issue-10 model (~156M parameters); ``tinyllama`` is TinyLlama-1.1B's
#: published config; ``tiny`` is for the bench's own tests.
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=4,
        intermediate_size=176,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=320,
    ),
    "large": dict(
        hidden_size=1024,
        num_hidden_layers=8,
        intermediate_size=2816,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    "tinyllama": dict(
        hidden_size=2048,
        num_hidden_layers=22,
        intermediate_size=5632,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
}
COMMON = dict(rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=2048)
RECORD = ".bench-export.json"
#: Random models' Flexi plans use the randomised SVD above this dimension (see build_flexi_random).
RANDOMISED_FROM = 128


def key(*parts: Any) -> str:
    """A short stable hash of JSON-able parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def folder_key(path: Path) -> str:
    """Key of a model folder's files (names, sizes, modification times; reading GBs to hash them is too slow)."""
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return key([(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files])


def code_key(*packages: str) -> str:
    """Key of the library source files that shape an artifact (an exporter change rebuilds its exports)."""
    files = sorted(f for p in packages for f in (ROOT / "flexi_export" / p).rglob("*.py"))
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.read_bytes())
    return digest.hexdigest()[:12]


#: Runs the measured command as ITS child and reports that child's rusage: a process forked from a big one starts
#: with the parent's peak RSS as its own (Linux carries ``maxrss`` over fork and exec), so the measured command
#: must be forked from this small launcher, not from the bench (which holds torch).
LAUNCHER = (
    "import json, os, subprocess, sys\n"
    "child = subprocess.Popen(sys.argv[2:])\n"
    "_, status, usage = os.wait4(child.pid, 0)\n"
    "json.dump({'rc': os.waitstatus_to_exitcode(status), 'maxrss_kib': usage.ru_maxrss}, open(sys.argv[1], 'w'))\n"
)


def timed(command: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> dict[str, Any]:
    """Run ``command``; wall seconds and peak RSS (the max over the process and the children it waited for)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "rusage.json"
        with open(log or os.devnull, "w") as out:
            start = time.perf_counter()
            subprocess.run(
                [sys.executable, "-c", LAUNCHER, str(report), *command],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                check=False,
            )
            wall = time.perf_counter() - start
        usage = json.loads(report.read_text()) if report.is_file() else {"rc": -1, "maxrss_kib": 0}
    if usage["rc"] != 0:
        tail = log.read_text().strip().splitlines()[-3:] if log else []
        raise RuntimeError(f"{' '.join(command[:4])} ... failed ({usage['rc']}): {' | '.join(tail)}")
    return {"wall_s": wall, "peak_rss_bytes": usage["maxrss_kib"] * 1024, "command": command}


def _cached(out: Path, make: Any) -> dict[str, Any]:
    """The record of ``out`` when it exists, else ``make(tmp)`` into a temporary folder renamed to ``out``."""
    record = out / RECORD
    if record.is_file():
        return {**json.loads(record.read_text()), "cached": True, "path": str(out)}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    result = make(tmp)
    result["date"] = datetime.datetime.now().isoformat(timespec="seconds")
    (tmp / RECORD).write_text(json.dumps(result, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    _drop_stale(out)
    return {**result, "cached": False, "path": str(out)}


def _drop_stale(out: Path) -> None:
    """Delete the same artifact made under other keys (older code or inputs): a 1B export is GBs."""
    stem = out.name.rsplit("-", 1)[0]
    for other in out.parent.iterdir():
        if other != out and other.is_dir() and other.name.rsplit("-", 1)[0] == stem:
            shutil.rmtree(other, ignore_errors=True)


def python_step(args: list[str], log: Path) -> dict[str, Any]:
    """This file's command line in a fresh interpreter (timed)."""
    return timed([sys.executable, str(Path(__file__).resolve()), *args], log=log)


def random_model(work: Path, shape: str, dtype: str = "float32", seed: int = 0) -> Path:
    """A random Llama of ``shape`` saved in ``dtype`` (cached)."""
    config = {**COMMON, **SHAPES[shape]}
    out = work / "models" / f"{shape}-{dtype}-{key(config, dtype, seed)}"
    _cached(
        out,
        lambda tmp: python_step(
            ["random", "--shape", shape, "--dtype", dtype, "--seed", str(seed), "--out", str(tmp)],
            work / f"build-{shape}.log",
        ),
    )
    return out


def flexi_checkpoint(work: Path, source: Path, ratio: float, name: str, reference: bool) -> Path:
    """A Flexi checkpoint of ``source`` at ``ratio`` (cached). The reference model goes through ``flexi-export
    compress --tokens 0`` (its real pipeline, on its corpus, no recovery: sizes, memory and speed do not depend
    on training); a random model gets a plan from Block Influence on random tokens and SVD-initialised adapters."""
    out = work / "checkpoints" / f"{name}-flexi{ratio:g}-{key(folder_key(source), ratio, code_key('compress'))}"
    log = work / f"compress-{name}.log"
    if reference:
        command = [*cli(), "compress", str(source), "--out", "{tmp}", "--ratio", str(ratio), "--tokens", "0"]
        _cached(out, lambda tmp: timed([str(tmp) if c == "{tmp}" else c for c in command], log=log))
    else:
        _cached(
            out,
            lambda tmp: python_step(["flexi", "--source", str(source), "--ratio", str(ratio), "--out", str(tmp)], log),
        )
    return out


def cli() -> list[str]:
    """The ``flexi-export`` command of this interpreter."""
    return [sys.executable, "-c", "from flexi_export.cli import main; main()"]


def our_export(
    work: Path, source: Path, name: str, dtype: str = "fp32", dense: bool = False, check: bool = True
) -> dict[str, Any]:
    """``flexi-export export`` of ``source`` (timed, cached)."""
    options = ["--dtype", dtype, "--quiet", *(["--dense"] if dense else []), *([] if check else ["--no-check"])]
    k = key(folder_key(source), options, code_key("export", "model"))
    out = work / "exports" / f"{name}-{k}"

    command = [*cli(), "export", str(source), *options, "--out"]
    result = _cached(out, lambda tmp: timed([*command, str(tmp)], log=work / f"export-{name}.log"))
    return {**result, "options": options, "exporter": "flexi-export"}


def optimum_export(work: Path, source: Path, name: str, venv: Path) -> dict[str, Any]:
    """``optimum-cli export onnx --task text-generation-with-past`` of ``source`` in ``venv`` (timed, cached)."""
    stamp = sorted(p.name for p in venv.glob(".flexi-client-installed-*"))
    options = ["--task", "text-generation-with-past"]
    out = work / "exports" / f"{name}-{key(folder_key(source), options, stamp)}"
    command = [str(venv / "bin" / "optimum-cli"), "export", "onnx", "--model", str(source), *options]
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # never reach for the Hub
    result = _cached(out, lambda tmp: timed([*command, str(tmp)], env=offline, log=work / f"export-{name}.log"))
    return {**result, "options": options, "exporter": "optimum-cli"}


def setup_optimum(venv: Path, setup: bool) -> str | None:
    """Make sure optimum's environment exists (``scripts/clients/setup_envs.sh optimum``); the reason when it
    cannot be used, else None."""
    if setup:
        proc = subprocess.run(
            ["bash", str(ROOT / "scripts" / "clients" / "setup_envs.sh"), "optimum"],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            return f"setup_envs.sh optimum failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
    if not (venv / "bin" / "optimum-cli").is_file():
        return f"{venv}/bin/optimum-cli not found (run scripts/clients/setup_envs.sh optimum)"
    return None


# ------------------------------------------------------------------------------------------ fresh-process jobs
def build_random(shape: str, dtype: str, seed: int, out: Path) -> None:
    """Build a random Llama of ``shape`` and save it (weights in ``dtype``) to ``out``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**COMMON, **SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    model.to(getattr(torch, dtype)).save_pretrained(out)


def build_flexi_random(source: Path, ratio: float, out: Path, seed: int = 0) -> None:
    """A Flexi checkpoint of a random model: Block Influence on random tokens, ``make_plan`` with the compress
    defaults, SVD-initialised adapters (no recovery training)."""
    import torch

    from flexi_export.checkpoint import save_flexi
    from flexi_export.compress.choose import block_matrices, svd_residual_distance
    from flexi_export.compress.influence import block_influence
    from flexi_export.compress.init import initial_values
    from flexi_export.compress.planner import PlanOptions, make_plan
    from flexi_export.model import build_flexi
    from flexi_export.plan import SourceInfo
    from flexi_export.source import load_source

    torch.set_num_threads(2)
    src = load_source(source)
    dims = src.layout.dims(src.model.config)
    calib = torch.randint(3, dims.vocab_size, (8, 64), generator=torch.Generator().manual_seed(seed))
    scores = block_influence(src.model, calib, progress=False)
    options = PlanOptions(ratio=ratio)

    def distances(pruned: list[int], kept: list[int]) -> dict[int, dict[int, float]]:
        # the library's distance with the randomised SVD at every size (exact SVDs of 1024 x 2816 matrices take
        # minutes on 2 cores; a random model's distances carry no information worth them)
        mats = {b: block_matrices(src.model, b) for b in {*pruned, *kept}}
        return {i: {j: svd_residual_distance(mats[i], mats[j], options.rank, options.targets, RANDOMISED_FROM)
                    for j in kept} for i in pruned}  # fmt: skip

    info = SourceInfo(src.model.config.model_type, dims.num_blocks)
    plan = make_plan(info, dims, scores, options, distances, {"calibration": "random tokens (bench)"}).plan
    values = initial_values(src.model, plan, calib, exact_max_dim=RANDOMISED_FROM, progress=False)
    save_flexi(build_flexi(src.model, plan, init=values), out, overwrite=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="job", required=True)
    random_p = sub.add_parser("random")
    random_p.add_argument("--shape", choices=sorted(SHAPES), required=True)
    random_p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    random_p.add_argument("--seed", type=int, default=0)
    random_p.add_argument("--out", type=Path, required=True)
    flexi_p = sub.add_parser("flexi")
    flexi_p.add_argument("--source", type=Path, required=True)
    flexi_p.add_argument("--ratio", type=float, default=0.3)
    flexi_p.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.job == "random":
        build_random(args.shape, args.dtype, args.seed, args.out)
    else:
        build_flexi_random(args.source, args.ratio, args.out)


if __name__ == "__main__":
    main()
