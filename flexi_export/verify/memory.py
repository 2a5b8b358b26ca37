"""Memory: the weights are resident once, memory-mapped, and the sharing shows in RAM, not only on disk.

Each measurement is a fresh process running ``device_tests/flexi_device.py probe``: baseline just before the
session is created, then figures after load, after a 128-token prefill and after 32 decode steps (VmHWM,
RssAnon, RssFile, PSS, and the Rss/Pss of the weight file's mappings: onnxruntime maps each initializer). Bounds
apply to the *increase* over the baseline (Python, numpy and onnxruntime alone hold 20-45 MiB).

Checks:

- heap growth <= KV cache + activations + a fixed allowance: no weight was copied to the heap (int4 bundles
  with prepacking on: plus twice the stored bytes of the MatMulNBits weights onnxruntime packs onto the heap);
- weight PSS within 5% of the weight bytes (every weight read by MatMul/Gemm resident, none twice; prepacked int4
  weights excepted: their file pages are released after packing);
- Flexi/dense resident weight ratio within 5% of their unique-bytes ratio (the sharing is real in RAM);
- peak (VmHWM of the whole process) <= ``--memory-budget-mb`` when a budget is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flexi_export.verify.runtime import device, run_fresh
from flexi_export.verify.structure import CheckResult

MiB = 1 << 20
#: Heap allowed per stored byte of a prepacked int4 weight (``flexi_device.PACKED_FACTOR``).
PACKED_FACTOR = device.PACKED_FACTOR
#: onnxruntime's own heap besides KV cache and activations (session state, kernels, ~5 KiB per graph node,
#: allocator arenas); measured 2-4 MiB on the reference model, so this catches any weight-sized copy.
ALLOWANCE = 32 * MiB
#: Live activation buffers assumed during a prefill (of the widest dimension), beside the logits.
ACTIVATION_BUFFERS = 8


def probe(
    bundle: str | Path, mode: str = "recommended", threads: int = 2, prefill: int = 128, decode: int = 32
) -> dict:
    """One fresh-process measurement of ``bundle`` with the manifest's options or onnxruntime's defaults."""
    args = ("--mode", mode, "--threads", str(threads), "--prefill", str(prefill), "--decode", str(decode))
    return run_fresh(bundle, "probe", *args)


def weight_bytes(manifest: dict[str, Any]) -> dict[str, int]:
    """Unique weight bytes of a bundle, and the part read by MatMul/Gemm (fully touched by one forward pass;
    a table read only by Gather is touched only at the rows of the tokens seen)."""
    rows = manifest["initializers"]
    read = int(device.matmul_read_bytes(manifest))
    released = prepacked_bytes(manifest, released_only=True)
    return {"unique": sum(r["bytes"] for r in rows), "matmul_read": read, "prepacked": released}


def prepacked_bytes(manifest: dict[str, Any], released_only: bool = False) -> int:
    """Stored bytes of the int4 weights onnxruntime packs onto the heap (``flexi_device.prepacked_bytes``)."""
    return int(device.prepacked_bytes(manifest, released_only))


def activation_bytes(manifest: dict[str, Any], prefill: int, total: int) -> int:
    """A bound on a prefill's activations: the logits plus ``ACTIVATION_BUFFERS`` buffers of the widest
    non-vocabulary dimension, plus one block's attention scores."""
    vocab = next(int(t["shape"][-1]) for t in manifest["io"]["outputs"] if t["name"] == "logits")
    widest = max((d for r in manifest["initializers"] for d in r["shape"] if d != vocab), default=0)
    heads = max((int(t["shape"][1]) for t in manifest["io"]["inputs"] if t["name"].startswith("past_")), default=1)
    query_heads = max(heads, widest // max(1, _head_dim(manifest)))
    return 4 * (prefill * vocab + ACTIVATION_BUFFERS * prefill * widest + query_heads * prefill * total)


def _head_dim(manifest: dict[str, Any]) -> int:
    return next((int(t["shape"][3]) for t in manifest["io"]["inputs"] if t["name"].startswith("past_")), 1)


def check_heap(manifest: dict[str, Any], probed: dict[str, Any]) -> CheckResult:
    """Anonymous memory growth (baseline -> after decode) <= KV cache + activations + allowance."""
    result = CheckResult(
        "memory: weights stay out of the heap",
        hint="load with the manifest's session options (session.disable_prepacking=1); check that no "
        "Transpose/Reshape/Cast reads a weight (the structure check)",
    )
    if probed.get("skipped"):
        result.skipped = probed["skipped"]
        return result
    growth = probed["after_decode"]["RssAnon"] - probed["baseline"]["RssAnon"]
    kv = probed["kv_cache_bytes"]
    acts = activation_bytes(manifest, probed["prefill_tokens"], probed["prefill_tokens"] + probed["decode_steps"])
    # int4 with prepacking: the packed MatMulNBits weights live on the heap; MLAS adds per-block sums for its
    # int8 compute, so allow twice their stored bytes (a dequantized float copy would be 8x)
    packed = PACKED_FACTOR * prepacked_bytes(manifest)
    bound = kv + acts + ALLOWANCE + packed
    result.figures = {"anon_growth": growth, "kv_cache": kv, "activations_bound": acts, "allowance": ALLOWANCE,
                      "packed_weights_bound": packed, "bound": bound,
                      "weights": weight_bytes(manifest)["unique"]}  # fmt: skip
    if growth > bound:
        result.problems.append(
            f"anonymous memory grew by {growth / MiB:.1f} MiB, bound {bound / MiB:.1f} MiB (KV {kv / MiB:.1f} + "
            f"activations {acts / MiB:.1f} + packed int4 {packed / MiB:.1f} + {ALLOWANCE / MiB:.0f}): weights were "
            "copied to the heap"
        )
    return result


def check_residency(manifest: dict[str, Any], probed: dict[str, Any]) -> CheckResult:
    """Weight PSS within 5% of the weight bytes: every MatMul/Gemm weight resident, no weight resident twice."""
    result = CheckResult(
        "memory: weights resident once",
        hint="keep the bundle's external data next to model.onnx on a local file system (onnxruntime maps it)",
    )
    if probed.get("skipped"):
        result.skipped = probed["skipped"]
        return result
    weights = probed["after_decode"]["weights"]
    sizes = weight_bytes(manifest)
    mapped = weights["mapped"]  # the file pages the weights cover, each once
    # prepacked int4 weights are on the heap (checked there), their file pages released after packing
    lower, upper = 0.95 * (sizes["matmul_read"] - sizes["prepacked"]), 1.05 * max(mapped, sizes["unique"])
    result.figures = {"pss": weights["pss"], "rss": weights["rss"], "mapped": mapped, "mappings": weights["mappings"],
                      "unique": sizes["unique"], "matmul_read": sizes["matmul_read"],
                      "prepacked_on_heap": sizes["prepacked"]}  # fmt: skip
    if weights["mappings"] == 0:
        result.problems.append("the weight file is not memory-mapped (0 mappings): weights were read into the heap")
    elif weights["pss"] > upper:
        result.problems.append(
            f"weight PSS {weights['pss'] / MiB:.2f} MiB > {upper / MiB:.2f} MiB (unique x 1.05): resident twice"
        )
    elif weights["pss"] < lower:
        result.problems.append(
            f"weight PSS {weights['pss'] / MiB:.2f} MiB < {lower / MiB:.2f} MiB (MatMul/Gemm weights x 0.95)"
        )
    return result


def check_sharing_ratio(
    manifest: dict[str, Any], probed: dict[str, Any], dense_manifest: dict[str, Any], dense_probed: dict[str, Any]
) -> CheckResult:
    """Flexi/dense resident weight bytes within 5% of Flexi/dense unique weight bytes.

    Residency is page-granular, so the unique bytes compared are the file bytes the weights' mappings cover
    (whole pages, each counted once: small tensors packed together share pages); on real models the two ratios
    are the same to 0.1%.
    """
    result = CheckResult(
        "memory: sharing is real in RAM (Flexi / dense)",
        hint="a weight is resident twice or not at all in one of the bundles: see 'weights resident once' for each",
    )
    if probed.get("skipped") or dense_probed.get("skipped"):
        result.skipped = probed.get("skipped") or dense_probed["skipped"]
        return result
    flexi, dense = probed["after_decode"]["weights"], dense_probed["after_decode"]["weights"]
    unique = flexi["mapped"] / max(1, dense["mapped"])
    resident = flexi["pss"] / max(1, dense["pss"])
    exact = weight_bytes(manifest)["unique"] / weight_bytes(dense_manifest)["unique"]
    result.figures = {"unique_ratio": unique, "resident_ratio": resident, "unique_bytes_ratio": exact}
    if abs(resident / unique - 1) > 0.05:
        result.problems.append(
            f"resident weight ratio {resident:.3f} is not within 5% of the mapped unique-bytes ratio {unique:.3f}"
        )
    return result


def check_budget(probed: dict[str, Any], budget_mb: float | None) -> CheckResult:
    """Peak memory of the whole process (VmHWM) <= the device budget."""
    result = CheckResult(
        "memory: peak within budget",
        hint="a smaller model, or --dtype with fewer bytes; the manifest's session options already minimise peak",
    )
    if budget_mb is None:
        result.skipped = "no --memory-budget-mb given"
        return result
    if probed.get("skipped"):
        result.skipped = probed["skipped"]
        return result
    peak = probed["after_decode"]["VmHWM"]
    result.figures = {"peak": peak, "budget": int(budget_mb * MiB)}
    if peak > budget_mb * MiB:
        result.problems.append(f"peak {peak / MiB:.1f} MiB (VmHWM, whole process) > budget {budget_mb:.0f} MiB")
    return result
