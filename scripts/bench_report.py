"""Markdown sections and goals verdicts of scripts/bench.py, from its JSON result (no measuring here)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

MiB = 1 << 20
BEGIN, END = "<!-- bench.py:begin -->", "<!-- bench.py:end -->"
FIRST_HEADING = "## Storage (Flexi bundles)"
LABELS = {
    "flexi": "Flexi (ours)",
    "dense": "dense, ours (`--dense` of the Flexi checkpoint)",
    "dense_source": "dense, ours (export of the dense source)",
    "optimum": "dense, optimum-cli",
    "torch_dense": "PyTorch eager, dense source",
    "torch_flexi": "PyTorch eager, Flexi model",
    "dense_source_nocheck": "dense, ours, `--no-check`",
}


def most_threads(result: dict[str, Any]) -> int:
    """The largest thread count of the run (memory is reported there)."""
    return max(result["settings"]["threads"])


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / MiB:,.1f}"


def cell(result: dict[str, Any], model: str, target: str, setting: str) -> dict[str, Any] | None:
    return result["models"][model]["runtime"].get(f"{target}|{setting}")


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


# ----------------------------------------------------------------------------------------------------- goals
def goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per goal and model (and setting where it matters): measured value, bound, met, why."""
    rows: list[dict[str, Any]] = []
    base = result.get("import_baseline", {}).get("peak_rss_bytes", 0)
    for model, body in result["models"].items():
        rows += _storage_goal(model, body) + _resident_goal(result, model, body) + _speed_goals(result, model)
        rows += _export_goal(model, body["exports"], body["storage"], base)
    if "scaling" in result:
        s = result["scaling"]
        rows += _export_goal(
            "tinyllama-1.1B (random, fp16)",
            {"fp16 --no-check": s["export"]},
            {"fp16 --no-check": {"unique_weight_bytes": s["unique_weight_bytes"]}},
            base,
        )
    return rows


def _goal(goal: str, model: str, value: float | None, bound: float, met: bool | None, why: str = "") -> dict:
    return {"goal": goal, "model": model, "value": value, "bound": bound, "met": met, "why": why}


def _storage_goal(model: str, body: dict[str, Any]) -> list[dict]:
    s = body["storage"]["flexi"]
    value = s["data_file_bytes"] / s["unique_weight_bytes"]
    why = "" if value <= 1.01 else f"{s['padding_bytes']:,} bytes of alignment padding in the data file"
    return [_goal("Flexi data file <= 1.01x unique weight bytes", model, value, 1.01, value <= 1.01, why)]


def _resident_goal(result: dict[str, Any], model: str, body: dict[str, Any]) -> list[dict]:
    flexi, dense = (cell(result, model, t, f"no-prepack/{most_threads(result)}t") for t in ("flexi", "dense"))
    s = body["storage"]
    unique = s["flexi"]["unique_weight_bytes"] / s["dense"]["unique_weight_bytes"]
    if not flexi or not dense or "weights_pss" not in flexi.get("after_decode", {}):
        return [_goal("Flexi/dense resident weights within 5% of unique ratio", model, None, 0.05, None, "no /proc")]
    resident = flexi["after_decode"]["weights_pss"] / dense["after_decode"]["weights_pss"]
    deviation = resident / unique - 1
    met = abs(deviation) <= 0.05
    read = s["flexi"]["matmul_read_bytes"] / s["dense"]["matmul_read_bytes"]
    why = (
        f"resident {resident:.3f} vs unique {unique:.3f} ({deviation:+.1%}); the weights a forward pass reads "
        f"(MatMul/Gemm) are in ratio {read:.3f}"
    )
    if not met:
        why += (
            f" (resident/read {resident / read - 1:+.1%}): a table read only by Gather (an untied embedding) is "
            "resident only at the rows of the tokens seen, so the resident ratio follows the read ratio"
        )
    return [
        _goal("Flexi/dense resident weight bytes within 5% of the unique-bytes ratio", model, deviation, 0.05, met, why)
    ]


def _speed_goals(result: dict[str, Any], model: str) -> list[dict]:
    rows = []
    for setting in (f"no-prepack/{t}t" for t in result["settings"]["threads"]):
        flexi, dense, ours, optimum = (
            cell(result, model, t, setting) for t in ("flexi", "dense", "dense_source", "optimum")
        )
        if flexi and dense:
            r = _ratio(flexi["decode_ms_per_token"], dense["decode_ms_per_token"])
            why = "" if r is None or r <= 1.10 else "shared blocks add the adapter MatMuls (x@A@B) per linear"
            rows.append(
                _goal(
                    f"Flexi decode <= 1.10x our dense ({setting})",
                    model,
                    r,
                    1.10,
                    None if r is None else r <= 1.10,
                    why,
                )
            )
        if ours and optimum:
            r = _ratio(ours["decode_ms_per_token"], optimum["decode_ms_per_token"])
            why = "" if r is None or r <= 1.0 else "see the speed section (same session options for both)"
            rows.append(
                _goal(f"our dense decode <= optimum's ({setting})", model, r, 1.0, None if r is None else r <= 1.0, why)
            )
    return rows


def _export_goal(model: str, exports: dict[str, Any], storage: dict[str, Any], base: int) -> list[dict]:
    """Peak RSS of each of our exports over its weight bytes; ``base`` = the peak of the imports alone."""
    rows = []
    for label, found in exports.items():
        weights = storage.get(label, {}).get("unique_weight_bytes")
        if found.get("exporter") != "flexi-export" or not weights:
            continue
        r, above = found["peak_rss_bytes"] / weights, (found["peak_rss_bytes"] - base) / weights
        why = f"above the imports' own {base / MiB:.0f} MiB the export takes {above:.2f}x the weights"
        if r > 1.5 and base > 1.5 * weights:
            why += "; the imports alone exceed the bound"
        elif r > 1.5 and "fp16" in label:
            why += ": the source is loaded in fp32 (2x the fp16 weights) and held while the fp16 weights are written"
        elif r > 1.5:
            why += ": the torch model (its fp32 weights, 1x) is held while the data file is written"
        rows.append(_goal(f"export peak RSS <= 1.5x weight bytes ({label})", model, r, 1.5, r <= 1.5, why))
    return rows


# -------------------------------------------------------------------------------------------------- markdown
def _header(result: dict[str, Any], runs: str) -> list[str]:
    m = result["machine"]
    return [
        f"Command: `{result['command'].strip()}`. Date {result['date']}; code: {m['code']}; machine: "
        f"{m['processor']}, "
        f"{m['cpus']} CPU cores ({m['shared']}; load average at start "
        f"{', '.join(f'{x:.1f}' for x in m['load_average_at_start'] or [])}), no GPU, onnxruntime "
        f"{m['onnxruntime']}, torch {m['torch']}; {runs}.",
        "",
    ]


def storage_md(result: dict[str, Any]) -> list[str]:
    lines = [
        FIRST_HEADING,
        BEGIN,
        "",
        *_header(result, "1 export per row (sizes are deterministic)"),
        "| model | unique weight bytes (Flexi) | Flexi data file | file / unique | Flexi ONNX files | our dense "
        "ONNX files | Flexi / our dense | unique bytes Flexi / dense | optimum ONNX files | optimum / our dense "
        "source |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model, body in result["models"].items():
        s = body["storage"]
        f, d, src, opt = s["flexi"], s["dense"], s["dense_source"], s.get("optimum")
        optimum = f"{opt['onnx_bytes']:,} | {opt['onnx_bytes'] / src['onnx_bytes']:.3f}" if opt else "- | -"
        lines.append(
            f"| {model} | {f['unique_weight_bytes']:,} | {f['data_file_bytes']:,} | "
            f"{f['data_file_bytes'] / f['unique_weight_bytes']:.4f} | {f['onnx_bytes']:,} | {d['onnx_bytes']:,} | "
            f"{f['onnx_bytes'] / d['onnx_bytes']:.3f} | {f['unique_weight_bytes'] / d['unique_weight_bytes']:.3f} | "
            f"{optimum} |"
        )
    lines += [
        "",
        "ONNX files = `model.onnx` + `model.onnx_data` (optimum writes one `model.onnx` with the weights "
        "inside below 2 GB). Our dense export of the dense source has the same bytes as `--dense` of the "
        "Flexi checkpoint when the plan removes no block.",
        "",
    ]
    return lines


def memory_md(result: dict[str, Any]) -> list[str]:
    st = result["settings"]
    lines = [
        "## Runtime memory (Flexi bundles)",
        "",
        *_header(result, f"{st['repeats']} fresh processes per row (medians)"),
        f"Each row: a fresh process (`device_tests/flexi_device.py probe`), {most_threads(result)} intra-op threads, "
        f"a {st['prefill']}"
        f"-token prefill and {st['decode']} greedy decode steps. MiB of the whole process: VmHWM (peak), RssAnon "
        "(heap), PSS; *weights* = PSS of the mappings of the external data file (our bundles; optimum's weights "
        "are inside `model.onnx`, read into the heap). Baseline = the process just before the session is "
        "created (Python + numpy + onnxruntime). Session modes, the same for every export: `no-prepack` "
        "(`session.disable_prepacking=1`, our bundles' recommended option) and `default` (onnxruntime's "
        "defaults).",
        "",
        "| model | export | mode | baseline RSS | peak: load / prefill / decode | anon: load / prefill / decode "
        "| PSS: load / prefill / decode | weights PSS after decode |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for model in result["models"]:
        for target in ("flexi", "dense", "dense_source", "optimum"):
            for setting in (f"no-prepack/{most_threads(result)}t", f"default/{most_threads(result)}t"):
                c = cell(result, model, target, setting)
                if not c or "after_load" not in c:
                    continue
                stages = [c[k] for k in ("after_load", "after_prefill", "after_decode")]
                base = c["baseline"]
                trio = [" / ".join(mib(s[k]) for s in stages) for k in ("VmHWM", "RssAnon", "Pss")]
                lines.append(
                    f"| {model} | {LABELS[target]} | {setting.split('/')[0]} | "
                    f"{mib(base['RssAnon'] + base['RssFile'])} | {' | '.join(trio)} | "
                    f"{mib(c['after_decode'].get('weights_pss'))} |"
                )
    return [*lines, ""]


def speed_md(result: dict[str, Any]) -> list[str]:
    st = result["settings"]
    lines = [
        "## Speed (Flexi bundles)",
        "",
        *_header(result, f"{st['repeats']} fresh processes per row, runs interleaved across rows"),
        f"Prefill: {st['prefill']} tokens, median over processes of each process's median of "
        f"{st['prefill_runs'] - 1} warm prefills (cold = the first prefill, which also faults the weights in). "
        f"Decode: median ms/token over {st['decode']} greedy steps, median over processes. Ratios are between "
        "rows of this same run (the machine's load moves absolute times, less so ratios). PyTorch eager: fp32, "
        "transformers' KV cache, `torch.set_num_threads`.",
        "",
        "| model | runtime | setting | prefill ms | cold prefill ms | decode ms/token | decode vs our dense "
        "(`--dense`) | decode vs optimum |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for model, body in result["models"].items():
        for key, c in body["runtime"].items():
            target, setting = key.split("|")
            threads = setting.split("/")[1]
            ref_setting = setting if not setting.startswith("eager") else f"no-prepack/{threads}"
            dense, optimum = cell(result, model, "dense", ref_setting), cell(result, model, "optimum", setting)
            if optimum is None and setting.startswith("eager"):
                optimum = cell(result, model, "optimum", ref_setting)
            r1 = _ratio(c["decode_ms_per_token"], dense and dense["decode_ms_per_token"])
            r2 = _ratio(c["decode_ms_per_token"], optimum and optimum["decode_ms_per_token"])
            lines.append(
                f"| {model} | {LABELS[target]} | {setting} | {c['prefill_ms']:.1f} | "
                f"{c['prefill_cold_ms']:.1f} | {c['decode_ms_per_token']:.2f} | "
                f"{'-' if r1 is None else f'{r1:.2f}x'} | {'-' if r2 is None else f'{r2:.2f}x'} |"
            )
    lines += [
        "",
        "PyTorch rows are compared with the onnxruntime rows of the same thread count in `no-prepack` mode.",
        "",
    ]
    return lines


def export_md(result: dict[str, Any]) -> list[str]:
    base = result.get("import_baseline", {}).get("peak_rss_bytes", 0)
    lines = [
        "## Export cost (Flexi bundles)",
        "",
        *_header(result, "1 export per row; a cached export keeps the figures of the run that made it (date)"),
        "Wall time and peak RSS of the whole command (`os.wait4` of its process, which includes the children it "
        "waited for: our exporter's onnxruntime replay check runs in a child, `--no-check` skips it; optimum's "
        "validation runs in-process). Weight bytes = the export's unique weight bytes. Importing the "
        f"exporter's stack alone (`python -c \"{'; '.join(['import torch, transformers, onnx, onnxruntime'])}, "
        f'flexi_export..."`) peaks at {mib(base)} MiB: *above imports* = (peak - that) / weights.',
        "",
        "| model | export | command options | wall s | peak RSS MiB | weight MiB | peak / weights | above imports "
        "| made |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    rows = [(m, b["exports"], b["storage"]) for m, b in result["models"].items()]
    if "scaling" in result:
        s = result["scaling"]
        rows.append(
            (
                "tinyllama-1.1B shape (random, fp16)",
                {"fp16 --no-check": s["export"]},
                {"fp16 --no-check": {"unique_weight_bytes": s["unique_weight_bytes"]}},
            )
        )
    for model, exports, storage in rows:
        for label, e in exports.items():
            weights = (
                storage.get(label, {}).get("unique_weight_bytes") or storage["dense_source"]["unique_weight_bytes"]
            )
            lines.append(
                f"| {model} | {LABELS.get(label, label)} | `{' '.join(e['options'])}` | {e['wall_s']:.1f} | "
                f"{mib(e['peak_rss_bytes'])} | {mib(weights)} | {e['peak_rss_bytes'] / weights:.2f} | "
                f"{(e['peak_rss_bytes'] - base) / weights:.2f} | {e['date'][:16]} |"
            )
    return [*lines, ""]


def quality_md(result: dict[str, Any]) -> list[str]:
    ran = "re-run by this command (`--quality`)" if "quality" in result else "not re-run by this command"
    return [
        "## Quality (Flexi bundles)",
        "",
        f"The compressor's quality table is the section **Compression quality (reference model)** above, written "
        f"by `.venv/bin/python scripts/bench_compress.py --write` (~32 min on 2 cores); {ran}. "
        "`scripts/bench.py --quality` runs it. The Flexi checkpoints measured here are not recovery-trained "
        "(`--tokens 0` / SVD init): sizes, memory and speed do not depend on the trained values.",
        "",
    ]


def goals_md(result: dict[str, Any]) -> list[str]:
    lines = [
        "## Goals (Flexi bundles)",
        "",
        "| goal | model | measured | bound | met | why / note |",
        "|---|---|---:|---:|---|---|",
    ]
    for g in result["goals"]:
        value = "-" if g["value"] is None else f"{g['value']:.3f}"
        met = "n/a" if g["met"] is None else ("yes" if g["met"] else "**no**")
        lines.append(f"| {g['goal']} | {g['model']} | {value} | {g['bound']} | {met} | {g['why']} |")
    return [*lines, ""]


def markdown(result: dict[str, Any]) -> str:
    """All bench.py sections, between the begin/end markers."""
    parts = storage_md(result) + memory_md(result) + speed_md(result) + export_md(result)
    parts += quality_md(result) + goals_md(result)
    if result.get("optimum_problem"):
        parts += [f"optimum's export is not part of this run: {result['optimum_problem']}.", ""]
    return "\n".join([*parts, END]) + "\n"


def write_section(text: str, path: Path) -> None:
    """Replace the bench.py sections of ``path`` (from its first heading to the end marker), or append them;
    everything else (other scripts' sections) stays as it is."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(
        r"^" + re.escape(FIRST_HEADING) + r"\n" + re.escape(BEGIN) + r".*?" + re.escape(END) + r"\n?", re.S | re.M
    )
    path.write_text(pattern.sub(lambda _: text, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text)
