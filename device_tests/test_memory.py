"""Memory on the device: weights stay memory-mapped (not copied to the heap), resident once, within budget.

Each measurement runs in a fresh Python process (flexi_device.run_fresh) so that nothing earlier in this
process inflates the figures; bounds apply to the increase over the baseline taken just before the session.
"""

from __future__ import annotations

import flexi_device
import pytest

MiB = flexi_device.MiB
#: Heap that onnxruntime itself needs besides KV cache and activations (allocator arenas, kernels, graph).
ALLOWANCE = 48 * MiB


@pytest.fixture(scope="module")
def probe(bundle, threads):
    if not flexi_device.proc_available():
        pytest.skip("memory checks read Linux /proc (VmHWM, RssAnon, smaps); not available on this system")
    return flexi_device.run_fresh(bundle.path, "probe", "--threads", str(threads))


def _weights(bundle) -> tuple[int, int]:
    """(all unique weight bytes, bytes of weights read by MatMul/Gemm: fully touched by one forward pass, except
    prepacked int4 weights, whose file pages onnxruntime releases after packing them onto the heap)."""
    rows = bundle.manifest["initializers"]
    total = sum(r["bytes"] for r in rows)
    dense_read = flexi_device.matmul_read_bytes(bundle.manifest)
    return total, dense_read - flexi_device.prepacked_bytes(bundle.manifest, released_only=True)


def test_weights_stay_out_of_the_heap(bundle, probe, summary):
    anon = probe["after_decode"]["RssAnon"] - probe["baseline"]["RssAnon"]
    # int4 with prepacking on: the packed MatMulNBits weights are on the heap, once
    packed = flexi_device.PACKED_FACTOR * flexi_device.prepacked_bytes(bundle.manifest)
    bound = probe["kv_cache_bytes"] + probe["logits_bytes"] + ALLOWANCE + packed
    total, _ = _weights(bundle)
    summary.append(("anonymous memory", f"+{anon / MiB:.1f} MiB after decode (bound {bound / MiB:.1f} MiB = KV "
                    f"{probe['kv_cache_bytes'] / MiB:.1f} + logits {probe['logits_bytes'] / MiB:.1f} + packed int4 "
                    f"{packed / MiB:.1f} + {ALLOWANCE / MiB:.0f}); weights {total / MiB:.1f} MiB"))  # fmt: skip
    assert anon <= bound, f"anonymous memory grew by {anon / MiB:.1f} MiB > {bound / MiB:.1f} MiB: a weight was copied"


def test_weights_are_resident_once(bundle, probe, summary):
    weights = probe["after_decode"]["weights"]
    total, dense_read = _weights(bundle)
    summary.append(("weight residency", f"PSS {weights['pss'] / MiB:.1f} MiB, RSS {weights['rss'] / MiB:.1f} MiB of "
                    f"{total / MiB:.1f} MiB unique ({weights['mappings']} mappings)"))  # fmt: skip
    assert weights["mappings"] > 0, "the weight file is not memory-mapped"
    assert weights["pss"] <= total * 1.05, "weights are resident more than once"
    assert weights["pss"] >= dense_read * 0.95, "weights read by MatMul/Gemm are not all resident after a forward"


def test_peak_within_budget(probe, budget_mb, summary):
    peak = probe["after_decode"]["VmHWM"]
    summary.append(("peak memory", f"{peak / MiB:.1f} MiB (VmHWM, whole process)"
                    + (f", budget {budget_mb:.0f} MiB" if budget_mb else "")))  # fmt: skip
    summary.append(("speed", f"load {probe['load_s']:.2f} s, prefill {probe['prefill_tokens']} tokens "
                    f"{probe['prefill_ms']:.0f} ms, decode {probe['decode_ms_per_token']:.1f} ms/token"))  # fmt: skip
    if budget_mb is None:
        pytest.skip("no --memory-budget-mb given")
    assert peak <= budget_mb * MiB, f"peak {peak / MiB:.1f} MiB exceeds the budget of {budget_mb:.0f} MiB"
