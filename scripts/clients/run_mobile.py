"""Client: onnxruntime's mobile format (the project's venv: the tools ship in the onnxruntime wheel).

1. ``python -m onnxruntime.tools.check_onnx_model_mobile_usability onnx/model.onnx``: its whole output is kept
   (``usability`` in the result, ``mobile_usability.txt`` in the work folder).
2. ``python -m onnxruntime.tools.convert_onnx_models_to_ort`` with ``--optimization_style Fixed`` (the main row),
   then ``Runtime`` (a variant; its saved optimisations are replayed with
   ``session.enable_saved_runtime_optimizations=1``). The converter is pointed at a work folder holding hard links
   (or copies) of ``model.onnx`` and ``model.onnx_data``: the Runtime style writes a temporary folder beside its
   input, and the bundle must stay untouched. onnxruntime refuses a symlinked data file (its external data path
   check resolves links), so it cannot be a symlink.
3. Each ``.ort`` model runs every reference case with ``device_tests/flexi_device.py``'s ``OrtDecoder`` (prefill,
   then greedy with the KV cache, never stopping at EOS); its prefill logits are compared with the ``.onnx``
   model's under the bundle's tolerances, its tokens are reported for ``check_clients.py`` to compare.

Usage: .venv/bin/python scripts/clients/run_mobile.py BUNDLE JOB --work DIR   (prints one JSON line)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

from common import Stopwatch, load_job, parse_args, run

STYLES = ("Fixed", "Runtime")
_ORT_NAMES = {"Fixed": "model.ort", "Runtime": "model.with_runtime_opt.ort"}


def tool(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m onnxruntime.tools.<module> ARGS`` with stdout and stderr together."""
    command = [sys.executable, "-m", f"onnxruntime.tools.{module}", *args]
    return subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no second copy of the weights) where the file system allows one, else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def usability(model: Path, work: Path) -> dict[str, Any]:
    """Run the mobile usability checker; keep its full output and its verdict lines."""
    done = tool("check_onnx_model_mobile_usability", str(model))
    text = done.stdout + done.stderr
    (work / "mobile_usability.txt").write_text(text)
    verdicts = [line.split("INFO:", 1)[-1].strip() for line in text.splitlines() if "should perform well" in line]
    verdicts += [line.split("INFO:", 1)[-1].strip() for line in text.splitlines() if "optimal performance" in line]
    return {"returncode": done.returncode, "verdicts": verdicts, "output": text}


def convert(source: Path, out: Path, style: str) -> tuple[Path | None, str]:
    """Convert ``source`` to ORT format with one optimisation style: ``(the .ort path or None, tool output)``."""
    done = tool("convert_onnx_models_to_ort", str(source), "--output_dir", str(out), "--optimization_style", style)
    path = out / _ORT_NAMES[style]
    return (path if done.returncode == 0 and path.is_file() else None), done.stdout + done.stderr


def run_ort(ort_model: Path, style: str, job: dict[str, Any], onnx_logits: dict[str, Any], tolerances: dict) -> dict:
    """Greedy cases on one ``.ort`` model; prefill logits compared with the ``.onnx`` model's."""
    from flexi_export.verify.runtime import OrtDecoder, ReferenceCase, compare_prefill, session_options

    entries = {"session.enable_saved_runtime_optimizations": "1"} if style == "Runtime" else None
    with Stopwatch() as load:  # onnxruntime's default options (prepacking on), as an app on the device runs it
        decoder = OrtDecoder(ort_model, session_options(False, job["threads"], config_entries=entries))
    variant: dict[str, Any] = {"name": style, "loads": True, "load_seconds": load.seconds, "cases": [], "logits": []}
    variant["ort_bytes"] = ort_model.stat().st_size
    for case, (ids, mask, pos, logits_onnx) in zip(job["cases"], onnx_logits.values(), strict=True):
        logits, tokens = decoder.greedy(ids, mask, job["new_tokens"], pos)
        against = ReferenceCase(case["name"], ids, mask, pos, logits_onnx, tokens)
        diff, agreement, problems = compare_prefill(logits, against, tolerances)
        variant["cases"].append({"name": case["name"], "tokens": tokens.tolist()})
        variant["logits"].append({"case": case["name"], "max_abs_diff_vs_onnx": diff, "top1_agreement": agreement})
        if problems:
            variant["error"] = "; ".join(f".ort vs .onnx {p}" for p in problems)
    return variant


def onnx_reference(bundle: Path, job: dict[str, Any]) -> dict[str, Any]:
    """The ``.onnx`` model's prefill logits per case (what the ``.ort`` models must reproduce)."""
    import numpy as np

    from flexi_export.verify.runtime import OrtDecoder, position_ids_from_mask, session_options

    # the same options as the .ort models (prepacking changes int4 MatMulNBits results: see check_clients.py)
    decoder = OrtDecoder(bundle, session_options(False, job["threads"]))
    out = {}
    for case in job["cases"]:
        ids = np.asarray(case["input_ids"], dtype=np.int64)
        mask = np.asarray(case["attention_mask"], dtype=np.int64)
        pos = position_ids_from_mask(mask)
        logits, _ = decoder.run(ids, mask, pos)
        out[case["name"]] = (ids, mask, pos, logits)
    return out


def body(result: dict[str, Any]) -> None:
    args = parse_args(__doc__.splitlines()[0])
    job = load_job(args.job)
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    model, data = args.bundle / manifest["files"]["model"], args.bundle / manifest["files"]["data"]
    result["versions"] = {"onnxruntime": version("onnxruntime")}
    work = Path(tempfile.mkdtemp(prefix="flexi-mobile-")) if args.work is None else args.work
    work.mkdir(parents=True, exist_ok=True)
    result["usability"] = usability(model, work)
    source = work / "onnx"
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir()
    shutil.copyfile(model, source / model.name)
    link_or_copy(data, source / data.name)
    onnx_logits = onnx_reference(args.bundle, job)
    variants = []
    for style in STYLES:
        with Stopwatch() as took:
            ort_model, log = convert(source / model.name, work / "ort", style)
        if ort_model is None:
            tail = "\n".join(log.strip().splitlines()[-3:])
            variants.append({"name": style, "loads": False, "cases": [], "error": f"conversion failed: {tail}"})
            continue
        with Stopwatch() as ran:
            variant = run_ort(ort_model, style, job, onnx_logits, manifest["tolerances"])
        variant.update(convert_seconds=took.seconds, seconds=round(took.seconds + ran.seconds, 3))
        variants.append(variant)
    shutil.rmtree(source)  # the links/copies of the weights; the .ort files and the usability text stay
    main, *others = variants
    result.update(loads=main["loads"], load_seconds=main.get("load_seconds"), cases=main["cases"])
    result["style_seconds"] = main.get("seconds")
    result["logits"] = main.get("logits", [])
    result["error"] = main.get("error")
    result["variants"] = others
    result["notes"].append(f"work folder: {work}")


if __name__ == "__main__":
    raise SystemExit(run("ort-mobile", body))
