"""Fast path benchmark (issue 10): decode speed and memory of our ``--target cpu`` and ``--target portable``
bundles against onnxruntime-genai's builder and optimum, on the same model, threads and prompts.

    .venv/bin/python scripts/bench_fast.py [--builder | --builder-path DIR] [--no-optimum] [--out graphs/bench_fast]
        [--threads 2] [--prefill 64] [--decode 64] [--dtypes fp32,int4] [--repeats 5] [--reuse] [--machine TEXT]

The issue's model: a random Llama (hidden 1024, 8 blocks, intermediate 2816, GQA 16/4, vocab 32000, fp32),
exported by us dense (identity plan) and as a Flexi model (blocks 3 and 6 replaced by shared copies of blocks 2
and 5 with rank-8 adapters), each in both targets, fp32 and int4; by onnxruntime-genai's builder (fp32, int4;
``--builder`` installs it) and by optimum (``optimum-cli export onnx``, fp32, in .venv-optimum). Every bundle is
probed in a fresh process by ``device_tests/flexi_device.py`` (``probe``: load, prefill, greedy decode; VmHWM,
RssAnon, PSS) with onnxruntime's default options (prepacking on), with prepacking off, and (ours) from the
prepacked model saved by ``flexi-export prepack``, in interleaved rounds. Writes ``bench_results/fast.json`` and
the "## Fast path" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BEGIN, END = "<!-- bench_fast.py:begin -->", "<!-- bench_fast.py:end -->"
MiB = 1 << 20


def make_models() -> tuple[Any, Any]:
    """The dense random Llama and its Flexi model (two blocks replaced by adapters on shared blocks)."""
    import bench_models as bm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from flexi_export.model import build_flexi
    from flexi_export.plan import AdapterSpec, BlockPlan, SourceInfo, original, shared

    torch.manual_seed(1234)
    # bench.py's "large" shape (the model), with the eps BENCHMARKS.md's "Fast path" was measured with
    extra = dict(max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False)
    config = LlamaConfig(**bm.SHAPES["large"], **extra)
    dense = LlamaForCausalLM(config).eval()
    adapter = AdapterSpec(rank=8, alpha=16.0)
    entries = [original(i) for i in range(8)]
    entries[3] = shared(2, replaces=3, adapter=adapter)
    entries[6] = shared(5, replaces=6, adapter=adapter)
    plan = BlockPlan(SourceInfo("llama", 8), tuple(entries))
    return dense, build_flexi(dense, plan)


def probe_once(bundle: Path, mode: str, args: argparse.Namespace, plain: bool = False) -> dict[str, Any]:
    """One fresh-process probe of ``bundle`` (device_tests/flexi_device.py; ``plain``: a folder without
    manifest, such as optimum's export)."""
    from flexi_export.verify.runtime import run_fresh

    extra = ["--mode", mode, "--threads", str(args.threads), "--prefill", str(args.prefill)]
    return run_fresh(bundle, "probe", *extra, "--decode", str(args.decode), *(["--plain"] if plain else []))


def summarize(mode: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median decode ms/token over the runs (in round order), with the memory figures of the median run."""
    by_round = [r["decode_ms_per_token"] for r in runs]
    run = sorted(runs, key=lambda r: r["decode_ms_per_token"])[len(runs) // 2]
    base, load, end = run["baseline"], run["after_load"], run["after_decode"]
    return {
        "mode": mode,
        "decode_ms": run["decode_ms_per_token"],
        "decode_ms_runs": by_round,
        "rounds": [r["round"] for r in runs],
        "prefill_ms": run["prefill_ms"],
        "load_s": run["load_s"],
        "peak_mib": end["VmHWM"] / MiB,
        "anon_load_mib": (load["RssAnon"] - base["RssAnon"]) / MiB,
        "anon_end_mib": (end["RssAnon"] - base["RssAnon"]) / MiB,
        "pss_end_mib": end["Pss"] / MiB,
        # PSS of the weight data file's mappings (None for a folder whose weights are inside model.onnx)
        "weights_pss_mib": end["weights"]["pss"] / MiB if "weights" in end else None,
        "kv_mib": run["kv_cache_bytes"] / MiB,
        "logits_mib": run["logits_bytes"] / MiB,
    }


def builder_bundle(hf_dir: Path, out: Path, precision: str, args: argparse.Namespace) -> Path:
    """onnxruntime-genai's builder export of ``hf_dir`` (``-p fp32`` or ``-p int4 -e cpu``), wrapped so the probe
    reads it: its symbolic ``kv_cache_dim`` set to the head size in the graph's input metadata (the weights and
    nodes are untouched) and a minimal manifest.json (files, I/O, onnxruntime's default session options)."""
    import os
    import shutil
    import subprocess

    import onnx

    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": args.builder_path}
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(hf_dir), "-i", str(hf_dir)]
    command += ["-o", str(out), "-p", precision, "-e", "cpu", "-c", str(out) + "_cache"]
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True)
    elapsed = time.perf_counter() - start
    shutil.rmtree(str(out) + "_cache", ignore_errors=True)
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    config = json.loads((hf_dir / "config.json").read_text())
    head = config["hidden_size"] // config["num_attention_heads"]
    inputs = []
    for value in proto.graph.input:
        dims = value.type.tensor_type.shape.dim
        if value.name.startswith("past_key_values."):
            dims[3].Clear()
            dims[3].dim_value = head
        inputs.append({"name": value.name, "dtype": "FLOAT" if value.type.tensor_type.elem_type == 1 else "INT64",
                       "shape": [d.dim_value or d.dim_param for d in dims]})  # fmt: skip
    onnx.save(proto, str(out / "model.onnx"))
    manifest = {
        "files": {"model": "model.onnx", "data": "model.onnx.data"},
        "io": {"inputs": inputs, "outputs": [{"name": "logits", "shape": ["b", "s", config["vocab_size"]]}]},
        "session_options": {"config_entries": {}},
        "export_s": elapsed,
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


#: onnxruntime-genai's model builder and the one package it needs beyond this venv.
BUILDER_PACKAGES = ("onnxruntime-genai==0.18.0", "onnx-ir==1.1.0")


def install_builder(folder: Path) -> Path:
    """A folder holding onnxruntime_genai and onnx_ir (pip ``--target``), created once."""
    import subprocess

    if not (folder / "onnxruntime_genai" / "models" / "builder.py").is_file():
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(folder)]
        subprocess.run([*command, *BUILDER_PACKAGES], check=True)
    return folder


def save_dense(dense: Any, args: argparse.Namespace) -> Path:
    """The dense model as a transformers folder, the input of the other exporters."""
    from tests.export.util import char_tokenizer

    hf_dir = Path(args.out) / "hf_dense"
    hf_dir.mkdir(parents=True, exist_ok=True)
    dense.save_pretrained(hf_dir)
    char_tokenizer().save_pretrained(hf_dir)  # the builder copies a tokenizer; ids are random here anyway
    return hf_dir


def run_optimum(hf_dir: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """A row for optimum's fp32 export of the dense model (``optimum-cli export onnx`` in .venv-optimum, created
    by scripts/clients/setup_envs.sh; left out, with the reason, when that cannot be set up)."""
    import bench_models as bm

    venv = ROOT / ".venv-optimum"
    problem = bm.setup_optimum(venv, setup=True)
    if problem is not None:
        print(f"optimum's export left out: {problem}", file=sys.stderr)
        return []
    found = bm.optimum_export(Path(args.out), hf_dir, "optimum", venv)
    path = Path(found["path"])
    row = {"model": "optimum", "dtype": "fp32", "target": "optimum", "path": str(path), "plain": True}
    row["export_s"] = found["wall_s"]
    row["weights_mib"] = sum(p.stat().st_size for p in path.glob("model.onnx*")) / MiB
    row["modes"] = ["default", "no-prepack"]
    return [row]


def run_builder(hf_dir: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Rows for onnxruntime-genai's builder exports of the dense model (fp32 and int4)."""
    rows = []
    for dtype in args.dtypes.split(","):
        out = Path(args.out) / f"builder_{dtype}"
        if not (args.reuse and (out / "manifest.json").is_file()):
            builder_bundle(hf_dir, out, dtype, args)
        row = {"model": "genai builder", "dtype": dtype, "target": "builder", "path": str(out)}
        row["export_s"] = json.loads((out / "manifest.json").read_text())["export_s"]
        row["weights_mib"] = (out / "model.onnx.data").stat().st_size / MiB
        row["modes"] = ["default", "no-prepack"]
        rows.append(row)
    return rows


def shared_blobs(bundle: Path) -> dict[str, list[int]]:
    """Packed blobs onnxruntime saved per initializer read by several blocks: one blob means the shared weight's
    packed form is stored (and mapped) once."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    blobs = manifest.get("prepacked", {}).get("blobs", {})
    shared = [r["name"] for r in manifest["initializers"] if len(r["consuming_blocks"]) > 1]
    return {name: blobs.get(name, []) for name in shared}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Export every bundle (or reuse them with ``--reuse``), then probe them in interleaved rounds: on a shared
    machine the load drifts, and rounds spread the drift over every bundle instead of a few."""
    import torch

    torch.set_num_threads(args.threads)
    dense, flexi = make_models()
    hf_dir = save_dense(dense, args)
    rows = run_optimum(hf_dir, args) if args.optimum and "fp32" in args.dtypes.split(",") else []
    rows += run_builder(hf_dir, args) if args.builder_path else []
    for dtype in args.dtypes.split(","):
        for name, model in (("dense", dense), ("flexi", flexi)):
            for target in ("portable", "cpu"):
                rows.append(export_row(name, model, dtype, target, args))
    runs: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for round_ in range(args.repeats):
        for index, row in enumerate(rows):
            for mode in row["modes"]:
                if round_ and (row["dtype"], mode) in ONCE:
                    continue
                probe = probe_once(Path(row["path"]), mode, args, row.get("plain", False))
                runs.setdefault((index, mode), []).append({**probe, "round": round_})
        print(f"round {round_ + 1}/{args.repeats} done", file=sys.stderr)
        raw = [{**row, "runs": {m: runs.get((i, m), []) for m in row["modes"]}} for i, row in enumerate(rows)]
        (Path(args.out) / "fast_raw.json").write_text(json.dumps(raw))  # kept if a later step fails
    for index, row in enumerate(rows):
        row["probes"] = [summarize(mode, runs[(index, mode)]) for mode in row.pop("modes")]
    note = f"{args.repeats} interleaved fresh-process rounds on {args.machine}"
    return {"config": vars(args), "rows": rows, "note": note}


def export_row(name: str, model: Any, dtype: str, target: str, args: argparse.Namespace) -> dict[str, Any]:
    """Export (unless reused) and prepack one of our bundles; its row without probes."""
    from flexi_export.export import Bundle, export_onnx
    from flexi_export.export.prepack import prepack_bundle

    out = Path(args.out) / f"{name}_{dtype}_{target}"
    start = time.perf_counter()
    if args.reuse and (out / "manifest.json").is_file() and Bundle.open(out).manifest.get("prepacked"):
        bundle = Bundle.open(out)
    else:
        # int4 on random N(0, 0.02) weights: logits are nearly flat, so the export's top-1 self-check flips on
        # near-ties; int4 parity is tested on the tiny models (tests/export/test_fast.py). The LM head is
        # quantized too, as in the builder's int4 (its 125 MiB fp32 matrix would dominate decoding)
        quant = {"quantize_embedding": True, "check": False} if dtype == "int4" else {}
        bundle = export_onnx(model, out, dtype=dtype, target=target, overwrite=True, progress=False, **quant)
        prepack_bundle(out, threads=args.threads)  # onnxruntime's packed weights saved as external data
    row = {"model": name, "dtype": dtype, "target": target, "path": str(out), "export_s": time.perf_counter() - start}
    row["weights_mib"] = bundle.manifest["totals"]["unique_weight_bytes"] / MiB
    row["modes"] = ["default", "no-prepack", "prepacked"]
    row["shared_packed_blobs"] = shared_blobs(out)
    row["prepacked_mib"] = (out / "onnx" / "model.prepacked.onnx_data").stat().st_size / MiB
    return row


SHARED = "a 2-core machine **shared with other jobs** (timings noisy)"
#: Sessions probed in the first round only: int4 without prepacking decodes ~60x slower than with it (onnxruntime's
#: MatMulNBits has no fast unpacked path); one round shows that collapse, more would only add minutes.
ONCE = {("int4", "no-prepack")}
#: The issue's memory bound while decoding: anonymous memory after load within KV + activations + this.
SLACK_MIB = 32.0


def _reading(machine: str) -> str:
    goals = (
        "Goals as ratios of the fastest session of each (median decode over the rounds), with the median (range) "
        "of the same two sessions' ratio within each round:"
    )
    if "shared" in machine:
        return (
            "Reading: on a machine shared with other jobs or tenants the same session's decode time moves by up to "
            "30-50 % between rounds, so a ratio within a few percent of its goal is not a verdict (the same-round "
            "figures are steadier); the memory columns are stable. " + goals
        )
    return "Reading: one run; the memory columns are stable. " + goals


def markdown(data: dict[str, Any]) -> str:
    cfg = data["config"]
    lines = [
        BEGIN,
        "## Fast path",
        "",
        f"Random Llama (hidden 1024, 8 blocks, intermediate 2816, GQA 16/4, vocab 32000) exported by optimum "
        "(fp32), onnxruntime-genai's builder and us; onnxruntime CPU, "
        f"{cfg['threads']} threads, prefill {cfg['prefill']} tokens then {cfg['decode']} greedy decode steps, "
        f"median of {cfg['repeats']} interleaved fresh-process rounds on {cfg.get('machine', SHARED)}"
        + (f"; command `{data['command']}`. " if data.get("command") else ". ")
        + "Flexi = blocks 3 and 6 replaced by "
        "shared copies of blocks 2 and 5 with rank-8 "
        "adapters. int4: ours with `--quantize-embedding` (embedding and LM head int4; the builder quantizes the "
        "LM head, keeps the embedding fp32). Sessions: `default` = onnxruntime's defaults (prepacking on), "
        "`no-prepack`, `prepacked` = the model saved by `flexi-export prepack` (packed weights memory-mapped). "
        "anon = RssAnon growth over the pre-session baseline; KV = cache at the end. int4 `no-prepack` is probed "
        "in the first round only (it decodes about 60x slower than with prepacking; one round shows that). "
        "`scripts/bench_fast.py`, raw figures in `bench_results/fast.json`.",
        "",
        "| model | dtype | target | weights MiB | session | decode ms/tok | prefill ms | peak MiB | anon load MiB "
        "| anon end MiB | PSS end MiB | KV MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in data["rows"]:
        for p in row["probes"]:
            lines.append(
                f"| {row['model']} | {row['dtype']} | {row['target']} | {row['weights_mib']:.1f} | {p['mode']} | "
                f"{p['decode_ms']:.1f} | {p['prefill_ms']:.0f} | {p['peak_mib']:.0f} | {p['anon_load_mib']:.1f} | "
                f"{p['anon_end_mib']:.1f} | {p['pss_end_mib']:.0f} | {p['kv_mib']:.1f} |"
            )
    lines += [
        "",
        _reading(cfg.get("machine", SHARED)),
        "",
        *verdicts(data),
    ]
    for row in data["rows"]:
        blobs = row.get("shared_packed_blobs") or {}
        if blobs:
            kinds: dict[str, set[int]] = {}
            for name, saved in blobs.items():
                kinds.setdefault(name.rsplit(".", 1)[-1], set()).add(len(saved))
            counts = ", ".join(f"{kind} {'/'.join(map(str, sorted(n)))}" for kind, n in sorted(kinds.items()))
            if "scales" in kinds:
                counts += " (MatMulNBits packs a matrix's scales into its qweight's blob)"
            prepacked = next((p for p in row["probes"] if p["mode"] == "prepacked"), None)
            resident = (
                f"; prepacked data file {row['prepacked_mib']:.1f} MiB, resident (PSS) after decoding "
                f"{prepacked['weights_pss_mib']:.1f} MiB"
                if prepacked and "prepacked_mib" in row and prepacked["weights_pss_mib"] is not None
                else ""
            )
            lines.append(
                f"- {row['model']} {row['dtype']} {row['target']}: {len(blobs)} initializers read by several blocks; "
                f"packed blobs saved per such initializer: {counts}{resident}"
            )
    lines.append(END)
    return "\n".join(lines) + "\n"


def _low_memory(probe: dict[str, Any]) -> bool:
    """Anonymous memory after load within KV (at the end) + logits + 32 MiB: the weights are not on the heap."""
    return probe["anon_load_mib"] <= probe["kv_mib"] + probe["logits_mib"] + SLACK_MIB


def _paired(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Median (range) over rounds of ``a``'s decode time / ``b``'s in the same round: the load drifts between
    rounds far more than within one, so same-round ratios are steadier than a ratio of medians."""
    b_by_round = dict(zip(b["rounds"], b["decode_ms_runs"], strict=True))
    ratios = sorted(x / b_by_round[r] for r, x in zip(a["rounds"], a["decode_ms_runs"], strict=True) if r in b_by_round)
    if not ratios:
        return "n/a"
    return f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f} over {len(ratios)} rounds)"


def _goal(what: str, a: dict[str, Any], against: str, b: dict[str, Any], goal: float) -> str:
    ratio = a["decode_ms"] / b["decode_ms"]
    return (
        f"- {what} `{a['mode']}` {a['decode_ms']:.2f} ms / {against} `{b['mode']}` {b['decode_ms']:.2f} ms = "
        f"**{ratio:.2f}**; same-round {_paired(a, b)} (goal <= {goal}: {'met' if ratio <= goal else 'missed'})"
    )


def verdicts(data: dict[str, Any]) -> list[str]:
    """The issue's goals: our dense (cpu) vs the builder and Flexi vs our dense, fastest session of each, and the
    same with our sessions limited to those that keep the weights off the heap."""
    rows = {(r["model"], r["dtype"], r["target"]): r for r in data["rows"]}

    def fastest(key: tuple[str, str, str], low_memory: bool = False) -> dict[str, Any] | None:
        probes = [p for p in rows[key]["probes"] if not low_memory or _low_memory(p)] if key in rows else []
        return min(probes, key=lambda p: p["decode_ms"]) if probes else None

    out = []
    for dtype in sorted({r["dtype"] for r in data["rows"]}):
        builder = fastest(("genai builder", dtype, "builder"))
        for low in (False, True):
            dense, flexi = fastest(("dense", dtype, "cpu"), low), fastest(("flexi", dtype, "cpu"), low)
            label = "weights memory-mapped (anon after load <= KV + logits + 32 MiB)" if low else "any session"
            if builder and dense:
                out.append(_goal(f"{dtype}, {label}: our dense cpu", dense, "builder", builder, 1.0))
            if dense and flexi:
                out.append(_goal(f"{dtype}, {label}: Flexi cpu", flexi, "dense cpu", dense, 1.05))
        optimum, cpu = fastest(("optimum", dtype, "optimum")), fastest(("dense", dtype, "cpu"))
        if optimum and cpu:
            ratio = cpu["decode_ms"] / optimum["decode_ms"]
            out.append(f"- {dtype}: our dense cpu / optimum decode = {ratio:.2f} (fastest session of each)")
        portable = fastest(("dense", dtype, "portable"))
        if portable and cpu:
            out.append(f"- {dtype}: dense portable / cpu decode = {portable['decode_ms'] / cpu['decode_ms']:.2f}x")
    return out


def write_section(text: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    current = path.read_text() if path.is_file() else "# Benchmarks\n"
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END) + "\n?", re.S)
    current = pattern.sub(lambda _: text, current) if pattern.search(current) else current.rstrip() + "\n\n" + text
    path.write_text(current)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "graphs" / "bench_fast"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--machine", default=SHARED, help="how to describe the machine and its load in the report")
    parser.add_argument("--prefill", type=int, default=64)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--dtypes", default="fp32,int4")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved probe rounds (median reported)")
    parser.add_argument("--reuse", action="store_true", help="reuse bundles already exported under --out")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the section from bench_results/fast.json")
    parser.add_argument(
        "--builder-path",
        default=None,
        help="a folder where onnxruntime_genai and onnx_ir import from (PYTHONPATH for the builder, which runs with "
        "this venv's torch and transformers); without it (and without --builder) the builder rows are skipped",
    )
    parser.add_argument("--no-optimum", dest="optimum", action="store_false", help="leave optimum's export out")
    parser.add_argument(
        "--builder",
        action="store_true",
        help=f"install onnxruntime-genai's builder into OUT/genai_builder ({' '.join(BUILDER_PACKAGES)}, no "
        "dependencies: it runs with this venv's torch, transformers and onnx) and add its rows",
    )
    args = parser.parse_args()
    if args.builder and not args.builder_path:
        args.builder_path = str(install_builder(Path(args.out) / "genai_builder"))
    results = ROOT / "bench_results" / "fast.json"
    if args.markdown_only:
        write_section(markdown(json.loads(results.read_text())))
        return 0
    data = run(args)
    data["command"] = " ".join([".venv/bin/python scripts/bench_fast.py", *sys.argv[1:]])
    for row in data["rows"]:
        row["median_decode_ms"] = statistics.median(p["decode_ms"] for p in row["probes"])
    results.parent.mkdir(exist_ok=True)
    results.write_text(json.dumps(data, indent=2) + "\n")
    write_section(markdown(data))
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
