"""The exporter's own checks on a freshly written bundle, before it is renamed into place.

1. ``onnx.checker`` (full check, by path so the external data is validated) and strict shape inference;
2. onnxruntime replays the reference prompts: prefill logits within the dtype's tolerance of the torch model
   (fp32), top-1 agreement above the bound (every dtype). This runs in a child process
   (``device_tests/flexi_device.py``, the same code the device tests run): onnxruntime maps and touches every
   weight page, and in the exporter's own process those pages would add a second weight-sized amount to its
   peak next to the torch model.

A failure raises one :class:`~flexi_export.errors.ExportError` naming every problem; the caller's atomic
output folder then leaves nothing behind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx

from flexi_export.errors import ExportError
from flexi_export.verify.runtime import run_fresh


def check_onnx(model_path: Path) -> None:
    """``onnx.checker`` full check and strict shape inference of the graph at ``model_path``."""
    try:
        onnx.checker.check_model(str(model_path), full_check=True)
        proto = onnx.load(str(model_path), load_external_data=False)
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"the exported graph is not valid ONNX: {first}") from None


def check_reference(bundle_dir: Path, tolerances: dict[str, Any]) -> dict[str, Any]:
    """Replay ``reference.npz`` (prefill logits) with onnxruntime in a fresh process; raise :class:`ExportError`
    beyond tolerance. Returns the measured figures per case (max abs logits diff and top-1 agreement)."""
    try:
        args = ("--no-greedy", "--threads", "1", "--tolerances", json.dumps(tolerances))
        report = run_fresh(bundle_dir, "replay", *args)
    except RuntimeError as exc:
        raise ExportError(f"onnxruntime could not run the exported graph: {exc}") from None
    if report["problems"]:
        raise ExportError("the exported graph does not reproduce the torch model: " + "; ".join(report["problems"]))
    return {c.pop("case"): c for c in report["cases"]}
