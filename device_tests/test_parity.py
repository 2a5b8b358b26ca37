"""The bundle reproduces the PyTorch model's golden outputs recorded at export time (reference.npz)."""

from __future__ import annotations

import flexi_device


def test_reference_replay(bundle, threads, summary):
    result = flexi_device.replay(bundle.path, threads=threads)
    for case in result["cases"]:
        summary.append(
            (f"parity {case['case']}", f"max |logits diff| {case['max_abs_logits_diff']:.2e}, top-1 "
             f"{case['top1_agreement']:.1%}, greedy {case['greedy_tokens']} tokens "
             f"{'identical' if case['greedy_identical'] else 'DIFFERENT'}")
        )  # fmt: skip
    assert result["passed"], "; ".join(result["problems"])
