"""Replay a bundle's ``reference.npz`` with onnxruntime and numpy only (no torch).

The exporter runs this in a child process (``python -m flexi_export.verify.replay BUNDLE TOLERANCES``), so
onnxruntime's pages of the freshly written weights never add to the export's own peak memory; the same
functions serve any later verification.

``reference.npz`` layout: ``cases`` (names), then per case ``{case}.input_ids``, ``{case}.attention_mask``,
``{case}.position_ids`` (int64), ``{case}.logits`` (float32 prefill logits), ``{case}.greedy`` (int64
``[B, 16]``), and the numeric tolerances as ``tol.<name>``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REFERENCE_NAME = "reference.npz"


@dataclass(frozen=True)
class ReferenceCase:
    """One golden case (arrays are numpy, batch first)."""

    name: str
    input_ids: np.ndarray
    attention_mask: np.ndarray
    position_ids: np.ndarray
    logits: np.ndarray
    greedy: np.ndarray


def load_reference(path: str | Path) -> list[ReferenceCase]:
    """Read the cases of a ``reference.npz``."""
    with np.load(path, allow_pickle=False) as data:
        return [
            ReferenceCase(
                name=str(name),
                input_ids=data[f"{name}.input_ids"],
                attention_mask=data[f"{name}.attention_mask"],
                position_ids=data[f"{name}.position_ids"],
                logits=data[f"{name}.logits"],
                greedy=data[f"{name}.greedy"],
            )
            for name in data["cases"]
        ]


def compare_prefill(
    logits: np.ndarray, reference: ReferenceCase, tolerances: dict[str, Any]
) -> tuple[float, float, list[str]]:
    """Compare prefill ``logits`` with a reference case on its non-padding positions.

    Returns ``(max abs diff, top-1 agreement, problems)``; fp32 bundles are held to ``|a - b| <= atol + rtol |b|``,
    every bundle to the top-1 agreement bound.
    """
    keep = reference.attention_mask.astype(bool)
    ours = logits.astype(np.float32)[keep]
    ref = reference.logits[keep]
    diff = float(np.max(np.abs(ours - ref))) if ref.size else 0.0
    agreement = float(np.mean(ours.argmax(-1) == ref.argmax(-1))) if ref.size else 1.0
    problems = []
    atol, rtol = tolerances.get("logits_atol"), tolerances.get("logits_rtol")
    if atol is not None and np.any(np.abs(ours - ref) > atol + (rtol or 0.0) * np.abs(ref)):
        problems.append(f"{reference.name}: prefill logits differ by up to {diff:.3g} (atol {atol}, rtol {rtol})")
    minimum = tolerances.get("top1_agreement_min")
    if minimum is not None and agreement < minimum:
        problems.append(f"{reference.name}: top-1 agreement {agreement:.3f} < {minimum}")
    return diff, agreement, problems


def replay_prefill(bundle: str | Path, tolerances: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Run every reference case's prompt through onnxruntime; ``(figures per case, problems)``."""
    from flexi_export.verify.ort_runner import OrtDecoder

    decoder = OrtDecoder(bundle, threads=1)
    figures: dict[str, Any] = {}
    problems: list[str] = []
    for case in load_reference(Path(bundle) / REFERENCE_NAME):
        logits, _ = decoder.run(case.input_ids, case.attention_mask, case.position_ids)
        diff, agreement, found = compare_prefill(logits, case, tolerances)
        figures[case.name] = {"max_abs_logits_diff": diff, "top1_agreement": agreement}
        problems.extend(found)
    return figures, problems


def main(argv: list[str]) -> int:
    """``python -m flexi_export.verify.replay BUNDLE TOLERANCES_JSON``: print ``{"figures", "problems"}``."""
    bundle, tolerances = argv[0], json.loads(argv[1])
    figures, problems = replay_prefill(bundle, tolerances)
    print(json.dumps({"figures": figures, "problems": problems}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
