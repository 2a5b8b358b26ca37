"""Structure checks of an exported bundle: is every weight stored once, in place, with the right values?

Each check is a function returning a :class:`CheckResult` (name, problems, figures) and never raises for a bad
bundle, so a report can list every failure at once. :func:`check_structure` runs them all.

- :func:`check_initializers`: exactly one initializer per unique parameter, named after its owner; every
  initializer is read, and read by exactly the nodes the manifest lists;
- :func:`check_duplicates`: no two initializers hold the same bytes unless the plan says they are distinct
  tensors (two zero-initialised ``lora_B`` are equal by value and distinct by plan);
- :func:`check_no_weight_ops`: no Transpose / Reshape / Cast / DequantizeLinear takes an initializer (or a
  Constant as data): onnxruntime would fold each into a heap copy of the weight;
- :func:`check_external_data`: weights are external, aligned, inside the file, not overlapping, and the file
  is at most the unique weight bytes x 1.01 plus alignment padding;
- :func:`check_values`: the stored tensors equal the source model's tensors (not just counts and dtypes; a
  quantized matrix's parts equal the quantizer's output for its source, compared dequantized), packs and
  block-diagonal adapter matrices (``--target cpu``) rebuilt from their parts;
- :func:`check_ort_optimized`: the graph onnxruntime saves after its optimisations keeps the same weights
  and gained no weight-sized initializer (no folded copy).
"""

from __future__ import annotations

import hashlib
import itertools
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import ModelProto, TensorProto

from flexi_export.export.external_data import alignment_for, padding_budget, read_external
from flexi_export.export.spec import PACKED_TRANSFORMS

#: Ops that onnxruntime constant-folds into a new heap tensor when their data input is a constant.
FOLDED_OPS = ("Transpose", "Reshape", "Cast", "DequantizeLinear")
#: A new initializer at least this large in onnxruntime's optimised graph is a copy of a weight, not a constant.
COPY_BYTES = 1024
DATA_FILE = "model.onnx_data"


@dataclass
class CheckResult:
    """The outcome of one check: its problems (each naming the measured value and the bound), the figures it
    measured, what to try when it fails, or why it was skipped."""

    name: str
    problems: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    hint: str = ""
    skipped: str = ""

    @property
    def passed(self) -> bool:
        """True when the check found no problem (a skipped check passes; reports say it was skipped)."""
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"name": self.name, "passed": self.passed, "problems": self.problems, "figures": self.figures,
                "hint": self.hint, "skipped": self.skipped}  # fmt: skip


def external_weights(proto: ModelProto) -> dict[str, TensorProto]:
    """The initializers stored as external data, by name."""
    return {t.name: t for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL}


def _rows(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in manifest["initializers"]}


def _readers(proto: ModelProto, names: set[str]) -> dict[str, set[str]]:
    readers: dict[str, set[str]] = defaultdict(set)
    for node in proto.graph.node:
        for name in node.input:
            if name in names:
                readers[name].add(node.name)
    return readers


def check_initializers(proto: ModelProto, manifest: dict[str, Any], model: Any | None = None) -> CheckResult:
    """One initializer per unique parameter (by the plan map), each read by exactly its manifest consumers."""
    result = CheckResult("one initializer per parameter")
    names = [t.name for t in proto.graph.initializer]
    for name in sorted({n for n in names if names.count(n) > 1}):
        result.problems.append(f"initializer {name} is defined {names.count(name)} times")
    weights = external_weights(proto)
    rows = _rows(manifest)
    inline = {row["name"] for row in manifest.get("inline_initializers", [])}
    for t in proto.graph.initializer:
        if t.name not in weights and t.name not in inline:
            result.problems.append(f"initializer {t.name} is embedded in model.onnx; weights must be external data")
    for name in sorted(set(weights) - set(rows)):
        result.problems.append(f"initializer {name} is not in the manifest (an undeclared copy?)")
    for name in sorted(set(rows) - set(weights)):
        result.problems.append(f"manifest row {name} has no external initializer")
    readers = _readers(proto, set(weights))
    for name in sorted(set(weights) & set(rows)):
        declared = set(rows[name]["consumers"])
        if not readers.get(name):
            result.problems.append(f"initializer {name} is read by no node")
        elif readers[name] != declared:
            result.problems.append(f"{name} is read by {sorted(readers[name])}, the manifest says {sorted(declared)}")
    if model is not None:
        result.problems.extend(_parameter_problems(set(weights), rows, manifest, model))
    result.figures = {
        "initializers": len(weights),
        "shared": sum(1 for r in rows.values() if len(r["consuming_blocks"]) > 1),
    }
    return result


def layout_zero_bytes(manifest: dict[str, Any]) -> int:
    """Bytes the bundle stores beyond its parameters by layout: the zero blocks of block-diagonal adapter
    matrices (``--target cpu``), each ``bytes - sum(part elements) x itemsize``."""
    total = 0
    for row in manifest["initializers"]:
        if row["transform"] == "block_diag":
            itemsize = row["bytes"] // max(1, int(np.prod(row["shape"])))
            total += row["bytes"] - itemsize * sum(int(np.prod(part["shape"])) for part in row["parts"])
    return total


def _parameter_problems(
    weights: set[str], rows: dict[str, dict[str, Any]], manifest: dict[str, Any], model: Any
) -> list[str]:
    params = {name for name, _ in model.named_parameters()}
    problems = []
    if manifest.get("dense"):  # every block holds its own tensors: sources must exist, identities be unique
        for row in rows.values():
            problems += [
                f"{row['name']} comes from {s}, which the model does not have" for s in row["source"] if s not in params
            ]
        return problems
    # a quantized matrix is stored as parts named after the parameter (``<name>.qweight`` ...)
    quantized = {name: row["source"][0] for name, row in rows.items() if row.get("quantization")}
    # a packed matrix (--target cpu) stands for its member parameters (quantized packs: all of its sources)
    packed = {name: row["source"] for name, row in rows.items() if row["transform"] in PACKED_TRANSFORMS}
    covered = (weights - set(quantized) - set(packed)) | set(quantized.values())
    covered |= {source for sources in packed.values() for source in sources}
    for name in sorted(params - covered):
        problems.append(f"parameter {name} has no initializer")
    for name in sorted(weights - params - set(quantized) - set(packed)):
        problems.append(f"initializer {name} is not a parameter of the model")
    for name in sorted(n for n, source in quantized.items() if source not in params and n not in packed):
        problems.append(f"{name} quantizes {quantized[name]}, which is not a parameter of the model")
    return problems


def check_duplicates(proto: ModelProto, data_path: Path, manifest: dict[str, Any]) -> CheckResult:
    """No duplicate contents among initializers, except tensors the plan says are distinct parameters."""
    result = CheckResult("no duplicate contents")
    rows = _rows(manifest)
    groups: dict[tuple[Any, ...], list[str]] = defaultdict(list)
    for name, tensor in external_weights(proto).items():
        groups[(tensor.data_type, tuple(tensor.dims), _sha256(read_external(data_path, tensor)))].append(name)
    equal_groups = [sorted(g) for g in groups.values() if len(g) > 1]
    for group in equal_groups:
        declared = [rows.get(n) for n in group]
        if any(r is None for r in declared):
            result.problems.append(f"{', '.join(group)} hold the same bytes and are not all declared tensors")
            continue
        # a quantized part is identified by its matrix and its part (two matrices' zero points may be equal)
        # a pack (--target cpu) is identified by its member parameters (equal zero biases of two packs pass)
        parameters = {
            (
                tuple(r["source"]) if r["transform"] in PACKED_TRANSFORMS else r["source"][0],
                (r.get("quantization") or {}).get("part"),
            )
            for r in declared
            if r["transform"] in ("identity", *PACKED_TRANSFORMS)
        }
        if len(parameters) < len(group) and not manifest.get("dense"):
            result.problems.append(f"{', '.join(group)} hold the same bytes but are not distinct parameters (a copy)")
    result.figures = {"equal_by_value_groups": len(equal_groups)}
    return result


def check_no_weight_ops(proto: ModelProto) -> CheckResult:
    """No Transpose / Reshape / Cast / DequantizeLinear reads an initializer (or a Constant as its data)."""
    result = CheckResult("no folded ops on weights")
    initializers = {t.name for t in proto.graph.initializer}
    constants = {out for node in proto.graph.node if node.op_type == "Constant" for out in node.output}
    for node in proto.graph.node:
        if node.op_type not in FOLDED_OPS:
            continue
        for position, name in enumerate(node.input):
            if name in initializers or (position == 0 and name in constants):
                result.problems.append(f"{node.op_type} node {node.name} reads the constant {name}")
    return result


def check_external_data(
    proto: ModelProto, data_path: Path, manifest: dict[str, Any], unique_parameter_bytes: int | None = None
) -> CheckResult:
    """External weights are aligned, inside the file, non-overlapping; the file holds no more than they need."""
    result = CheckResult("external data")
    if not data_path.is_file():
        result.problems.append(f"{data_path} is missing")
        return result
    size = data_path.stat().st_size
    spans = []
    for name, tensor in external_weights(proto).items():
        info = {item.key: item.value for item in tensor.external_data}
        offset, length = int(info.get("offset", 0)), int(info.get("length", -1))
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        if info.get("location") != DATA_FILE:
            result.problems.append(f"{name} is stored in {info.get('location')!r}, not {DATA_FILE}")
        if length != int(np.prod(tensor.dims)) * itemsize:
            result.problems.append(f"{name}: length {length} does not match its shape {list(tensor.dims)}")
        if offset % alignment_for(length):
            result.problems.append(f"{name}: offset {offset} is not aligned to {alignment_for(length)}")
        if offset + length > size:
            result.problems.append(f"{name}: bytes {offset}..{offset + length} lie beyond the file ({size} bytes)")
        spans.append((offset, length, name))
    spans.sort()
    for (o1, l1, n1), (o2, _, n2) in itertools.pairwise(spans):
        if o1 + l1 > o2:
            result.problems.append(f"{n1} and {n2} overlap in the data file")
    lengths = [length for _, length, _ in spans]
    unique = unique_parameter_bytes if unique_parameter_bytes is not None else manifest["totals"]["unique_weight_bytes"]
    bound = int(unique * 1.01) + padding_budget(lengths)
    if size > bound:
        result.problems.append(f"{DATA_FILE} has {size} bytes, more than unique weights x 1.01 + padding ({bound})")
    result.figures = {"data_file_bytes": size, "stored_bytes": sum(lengths), "unique_bytes": unique, "bound": bound}
    return result


def expected_tensor(row: dict[str, Any], model: Any) -> Any:
    """The torch tensor a manifest row should hold, rebuilt from the model (torch layout, model dtype)."""
    import torch

    sources = [model.get_parameter(name).detach() for name in row["source"]]
    if row["transform"] in ("identity", "copy"):
        return sources[0]
    if row["transform"] == "lora_merge":
        weight, lora_a, lora_b = sources
        with torch.no_grad():
            return weight.float() + float(row["scaling"]) * (lora_b.float() @ lora_a.float())
    if row["transform"] == "pack":  # --target cpu: members stacked along the output dimension
        with torch.no_grad():
            return torch.cat([expected_tensor(part, model).float() for part in row["parts"]], dim=0)
    if row["transform"] == "block_diag":  # --target cpu: a pack's adapter B matrices on a block diagonal
        with torch.no_grad():
            return torch.block_diag(*[expected_tensor(part, model).float() for part in row["parts"]])
    raise ValueError(f"unknown transform {row['transform']!r}")


def _merged(row: dict[str, Any]) -> bool:
    """True for a tensor computed by a matmul (compared within rounding, not bit for bit)."""
    return row["transform"] == "lora_merge" or any(_merged(part) for part in row.get("parts") or [])


def check_values(proto: ModelProto, data_path: Path, manifest: dict[str, Any], model: Any) -> CheckResult:
    """Every stored tensor equals the source tensor it comes from (bit-exact unless derived by a matmul)."""
    from flexi_export.export.weights import TRANSPOSED

    result = CheckResult("values equal the source tensors")
    rows = _rows(manifest)
    dtype = np.float16 if manifest["dtype"] == "fp16" else np.float32
    worst = 0.0
    cache: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for name, tensor in external_weights(proto).items():
        row = rows.get(name)
        if row is None:
            continue  # reported by check_initializers
        try:
            expected = expected_tensor(row, model)
        except (AttributeError, KeyError, ValueError) as exc:
            result.problems.append(f"{name}: cannot rebuild its source ({exc})")
            continue
        stored = np.asarray(read_external(data_path, tensor))
        if row.get("quantization"):
            problem = _quantized_problem(name, row, expected, stored, manifest, cache)
            result.problems += [problem] if problem else []
            continue
        expected = expected.t() if row["layout"] == TRANSPOSED else expected
        want = expected.float().numpy().astype(dtype)
        if stored.shape != want.shape:
            result.problems.append(f"{name}: stored shape {list(stored.shape)}, source {list(want.shape)}")
            continue
        if _sha256(stored) != row["sha256"]:
            result.problems.append(f"{name}: bytes do not match the manifest sha256")
        diff = float(np.max(np.abs(stored.astype(np.float32) - want.astype(np.float32)))) if want.size else 0.0
        exact = not _merged(row)  # a matmul may round differently with another thread count
        worst = max(worst, 0.0 if exact else diff)
        if exact and not np.array_equal(stored, want):
            result.problems.append(f"{name}: values differ from {row['source'][0]} (max |diff| {diff:.3g})")
        elif not exact and not np.allclose(stored, want, rtol=1e-3 if dtype == np.float16 else 1e-5, atol=1e-6):
            result.problems.append(f"{name}: merged values differ from W + s*B@A (max |diff| {diff:.3g})")
    result.figures = {"compared": len(rows), "max_merge_diff": worst}
    return result


def _quantized_problem(
    name: str,
    row: dict[str, Any],
    source: Any,
    stored: np.ndarray,
    manifest: dict[str, Any],
    cache: dict[tuple[str, str], dict[str, np.ndarray]],
) -> str | None:
    """A quantized part must be exactly what the exporter's quantizer makes of its source matrix (a merged
    ``--dense`` matrix: within one quantization step once dequantized, the matmul may round differently)."""
    from flexi_export.export.quant import QuantConfig, dequantize, quantize

    quant, config = row["quantization"], QuantConfig.from_json(manifest["quantization"])
    key = (row["source"][0] + row["transform"], quant["layout"])
    if key not in cache:  # a matrix's parts are consecutive rows: quantize it once for all of them
        cache.clear()
        cache[key] = quantize(source.float().numpy(), quant["layout"], config)
    want = cache[key][quant["part"]]
    if stored.shape != want.shape:
        return f"{name}: stored shape {list(stored.shape)}, quantized source {list(want.shape)}"
    if _sha256(stored) != row["sha256"]:
        return f"{name}: bytes do not match the manifest sha256"
    if np.array_equal(stored, want):
        return None
    if _merged(row) and quant["part"] == "qweight":
        k = int(quant["source_shape"][1])
        parts = {**cache[key], "qweight": stored}
        ours, theirs = dequantize(parts, quant["layout"], config, k), dequantize(cache[key], quant["layout"], config, k)
        step = float(np.abs(cache[key]["scales"]).max())
        if float(np.abs(ours - theirs).max()) <= step * 1.001:
            return None
    elif _merged(row) and np.allclose(stored, want, rtol=1e-5, atol=1e-7):
        return None
    how = f"{quant['layout']}, {quant['part']}"
    return f"{name}: differs from {row['source'][0]} quantized as the manifest says ({how})"


def check_ort_optimized(model_path: Path, weights: set[str] | None = None) -> CheckResult:
    """The graph onnxruntime saves after ORT_ENABLE_ALL keeps every weight once and adds no weight-sized copy.

    Writes the optimised graph and its external initializers to a temporary folder (disk: about the weight
    bytes once), with prepacking disabled as the manifest recommends.
    """
    import onnxruntime as ort

    from flexi_export.verify.runtime import session_options

    result = CheckResult("onnxruntime keeps the weights")
    original = onnx.load(str(model_path), load_external_data=False)
    weights = set(external_weights(original)) if weights is None else weights
    with tempfile.TemporaryDirectory(prefix="flexi-ort-opt-") as tmp:
        optimized_path = Path(tmp) / "optimized.onnx"
        options = session_options(disable_prepacking=True, threads=1, optimized_model=str(optimized_path))
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(str(optimized_path), load_external_data=False)
    kept = {t.name: t for t in optimized.graph.initializer}
    for name in sorted(weights - set(kept)):
        result.problems.append(f"onnxruntime replaced the weight {name} (folded or rewritten)")
    declared = weights | {t.name for t in original.graph.initializer}  # inline tables (RoPE) are not new either
    copies = [t for name, t in kept.items() if name not in declared and _tensor_bytes(t) >= COPY_BYTES]
    for t in copies:
        result.problems.append(f"onnxruntime created {t.name} {list(t.dims)}: a weight-sized copy")
    result.figures = {"weights": len(weights), "kept": len(weights & set(kept)), "new_weight_sized": len(copies)}
    return result


def _sha256(array: np.ndarray) -> str:
    """sha256 of an array's bytes (no copy for the contiguous memory maps read from the data file)."""
    return hashlib.sha256(memoryview(np.ascontiguousarray(array)).cast("B")).hexdigest()


def _tensor_bytes(tensor: TensorProto) -> int:
    itemsize = {TensorProto.FLOAT16: 2, TensorProto.DOUBLE: 8, TensorProto.INT64: 8, TensorProto.BOOL: 1}
    return int(np.prod(tensor.dims)) * itemsize.get(tensor.data_type, 4)


def check_structure(bundle: str | Path, model: Any | None = None, ort_optimized: bool = True) -> list[CheckResult]:
    """Run every structure check on the bundle folder (value and parameter checks need the torch ``model``)."""
    from flexi_export.export.manifest import load_manifest

    bundle = Path(bundle)
    manifest = load_manifest(bundle)
    model_path = bundle / "onnx" / "model.onnx"
    data_path = bundle / "onnx" / DATA_FILE
    proto = onnx.load(str(model_path), load_external_data=False)
    unique = None
    if model is not None and not manifest.get("dense"):
        itemsize = 2 if manifest["dtype"] == "fp16" else 4
        unique = sum(p.numel() for p in model.parameters()) * itemsize  # parameters() yields each Parameter once
        unique += layout_zero_bytes(manifest)
    results = [
        check_initializers(proto, manifest, model),
        check_duplicates(proto, data_path, manifest),
        check_no_weight_ops(proto),
        check_external_data(proto, data_path, manifest, unique),
    ]
    if model is not None:
        results.append(check_values(proto, data_path, manifest, model))
    if ort_optimized:
        results.append(check_ort_optimized(model_path))
    return results
