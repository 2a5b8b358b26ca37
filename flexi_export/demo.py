"""``flexi-export demo``: the whole job end to end on the reference model, as a newcomer's first command.

Stages, each writing its own folder under ``out`` all-or-nothing, with a stamp of its inputs (``stage.json``):

1. the reference model (trained here, or reused from the cache);
2. ``flexi-checkpoint``: FlexiGPT compression at ``ratio`` with a short distillation recovery (checkpointed,
   so an interrupted recovery continues where it stopped);
3. ``shortgpt-checkpoint``: the same blocks removed (the baseline perplexity);
4. ``bundle-flexi`` and ``bundle-dense``: the Flexi export and the same model without sharing;
5. ``report``: ``verify`` of the Flexi bundle against its checkpoint and the dense bundle (JSON, Markdown, PNG).

A re-run skips every stage whose stamp matches, so after Ctrl-C it continues, and a second run just reprints
the summary.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click

from flexi_export.table import human_bytes, text_table

MiB = 1 << 20
STAMP = "stage.json"


@dataclass(frozen=True)
class DemoOptions:
    """What ``flexi-export demo`` runs."""

    out: Path = Path("graphs/demo")
    ratio: float = 0.3
    quick: bool = False
    #: Recovery token budget; None: 250k tokens (about 4 minutes on 2 cores), 16k with ``quick``.
    recovery_tokens: int | None = None
    threads: int = 2
    progress: bool = True

    @property
    def size(self) -> str:
        """Reference model size."""
        return "tiny" if self.quick else "default"

    @property
    def tokens(self) -> int:
        """The recovery budget in effect."""
        if self.recovery_tokens is not None:
            return self.recovery_tokens
        return 16_384 if self.quick else 250_000


def _stage(
    out: Path, key: dict[str, Any], build: Callable[[Path], None], say: Callable[[str], None], name: str
) -> Path:
    """Run ``build(out)`` unless ``out`` holds a stamp with the same ``key``; the stamp is written last."""
    stamp = out / STAMP
    if stamp.is_file() and json.loads(stamp.read_text()) == key:
        say(f"{name}: reusing {out}")
        return out
    say(f"{name} ...")
    if out.exists() and not (out / STAMP).is_file():
        shutil.rmtree(out)  # a stale or foreign folder: stages are always rebuilt from their inputs
    build(out)
    stamp.write_text(json.dumps(key, indent=1, sort_keys=True) + "\n")
    return out


def run_demo(options: DemoOptions) -> dict[str, Any]:
    """Run (or resume) every stage and return the figures of the summary table."""
    from flexi_export.reference.train import ensure_reference_model

    say = _say(options.progress)
    options.out.mkdir(parents=True, exist_ok=True)
    say(f"reference model ({options.size}) ...")
    reference = ensure_reference_model(options.size, progress=options.progress)
    key = {"reference": str(reference), "ratio": options.ratio, "tokens": options.tokens, "version": 1}
    flexi = _stage(options.out / "flexi-checkpoint", key, lambda o: _compress(reference, o, "flexi", options),
                   say, "compress (FlexiGPT: prune, share, SVD adapters, distillation recovery)")  # fmt: skip
    shortgpt = _stage(options.out / "shortgpt-checkpoint", {**key, "tokens": 0},
                      lambda o: _compress(reference, o, "shortgpt", options), say, "ShortGPT baseline")  # fmt: skip
    bundle_key = {**key, "checkpoint": _report(flexi)["plan_fingerprint"]}
    bundles = {}
    for label, dense in (("flexi", False), ("dense", True)):
        bundles[label] = _stage(options.out / f"bundle-{label}", {**bundle_key, "dense": dense},
                                lambda o, d=dense: _export(flexi, o, d, options), say, f"export ({label})")  # fmt: skip
    report = _stage(options.out / "report", bundle_key, lambda o: _verify(flexi, bundles, o, options), say,
                    "verify (structure, parity, memory in fresh processes)")  # fmt: skip
    return summarize(options, reference, flexi, shortgpt, bundles, report)


def _say(progress: bool) -> Callable[[str], None]:
    def say(text: str) -> None:
        if progress:
            click.secho(f"demo: {text}", err=True, bold=True)

    return say


def _compress(reference: Path, out: Path, method: str, options: DemoOptions) -> None:
    from flexi_export.compress.pipeline import CompressOptions, compress
    from flexi_export.compress.planner import PlanOptions
    from flexi_export.compress.recover import RecoveryConfig

    tokens = options.tokens if method == "flexi" else 0
    compress(
        CompressOptions(
            model=str(reference),
            out=str(out),
            plan=PlanOptions(method=method, ratio=options.ratio),
            recovery=RecoveryConfig(tokens=tokens, checkpoint_every=25),
            eval_sequences=64 if not options.quick else 16,
            calib_sequences=32 if not options.quick else 16,
            seq_len=256 if not options.quick else 128,
            checkpoint_dir=str(out.with_name(out.name + ".ckpt")),
            resume=out.with_name(out.name + ".ckpt").exists(),  # an interrupted recovery continues
            overwrite=True,
            progress=options.progress,
        ),
        log=_say(options.progress),
    )


def _export(checkpoint: Path, out: Path, dense: bool, options: DemoOptions) -> None:
    from flexi_export.export.exporter import export_folder

    export_folder(checkpoint, out, dense=dense, overwrite=True, progress=options.progress)


def _verify(checkpoint: Path, bundles: dict[str, Path], out: Path, options: DemoOptions) -> None:
    from flexi_export.verify.report import write_report
    from flexi_export.verify.run import verify

    report = verify(bundles["flexi"], against=checkpoint, dense_bundle=bundles["dense"], threads=options.threads,
                    progress=options.progress)  # fmt: skip
    write_report(report, out)


def _report(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / "compress_report.json").read_text())


def summarize(
    options: DemoOptions, reference: Path, flexi: Path, shortgpt: Path, bundles: dict[str, Path], report: Path
) -> dict[str, Any]:
    """The figures of the summary table, read back from the stages' outputs."""
    comp, base = _report(flexi), _report(shortgpt)
    verification = json.loads((report / "verification.json").read_text())
    checks = {c["name"]: c for c in verification["checks"]}
    manifests = {k: json.loads((v / "manifest.json").read_text()) for k, v in bundles.items()}
    mem = {k: verification["memory"][k]["recommended"] for k in ("flexi", "dense")}
    evaluation = comp["evaluation"]
    return {
        "options": {**asdict(options), "out": str(options.out)},
        "reference": str(reference),
        "pruned": {str(b["block"]): b["source"] for b in comp["blocks"] if b["fate"] != "kept"},
        "stored_parameters": {"dense": comp["ratio"]["dense_parameters"], "flexi": comp["ratio"]["stored_parameters"]},
        "ratio": comp["ratio"]["achieved"],
        "bundle_bytes": {k: m["totals"]["data_file_bytes"] for k, m in manifests.items()},
        "unique_bytes": {k: m["totals"]["unique_weight_bytes"] for k, m in manifests.items()},
        "resident_weights": {k: p["after_decode"]["weights"]["pss"] for k, p in mem.items()},
        "peak_increase": {k: p["after_decode"]["VmHWM"] - p["baseline"]["VmRSS"] for k, p in mem.items()},
        "anon_increase": {k: p["after_decode"]["RssAnon"] - p["baseline"]["RssAnon"] for k, p in mem.items()},
        "parity": {
            "max_logits_diff": checks["parity: prefill logits and presents"]["figures"]["max_abs_logits_diff"],
            "greedy_identical": checks["parity: greedy tokens"]["passed"],
            "greedy_tokens": checks["parity: greedy tokens"]["figures"]["tokens"],
        },
        "perplexity": {
            "dense": evaluation["dense"]["perplexity"],
            "shortgpt": base["evaluation"]["before_recovery"]["perplexity"],
            "flexi_before_recovery": evaluation["before_recovery"]["perplexity"],
            "flexi": evaluation.get("after_recovery", evaluation["before_recovery"])["perplexity"],
        },
        "recovery_tokens": comp["recovery"]["tokens"],
        "verification_passed": verification["passed"],
        "paths": {
            "bundle": str(bundles["flexi"]),
            "dense_bundle": str(bundles["dense"]),
            "report": str(report / "verification.md"),
            "chart": str(report / "verification.png"),
        },
    }


def summary_table(s: dict[str, Any]) -> str:
    """The one table the demo ends with."""
    pruned = ", ".join(f"{b} <- {src}" for b, src in s["pruned"].items())
    p, ppl = s["parity"], s["perplexity"]
    rows = [
        ("pruned blocks (<- source)", pruned, ""),
        ("stored parameters", f"{s['stored_parameters']['flexi']:,}", f"{s['stored_parameters']['dense']:,}"),
        ("bundle data file", human_bytes(s["bundle_bytes"]["flexi"]), human_bytes(s["bundle_bytes"]["dense"])),
        ("unique weight bytes", human_bytes(s["unique_bytes"]["flexi"]), human_bytes(s["unique_bytes"]["dense"])),
        ("onnxruntime resident weights (PSS)", human_bytes(s["resident_weights"]["flexi"]),
         human_bytes(s["resident_weights"]["dense"])),
        ("peak memory increase", *(human_bytes(s["peak_increase"][k]) for k in ("flexi", "dense"))),
        ("anonymous memory increase", *(human_bytes(s["anon_increase"][k]) for k in ("flexi", "dense"))),
        ("parity vs PyTorch", f"max |logits diff| {p['max_logits_diff']:.1e}",
         f"{p['greedy_tokens']} greedy tokens {'identical' if p['greedy_identical'] else 'DIFFERENT'}"),
        ("held-out perplexity", f"Flexi {ppl['flexi']:.2f} (before recovery {ppl['flexi_before_recovery']:.2f})",
         f"dense {ppl['dense']:.2f}, ShortGPT {ppl['shortgpt']:.2f}"),
    ]  # fmt: skip
    paths = s["paths"]
    lines = [
        f"flexi-export demo: {s['ratio']:.1%} of stored parameters removed, {s['recovery_tokens']:,} recovery tokens; "
        f"verification {'PASSED' if s['verification_passed'] else 'FAILED'}",
        "",
        text_table(["", "Flexi", "dense"], rows, align_numbers=False),
        "",
        f"bundle        {paths['bundle']}",
        f"report        {paths['report']} (chart {paths['chart']})",
        f"device tests  python -m pytest device_tests --bundle {paths['bundle']}",
    ]
    return "\n".join(lines)
