"""The exporter's own checks on a freshly written bundle, before it is renamed into place.

1. ``onnx.checker`` (full check, by path so the external data is validated) and strict shape inference;
2. onnxruntime replays the reference prompts: prefill logits within the dtype's tolerance of the torch model
   (fp32), or top-1 agreement above the bound (fp16).

A failure raises one :class:`~flexi_export.errors.ExportError` naming every problem; the caller's atomic
output folder then leaves nothing behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx

from flexi_export.errors import ExportError
from flexi_export.export.reference import ReferenceCase


def check_onnx(model_path: Path) -> None:
    """``onnx.checker`` full check and strict shape inference of the graph at ``model_path``."""
    try:
        onnx.checker.check_model(str(model_path), full_check=True)
        proto = onnx.load(str(model_path), load_external_data=False)
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"the exported graph is not valid ONNX: {first}") from None


def compare_prefill(
    logits: np.ndarray, reference: ReferenceCase, tolerances: dict[str, Any]
) -> tuple[float, float, list[str]]:
    """Compare ONNX prefill ``logits`` with a reference case on its non-padding positions.

    Returns ``(max abs diff, top-1 agreement, problems)``.
    """
    keep = reference.attention_mask.astype(bool)
    ours = logits.astype(np.float32)[keep]
    ref = reference.logits[keep]
    diff = float(np.max(np.abs(ours - ref))) if ref.size else 0.0
    agreement = float(np.mean(ours.argmax(-1) == ref.argmax(-1))) if ref.size else 1.0
    problems = []
    atol, rtol = tolerances.get("logits_atol"), tolerances.get("logits_rtol")
    if atol is not None:
        bound = atol + (rtol or 0.0) * np.abs(ref)
        if np.any(np.abs(ours - ref) > bound):
            problems.append(f"{reference.name}: prefill logits differ by up to {diff:.3g} (atol {atol}, rtol {rtol})")
    minimum = tolerances.get("top1_agreement_min")
    if minimum is not None and agreement < minimum:
        problems.append(f"{reference.name}: top-1 agreement {agreement:.3f} < {minimum}")
    return diff, agreement, problems


def check_reference(bundle_dir: Path, cases: list[ReferenceCase], tolerances: dict[str, Any]) -> dict[str, Any]:
    """Run the reference prompts through onnxruntime; raise :class:`ExportError` beyond tolerance.

    Returns the measured figures (max abs logits diff and top-1 agreement per case).
    """
    from flexi_export.verify.ort_runner import OrtDecoder

    decoder = OrtDecoder(bundle_dir)
    figures: dict[str, Any] = {}
    problems: list[str] = []
    for case in cases:
        logits, _ = decoder.run(case.input_ids, case.attention_mask, case.position_ids)
        diff, agreement, found = compare_prefill(logits, case, tolerances)
        figures[case.name] = {"max_abs_logits_diff": diff, "top1_agreement": agreement}
        problems.extend(found)
    if problems:
        raise ExportError("the exported graph does not reproduce the torch model: " + "; ".join(problems))
    return figures
