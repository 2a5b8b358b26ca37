"""Have onnxruntime save a bundle's prepacked weights as external data, so later sessions memory-map them.

Standalone like ``flexi_device.py`` (standard library, numpy and onnxruntime only): prepacked layouts depend on
the CPU (instruction set) and on the onnxruntime version, so run it on the target device, once per bundle:

    python flexi_prepack.py --bundle B [--threads N]

onnxruntime prepacks each MatMul / MatMulNBits / DynamicQuantizeMatMul weight into a heap buffer when a session
is created (int4 MatMulNBits needs it for speed). With ``session.save_external_prepacked_constant_initializers``
it writes the graph it optimised together with those packed buffers into an external data file; a session
created from that graph finds the packed buffers there and maps them instead of packing again.

Writes ``onnx/model.prepacked.onnx`` + ``onnx/model.prepacked.onnx_data`` (renamed into place at the end) and a
``prepacked`` section in ``manifest.json``: which file, onnxruntime version, platform, sizes, and for every
initializer how many packed blobs were stored with it (a weight shared by several nodes should have one).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

PREPACKED_MODEL = "model.prepacked.onnx"
PREPACKED_DATA = "model.prepacked.onnx_data"


def prepack(bundle: str | Path, threads: int = 2) -> dict[str, Any]:
    """Write the prepacked model of ``bundle`` and record it in its manifest; returns the manifest section."""
    import onnxruntime as ort

    folder = Path(bundle)
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    model = folder / manifest["files"]["model"]
    work = model.parent / ".prepack-tmp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        options = ort.SessionOptions()
        for key, value in manifest.get("session_options", {}).get("config_entries", {}).items():
            options.add_session_config_entry(key, value)
        # packing is what is being saved: it must be on whatever the bundle recommends for plain loading
        options.add_session_config_entry("session.disable_prepacking", "0")
        options.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", PREPACKED_DATA)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(work / PREPACKED_MODEL)
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        start = time.perf_counter()
        ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        seconds = time.perf_counter() - start
        section = _describe(work, manifest, seconds)
        for name in (PREPACKED_DATA, PREPACKED_MODEL):  # the data first: a model never points at a missing file
            os.replace(work / name, model.parent / name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    manifest["prepacked"] = section
    tmp = manifest_path.with_name(manifest_path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, manifest_path)
    return section


def _describe(work: Path, manifest: dict[str, Any], seconds: float) -> dict[str, Any]:
    """What was saved: files, sizes, versions, and the packed blobs stored with each initializer."""
    import onnxruntime as ort

    data = work / PREPACKED_DATA
    blobs = _prepacked_blobs(work / PREPACKED_MODEL)
    base = Path(manifest["files"]["model"]).parent.as_posix()
    return {
        "model": f"{base}/{PREPACKED_MODEL}",
        "data": f"{base}/{PREPACKED_DATA}",
        "data_bytes": data.stat().st_size if data.is_file() else 0,
        "data_sha256": _sha256(data) if data.is_file() else None,
        "onnxruntime": ort.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "seconds": seconds,
        "blobs": blobs,
        "blob_bytes": sum(size for sizes in blobs.values() for size in sizes),
        "note": "hardware- and onnxruntime-version-specific: re-run `flexi-export prepack` (or this script) on "
        "the target device; load it with the manifest's session options",
    }


def _prepacked_blobs(model_path: Path) -> dict[str, list[int]]:
    """``{initializer: [bytes of each packed blob saved with it]}`` read from the saved graph's external-data
    entries (``prepacked_<i>`` = ``key|offset;length;alignment``), without the onnx package."""
    blobs: dict[str, list[int]] = {}
    for name, entries in _external_entries(model_path.read_bytes()):
        sizes = [int(value.split("|", 1)[1].split(";")[1]) for key, value in entries if key.startswith("prepacked")]
        if sizes:
            blobs[name] = sizes
    return blobs


def _external_entries(model: bytes) -> list[tuple[str, list[tuple[str, str]]]]:
    """(name, external_data key/value pairs) of every initializer of a serialized ModelProto (a tiny protobuf
    walk: ModelProto.graph = 7, GraphProto.initializer = 5, TensorProto.name = 8, .external_data = 13)."""
    out = []
    for field, graph in _fields(model):
        if field != 7:
            continue
        for gfield, tensor in _fields(graph):
            if gfield != 5:
                continue
            name, entries = "", []
            for tfield, value in _fields(tensor):
                if tfield == 8:
                    name = value.decode()
                elif tfield == 13:
                    pair = dict(_fields(value))
                    entries.append((pair.get(1, b"").decode(), pair.get(2, b"").decode()))
            out.append((name, entries))
    return out


def _fields(buf: bytes) -> list[tuple[int, Any]]:
    """Top-level fields of a protobuf message: (number, bytes for length-delimited / int for varint)."""
    out, pos = [], 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out.append((number, value))
    return out


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if not (Path(args.bundle) / "manifest.json").is_file():
        print(f"error: {args.bundle} is not a flexi-export bundle (manifest.json missing)", file=sys.stderr)
        return 2
    json.dump(prepack(args.bundle, args.threads), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
