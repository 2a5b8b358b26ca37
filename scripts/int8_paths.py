#!/usr/bin/env python
"""Which int8 weight path keeps ONE resident copy under onnxruntime: the measurement behind the int8 bundle's design.

One int8 weight ``[K, N]`` (default 2048 x 4096 = 8 MiB), read by two nodes (a weight shared by two blocks), as
external data (memory-mapped), in a fresh process per case. Cases:

- ``matmulinteger``: ``DynamicQuantizeLinear`` -> ``MatMulInteger(x_q, W_int8)`` -> Cast -> Mul(scales) (standard
  ops; what int8 bundles use);
- ``qdq``: ``DequantizeLinear(W_int8, scales)`` -> ``MatMul`` (the QDQ format of onnxruntime's quantizer);
- ``nbits8``: ``com.microsoft::MatMulNBits`` with ``bits=8`` (contrib op, blockwise, block 32).

Each with prepacking on and off: heap (RssAnon) growth over the baseline after session creation and one run, the
PSS of the weight file's mappings, and ms per run for a single token (median of 20).

Usage: ``.venv/bin/python scripts/int8_paths.py [--k 2048 --n 4096]`` (prints a Markdown table).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20


def build(case: str, k: int, n: int, folder: Path) -> Path:
    """Write the two-consumer graph of ``case`` with its weight as external data."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    sys.path.insert(0, str(ROOT))
    from flexi_export.export.quant import COLUMNS, QuantConfig, quantize

    rng = np.random.default_rng(0)
    w = rng.standard_normal((n, k)).astype(np.float32)
    nodes, inits = [], []
    if case == "nbits8":
        # 8-bit blockwise codes [N, blocks, 32] with MatMulNBits' default zero point 128
        blocks = k // 32
        x = w.reshape(n, blocks, 32)
        scale = np.abs(x).max(-1) / 127.0
        codes = (np.clip(np.rint(x / scale[..., None]), -127, 127) + 128).astype(np.uint8)
        parts = {"qweight": codes, "scales": scale.astype(np.float32)}
        inits = [numpy_helper.from_array(v, f"w.{p}") for p, v in parts.items()]
        for i in range(2):
            attrs = {"K": k, "N": n, "bits": 8, "block_size": 32, "accuracy_level": 4}
            inputs = ["x", "w.qweight", "w.scales"]
            nodes.append(helper.make_node("MatMulNBits", inputs, [f"y{i}"], domain="com.microsoft", **attrs))
    else:
        parts = quantize(w, COLUMNS, QuantConfig("int8"))
        inits = [
            numpy_helper.from_array(parts["qweight"], "w.qweight"),
            numpy_helper.from_array(parts["scales"], "w.scales"),
        ]
        for i in range(2):
            if case == "qdq":
                deq = helper.make_node("DequantizeLinear", ["w.qweight", "w.scales"], [f"wd{i}"], axis=1)
                nodes += [deq, helper.make_node("MatMul", ["x", f"wd{i}"], [f"y{i}"])]
            else:
                nodes += [
                    helper.make_node("DynamicQuantizeLinear", ["x"], [f"xq{i}", f"xs{i}", f"xz{i}"]),
                    helper.make_node("MatMulInteger", [f"xq{i}", "w.qweight", f"xz{i}"], [f"acc{i}"]),
                    helper.make_node("Cast", [f"acc{i}"], [f"accf{i}"], to=TensorProto.FLOAT),
                    helper.make_node("Mul", [f"xs{i}", "w.scales"], [f"s{i}"]),
                    helper.make_node("Mul", [f"accf{i}", f"s{i}"], [f"y{i}"]),
                ]
    graph = helper.make_graph(nodes, case, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(2)],
                              initializer=inits)  # fmt: skip
    opsets = [helper.make_opsetid("", 18)] + ([helper.make_opsetid("com.microsoft", 1)] if case == "nbits8" else [])
    model = helper.make_model(graph, opset_imports=opsets)
    path = folder / f"{case}.onnx"
    # unaligned offsets are still memory-mapped on Linux (docs/export.md); the bundles align them anyway
    onnx.save(model, str(path), save_as_external_data=True, location=f"{case}.onnx_data", size_threshold=0)
    return path


def child(path: str, prepack: bool, k: int) -> dict:
    """Runs in a fresh process: heap growth, weight-file PSS, ms per run."""
    import onnxruntime as ort

    def status() -> dict:
        out = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon",):
                out[key] = int(value.split()[0]) * 1024
        return out

    def weight_pss() -> int:
        total, inside = 0, False
        for line in Path("/proc/self/smaps").read_text().splitlines():
            head = line.split()
            if head and "-" in head[0] and ":" not in head[0]:
                inside = len(head) >= 6 and head[5].endswith("_data")
            elif inside and head[0] == "Pss:":
                total += int(head[1]) * 1024
        return total

    base = status()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.enable_cpu_mem_arena = False
    options.add_session_config_entry("session.disable_prepacking", "0" if prepack else "1")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((1, k)).astype(np.float32)
    session.run(None, {"x": x})
    times = []
    for _ in range(20):
        start = time.perf_counter()
        session.run(None, {"x": x})
        times.append((time.perf_counter() - start) * 1000)
    return {"anon_growth": status()["RssAnon"] - base["RssAnon"], "weight_pss": weight_pss(),
            "ms": float(np.median(times))}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=2048)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1] == "1", args.k)))
        return 0
    import onnxruntime

    print(f"int8 weight {args.k} x {args.n} ({args.k * args.n / MiB:.1f} MiB) read by 2 nodes; onnxruntime "
          f"{onnxruntime.__version__}; heap = RssAnon growth after session creation + 1 run; 2 threads\n")  # fmt: skip
    print("| path | prepacking | heap MiB | weight-file PSS MiB | ms / run (2 products, 1 token) |")
    print("|---|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for case in ("matmulinteger", "qdq", "nbits8"):
            path = build(case, args.k, args.n, Path(tmp))
            for prepack in (False, True):
                command = [sys.executable, __file__, "--k", str(args.k), "--child", str(path), "1" if prepack else "0"]
                out = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
                print(f"| {case} | {'on' if prepack else 'off'} | {out['anon_growth'] / MiB:.1f} "
                      f"| {out['weight_pss'] / MiB:.1f} | {out['ms']:.2f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
