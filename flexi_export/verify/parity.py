"""Parity: the exported graph computes what the PyTorch model computes.

With the PyTorch model (``--against``), on the bundle's reference prompts (one single prompt and a batched,
left-padded pair) and at the manifest's tolerances:

- :func:`check_prefill`: prefill logits and every ``present.*`` key/value;
- :func:`check_decode`: prefill half the prompt (past length 0), then one token at a time (past > 0): the logits
  of every step equal the full-sequence PyTorch logits;
- :func:`check_greedy`: N greedy tokens, fed back through the KV cache, identical (fp32) or top-1 agreement.

Without PyTorch, :func:`check_replay` replays ``reference.npz`` (golden outputs recorded at export time) in a
fresh process with the same code the device tests run.

A quantized (int8/int4) bundle is compared with the PyTorch model with the same quantization applied
(:func:`~flexi_export.export.quant_reference.quantized_reference`: dequantized weights, activations rounded as
the runtime rounds them), at the manifest's tolerances; :func:`check_quantization_effect` reports, without a
bound, how far the quantization moves the bundle from the unquantized model. onnxruntime runs with the
manifest's recommended session options (int4: prepacking on, as it would run on a device).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from flexi_export.verify.runtime import (
    OrtDecoder,
    ReferenceCase,
    device,
    load_reference,
    position_ids_from_mask,
    run_fresh,
)
from flexi_export.verify.structure import CheckResult

_HINT = (
    "compare with the model the bundle was exported from (--against the same checkpoint, float32); re-export "
    "it; if it persists, report the graph op that diverges"
)


def torch_step(model: Any, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, cache: Any = None) -> tuple:
    """One PyTorch forward with a plain ``DynamicCache`` (full, unwindowed: the graph keeps every position too):
    ``(logits, [(keys, values) per block], cache)``."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache() if cache is None else cache
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(pos),
            past_key_values=cache,
            use_cache=True,
        )
    presents = [(layer.keys.float().numpy(), layer.values.float().numpy()) for layer in cache.layers]
    return out.logits.float().numpy(), presents, cache


def _excess(ours: np.ndarray, ref: np.ndarray, atol: float, rtol: float) -> float:
    """Max of ``|a - b| - (atol + rtol |b|)`` over the array: <= 0 means within tolerance."""
    return float(np.max(np.abs(ours.astype(np.float32) - ref) - (atol + rtol * np.abs(ref)))) if ref.size else -1.0


def check_prefill(decoder: OrtDecoder, model: Any, cases: list[ReferenceCase], tol: dict[str, Any]) -> CheckResult:
    """Prefill logits (real positions) and every present key/value equal PyTorch's within tolerance."""
    result = CheckResult("parity: prefill logits and presents", hint=_HINT)
    worst_logits = worst_present = 0.0
    top1 = []
    for case in cases:
        ids, mask, pos = case.input_ids, case.attention_mask, case.position_ids
        ref_logits, ref_presents, _ = torch_step(model, ids, mask, pos)
        logits, presents = decoder.run(ids, mask, pos)
        keep = mask.astype(bool)
        ours, ref = logits.astype(np.float32)[keep], ref_logits[keep]
        worst_logits = max(worst_logits, float(np.abs(ours - ref).max()))
        top1.append(float(np.mean(ours.argmax(-1) == ref.argmax(-1))))
        if tol.get("logits_atol") is not None and _excess(ours, ref, tol["logits_atol"], tol["logits_rtol"]) > 0:
            result.problems.append(
                f"{case.name}: prefill logits differ by up to {np.abs(ours - ref).max():.3g} "
                f"(bound {tol['logits_atol']} + {tol['logits_rtol']} x |ref|)"
            )
        # cache positions of padding tokens are never attended to; implementations fill them differently
        # (a fully-masked query row), so only real positions are compared: [B, heads, T, D] -> [real, heads, D]
        for i, (key, value) in enumerate(ref_presents):
            for kind, ref_t in (("key", key), ("value", value)):
                got = presents[f"present.{i}.{kind}"].astype(np.float32).transpose(0, 2, 1, 3)[keep]
                want = ref_t.transpose(0, 2, 1, 3)[keep]
                diff = float(np.abs(got - want).max()) if want.size else 0.0
                worst_present = max(worst_present, diff)
                if (
                    tol.get("present_atol") is not None
                    and _excess(got, want, tol["present_atol"], tol["present_rtol"]) > 0
                ):
                    result.problems.append(f"{case.name}: present.{i}.{kind} differs by up to {diff:.3g}")
    minimum = tol.get("top1_agreement_min", 1.0)
    if min(top1, default=1.0) < minimum:
        result.problems.append(f"prefill top-1 agreement {min(top1):.3f} < {minimum}")
    result.figures = {"max_abs_logits_diff": worst_logits, "max_abs_present_diff": worst_present,
                      "min_top1_agreement": min(top1, default=1.0)}  # fmt: skip
    return result


def check_decode(
    decoder: OrtDecoder, model: Any, cases: list[ReferenceCase], tol: dict[str, Any], stepwise: bool = False
) -> CheckResult:
    """Decoding with a past (length 0 for the first half of the prompt, then > 0 token by token) reproduces the
    full-sequence PyTorch logits at every step. ``stepwise`` (quantized bundles): PyTorch decodes the same steps
    with its own cache instead, since an int8 bundle quantizes each step's activations with that step's own
    per-tensor scale (a token's result depends on which tokens share its forward pass)."""
    result = CheckResult("parity: decode with past = full sequence", hint=_HINT)
    worst, agree = 0.0, []
    for case in cases:
        ids, mask = case.input_ids, case.attention_mask
        split = max(1, ids.shape[1] // 2)
        pos = position_ids_from_mask(mask)
        full = _torch_steps(model, ids, mask, pos, split) if stepwise else torch_step(model, ids, mask, pos)[0]
        logits, present = decoder.run(ids[:, :split], mask[:, :split], pos[:, :split])
        steps = [logits]
        for t in range(split, ids.shape[1]):
            logits, present = decoder.run(
                ids[:, t : t + 1], mask[:, : t + 1], pos[:, t : t + 1], decoder.as_past(present)
            )
            steps.append(logits)
        ours = np.concatenate(steps, axis=1).astype(np.float32)[mask.astype(bool)]
        ref = full[mask.astype(bool)]
        worst = max(worst, float(np.abs(ours - ref).max()))
        agree.append(float(np.mean(ours.argmax(-1) == ref.argmax(-1))))
        if tol.get("logits_atol") is not None and _excess(ours, ref, tol["logits_atol"], tol["logits_rtol"]) > 0:
            result.problems.append(
                f"{case.name}: step-by-step logits differ from the full sequence by up to "
                f"{np.abs(ours - ref).max():.3g} (bound {tol['logits_atol']})"
            )
    if min(agree, default=1.0) < tol.get("top1_agreement_min", 1.0):
        result.problems.append(f"decode top-1 agreement {min(agree):.3f} < {tol['top1_agreement_min']}")
    result.figures = {"max_abs_logits_diff": worst, "min_top1_agreement": min(agree, default=1.0)}
    return result


def _torch_steps(model: Any, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, split: int) -> np.ndarray:
    """PyTorch logits of the prompt's first ``split`` tokens, then of each further token with the cache."""
    logits, _, cache = torch_step(model, ids[:, :split], mask[:, :split], pos[:, :split])
    steps = [logits]
    for t in range(split, ids.shape[1]):
        logits, _, cache = torch_step(model, ids[:, t : t + 1], mask[:, : t + 1], pos[:, t : t + 1], cache)
        steps.append(logits)
    return np.concatenate(steps, axis=1)


def check_greedy(decoder: OrtDecoder, model: Any, cases: list[ReferenceCase], tol: dict[str, Any]) -> CheckResult:
    """N greedy tokens through the KV cache: identical to PyTorch's (fp32), or top-1 agreement (lower precision)."""
    from flexi_export.export.reference import torch_greedy

    result = CheckResult("parity: greedy tokens", hint=_HINT)
    same = total = 0
    for case in cases:
        steps = case.greedy.shape[1]
        _, want = torch_greedy(model, case.input_ids, case.attention_mask, steps)
        _, got = decoder.greedy(case.input_ids, case.attention_mask, steps, case.position_ids)
        same += int((got == want).sum())
        total += want.size
        if tol.get("greedy_tokens") == "identical" and not np.array_equal(got, want):
            first = int(np.argwhere(got != want)[0][1])
            result.problems.append(f"{case.name}: greedy tokens differ from PyTorch's from step {first} of {steps}")
    agreement = same / total if total else 1.0
    bounded = not str(tol.get("greedy_tokens", "")).startswith("not compared")  # quantized: reported only
    if bounded and agreement < tol.get("top1_agreement_min", 1.0):
        result.problems.append(f"greedy token agreement {agreement:.3f} < {tol['top1_agreement_min']}")
    result.figures = {"tokens": total, "agreement": agreement, "bounded": bounded}
    return result


def check_against(bundle: str | Path, model: Any, manifest: dict[str, Any], threads: int = 2) -> list[CheckResult]:
    """Every PyTorch parity check on the bundle's reference prompts (``model``: float32, eval mode); a quantized
    bundle is held to the model with the same quantization applied."""
    tol = manifest["tolerances"]
    cases = load_reference(Path(bundle) / "reference.npz")
    described = device.Bundle(bundle)
    decoder = OrtDecoder(described.model, described.options("recommended", threads), threads)
    model.eval()
    with same_quantization(model, manifest):
        checks = [
            check_prefill(decoder, model, cases, tol),
            check_decode(decoder, model, cases, tol, stepwise=bool(manifest.get("quantization"))),
            check_greedy(decoder, model, cases, tol),
        ]
    if manifest.get("quantization"):
        checks.append(check_quantization_effect(decoder, model, cases))
    return checks


def same_quantization(model: Any, manifest: dict[str, Any]) -> AbstractContextManager[Any]:
    """A context in which ``model`` computes what the (quantized) bundle computes; nothing for a float bundle."""
    if not manifest.get("quantization"):
        return nullcontext(model)
    from flexi_export.export.quant import QuantConfig
    from flexi_export.export.quant_reference import quantized_reference, reference_registry

    config = QuantConfig.from_json(manifest["quantization"])
    spec, registry = reference_registry(model, config, dense=bool(manifest.get("dense")))
    return quantized_reference(model, spec, registry)


def check_quantization_effect(decoder: OrtDecoder, model: Any, cases: list[ReferenceCase]) -> CheckResult:
    """How far the quantized bundle is from the *unquantized* PyTorch model: prefill top-1 agreement and greedy
    token agreement on the reference prompts. Reported, never a failure (the quantization's own cost)."""
    from flexi_export.export.reference import torch_greedy

    result = CheckResult("quantization: agreement with the unquantized model (reported, not bounded)")
    top1, same, total = [], 0, 0
    for case in cases:
        steps = case.greedy.shape[1]
        ref_logits, want = torch_greedy(model, case.input_ids, case.attention_mask, steps)
        logits, got = decoder.greedy(case.input_ids, case.attention_mask, steps, case.position_ids)
        keep = case.attention_mask.astype(bool)
        top1.append(float(np.mean(logits[keep].argmax(-1) == ref_logits[keep].argmax(-1))))
        same += int((got == want).sum())
        total += want.size
    result.figures = {"prefill_top1_agreement": min(top1, default=1.0), "greedy_agreement": same / max(1, total)}
    return result


def check_replay(bundle: str | Path, threads: int = 2) -> CheckResult:
    """``reference.npz`` replayed in a fresh process: prefill logits and greedy tokens vs the export-time model."""
    result = CheckResult("parity: reference.npz replay", hint="pass --against MODEL to compare with PyTorch itself")
    report = run_fresh(bundle, "replay", "--threads", str(threads))
    result.problems = list(report["problems"])
    result.figures = {c["case"]: {k: v for k, v in c.items() if k != "case"} for c in report["cases"]}
    return result
