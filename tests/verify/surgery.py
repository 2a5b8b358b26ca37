"""Bundle surgery for negative tests: damage a valid bundle in one precise way, keeping everything else valid
(the manifest's hashes are updated unless a test wants them stale)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

ALIGN = 1 << 16


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def load(bundle: Path) -> tuple[onnx.ModelProto, dict]:
    proto = onnx.load(str(bundle / "onnx" / "model.onnx"), load_external_data=False)
    return proto, json.loads((bundle / "manifest.json").read_text())


def save(bundle: Path, proto: onnx.ModelProto, manifest: dict) -> None:
    onnx.save(proto, str(bundle / "onnx" / "model.onnx"))
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=1))


def row(manifest: dict, name: str) -> dict:
    return next(r for r in manifest["initializers"] if r["name"] == name)


def read_weight(bundle: Path, manifest: dict, name: str) -> np.ndarray:
    r = row(manifest, name)
    data = (bundle / "onnx" / "model.onnx_data").read_bytes()[r["offset"] : r["offset"] + r["bytes"]]
    return np.frombuffer(data, dtype=np.float32).reshape(r["shape"]).copy()


def append_weight(
    bundle: Path, proto: onnx.ModelProto, manifest: dict, name: str, array: np.ndarray, like: dict
) -> None:
    """Store ``array`` as a new external initializer ``name`` (64 KiB aligned) with a manifest row like ``like``."""
    data_path = bundle / "onnx" / "model.onnx_data"
    offset = -(-data_path.stat().st_size // ALIGN) * ALIGN
    raw = np.ascontiguousarray(array, dtype=np.float32).tobytes()
    with open(data_path, "r+b") as f:
        f.seek(offset)
        f.write(raw)
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(array.shape))
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "model.onnx_data"), ("offset", str(offset)), ("length", str(len(raw)))):
        tensor.external_data.add(key=key, value=value)
    proto.graph.initializer.append(tensor)
    manifest["initializers"].append(
        {**like, "name": name, "shape": list(array.shape), "bytes": len(raw), "offset": offset,
         "sha256": hashlib.sha256(raw).hexdigest(), "consumers": []}
    )  # fmt: skip


def redirect(proto: onnx.ModelProto, manifest: dict, old: str, new: str, node_name: str) -> None:
    """Make node ``node_name`` read ``new`` instead of ``old``."""
    node = next(n for n in proto.graph.node if n.name == node_name)
    node.input[list(node.input).index(old)] = new
    row(manifest, old)["consumers"].remove(node_name)
    row(manifest, new)["consumers"].append(node_name)


def duplicate_shared_weight(bundle: Path, name: str) -> str:
    """Write a shared weight a second time and make its second consumer read the copy."""
    proto, manifest = load(bundle)
    original = row(manifest, name)
    copy = name + ".copy"
    append_weight(bundle, proto, manifest, copy, read_weight(bundle, manifest, name), original)
    redirect(proto, manifest, name, copy, original["consumers"][-1])
    save(bundle, proto, manifest)
    return copy


def transpose_shared_weights(bundle: Path, names: list[str]) -> None:
    """Store each weight as ``[out, in]`` and feed every consumer through a Transpose node (the layout tracing
    exporters produce): onnxruntime folds each Transpose into a heap copy."""
    proto, manifest = load(bundle)
    for name in names:
        original = row(manifest, name)
        stored = name + ".t"
        append_weight(bundle, proto, manifest, stored, read_weight(bundle, manifest, name).T, original)
        proto.graph.node.insert(0, helper.make_node("Transpose", [stored], [name + ".transposed"], name=f"/{name}/T"))
        row(manifest, stored)["consumers"].append(f"/{name}/T")
        for node in proto.graph.node:
            if node.name in original["consumers"]:
                node.input[list(node.input).index(name)] = name + ".transposed"
        manifest["initializers"].remove(original)
        proto.graph.initializer.remove(next(t for t in proto.graph.initializer if t.name == name))
    save(bundle, proto, manifest)


def tamper_weight(bundle: Path, name: str, factor: float, update_manifest: bool) -> None:
    """Scale a stored weight in place; optionally keep the manifest's hash in step (a consistent but wrong
    bundle) or leave it stale (a bundle that no longer matches its manifest)."""
    proto, manifest = load(bundle)
    r = row(manifest, name)
    raw = (read_weight(bundle, manifest, name) * factor).astype(np.float32).tobytes()
    with open(bundle / "onnx" / "model.onnx_data", "r+b") as f:
        f.seek(r["offset"])
        f.write(raw)
    if update_manifest:
        r["sha256"] = hashlib.sha256(raw).hexdigest()
        save(bundle, proto, manifest)
