"""scripts/bench_fast.py's report logic: same-round ratios, the memory bound and the goal lines (the probes
themselves are device_tests' ``probe``, tested in tests/verify)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_fast  # noqa: E402


def _probe(mode: str, runs: list[float], anon: float, rounds: list[int] | None = None) -> dict[str, Any]:
    ordered = sorted(runs)
    return {
        "mode": mode,
        "decode_ms": ordered[len(ordered) // 2],
        "decode_ms_runs": runs,
        "rounds": rounds if rounds is not None else list(range(len(runs))),
        "anon_load_mib": anon,
        "kv_mib": 1.0,
        "logits_mib": 2.0,
    }


def _row(model: str, dtype: str, target: str, *probes: dict[str, Any]) -> dict[str, Any]:
    return {"model": model, "dtype": dtype, "target": target, "probes": list(probes)}


def test_same_round_ratio_ignores_the_drift_between_rounds() -> None:
    # both sessions twice as slow in round 1: the ratio of medians moves, the same-round ratio does not
    a = _probe("default", [11.0, 22.0, 11.0], 0)
    b = _probe("default", [10.0, 20.0, 10.0], 0)
    assert bench_fast._paired(a, b).startswith("1.10 (1.10-1.10 over 3 rounds)")
    once = _probe("no-prepack", [30.0], 0, rounds=[0])
    assert bench_fast._paired(once, b).startswith("3.00 (3.00-3.00 over 1 rounds)")
    assert bench_fast._paired(_probe("x", [1.0], 0, rounds=[5]), b) == "n/a"


def test_memory_bound_is_kv_plus_logits_plus_32_mib() -> None:
    assert bench_fast._low_memory(_probe("prepacked", [1.0], 35.0))
    assert not bench_fast._low_memory(_probe("default", [1.0], 35.1))


def test_goal_lines_pick_the_fastest_session_and_the_fastest_memory_mapped_one() -> None:
    data = {
        "rows": [
            _row("genai builder", "fp32", "builder", _probe("default", [20.0, 20.0, 20.0], 470.0)),
            _row(
                "dense",
                "fp32",
                "cpu",
                _probe("default", [18.0, 18.0, 18.0], 470.0),
                _probe("prepacked", [21.0, 21.0, 21.0], 3.0),
            ),
            _row("flexi", "fp32", "cpu", _probe("default", [18.5, 18.5, 18.5], 400.0)),
            _row("dense", "fp32", "portable", _probe("default", [27.0, 27.0, 27.0], 470.0)),
        ]
    }
    lines = bench_fast.verdicts(data)
    assert any(
        "any session: our dense cpu `default` 18.00 ms / builder `default` 20.00 ms = **0.90**" in x and "met" in x
        for x in lines
    )
    mapped = [x for x in lines if "memory-mapped" in x]
    assert any("`prepacked` 21.00 ms" in x and "**1.05**" in x and "missed" in x for x in mapped)
    flexi = "any session: Flexi cpu `default` 18.50 ms / dense cpu `default` 18.00 ms = **1.03**"
    assert any(flexi in x for x in lines)
    # Flexi has no memory-mapped session here: no memory-mapped Flexi line rather than a wrong one
    assert not any("Flexi" in x for x in mapped)
    assert "- fp32: dense portable / cpu decode = 1.50x" in lines


def test_markdown_reports_packed_blobs_per_shared_initializer_and_their_residency() -> None:
    probe = {**_probe("prepacked", [4.0], 9.0), "prefill_ms": 80.0, "peak_mib": 200.0, "anon_end_mib": 20.0}
    probe |= {"pss_end_mib": 190.0, "weights_pss_mib": 95.5}
    row = _row("flexi", "int4", "cpu", probe) | {"weights_mib": 80.6, "prepacked_mib": 96.0}
    row["shared_packed_blobs"] = {"a.qkv_proj.weight.qweight": [7], "a.qkv_proj.weight.scales": []}
    text = bench_fast.markdown({"config": {"threads": 2, "prefill": 64, "decode": 64, "repeats": 1}, "rows": [row]})
    assert text.startswith(bench_fast.BEGIN) and text.rstrip().endswith(bench_fast.END)
    assert "| flexi | int4 | cpu | 80.6 | prepacked | 4.0 | 80 | 200 | 9.0 | 20.0 | 190 | 1.0 |" in text
    assert "packed blobs saved per such initializer: qweight 1, scales 0 (MatMulNBits packs" in text
    assert "prepacked data file 96.0 MiB, resident (PSS) after decoding 95.5 MiB" in text
