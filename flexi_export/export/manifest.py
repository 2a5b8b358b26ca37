"""``manifest.json``: the machine-readable description of a bundle.

It says what every initializer is (role, owner block, the blocks and nodes that read it, dtype, shape, bytes,
sha256, offset in the data file, which torch tensors its values come from), the totals that show the sharing
(unique weight bytes vs. bytes without sharing), the I/O contract, the tolerances that parity checks use,
and the onnxruntime session options recommended for minimum memory, with why they were chosen.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from onnx import TensorProto

from flexi_export import __version__
from flexi_export.errors import InputError
from flexi_export.export.external_data import ALIGN_THRESHOLD, ALIGNMENT, PAGE, SMALL_ALIGNMENT, StoredTensor
from flexi_export.export.io_spec import IOSpec
from flexi_export.export.quant import NBITS, NBITS_ROWS, ROWS
from flexi_export.export.weights import WeightEntry

MANIFEST_FORMAT = "flexi-bundle/1"
MANIFEST_NAME = "manifest.json"

#: Parity tolerances written into every bundle (and used by the exporter's own check and by verify).
TOLERANCES: dict[str, dict[str, Any]] = {
    "fp32": {
        "logits_atol": 1e-4,
        "logits_rtol": 1e-4,
        "present_atol": 1e-4,
        "present_rtol": 1e-4,
        "greedy_tokens": "identical",
        "top1_agreement_min": 1.0,
    },
    "fp16": {
        # fp16 rounds every activation; only argmax agreement is a meaningful hard bound
        "logits_atol": None,
        "logits_rtol": None,
        "present_atol": None,
        "present_rtol": None,
        "greedy_tokens": "not compared (fp16 rounding may flip near-ties)",
        "top1_agreement_min": 0.99,
    },
    # quantized bundles are compared with the PyTorch model whose quantized matrices hold dequantize(quantize(W))
    # (same weights as the graph); what remains is the runtime's own arithmetic: int8 activations (MatMulNBits
    # accuracy level 4 per block, MatMulInteger per tensor) and fp32 accumulation order. Bounds set from the
    # measured differences with a margin (docs/export.md, "Quantized bundles")
    **{
        dtype: {
            "logits_atol": 0.5,
            "logits_rtol": 0.05,
            "present_atol": 0.5,
            "present_rtol": 0.05,
            "greedy_tokens": "not compared (int8 activations may flip near-ties)",
            "top1_agreement_min": 0.99,
        }
        for dtype in ("int4", "int8")
    },
}


def session_options(dtype: str) -> dict[str, Any]:
    """The onnxruntime session options recommended for minimum memory, and what they were chosen for."""
    if dtype == "int4":
        return _int4_session_options()
    options: dict[str, Any] = {
        "config_entries": {"session.disable_prepacking": "1"},
        "graph_optimization_level": "ORT_ENABLE_ALL",
        "why": (
            "The weights are external data with aligned offsets, which onnxruntime memory-maps. With prepacking "
            "on, the CPU EP repacks each MatMul/Gemm weight into a heap buffer per consuming node at session "
            "creation, so a shared weight peaks as if it were not shared and a tied embedding stays resident "
            "twice. With session.disable_prepacking=1 the kernels read the mapped pages: one copy per weight, "
            "file-backed, shared between processes. No weight is fed to Transpose/Reshape/Cast, so constant "
            "folding creates no copies either."
        ),
        "measured_with": {"session.disable_prepacking": "1", "graph_optimization_level": "ORT_ENABLE_ALL"},
    }
    if dtype == "int8":
        options["why"] += (
            " int8: MatMulInteger reads the int8 weight as stored, from the mapped file (one copy, a quarter of "
            "fp32). With prepacking on, onnxruntime moves that one copy to the heap in a packed layout (faster "
            "integer GEMMs on large matrices; `flexi-export prepack` saves the packed copy as mapped external data "
            "instead); see docs/export.md, 'Why int8 is MatMulInteger'."
        )
    if dtype == "fp16":
        options["note"] = (
            "onnxruntime's x86-64 CPU EP has no fp16 MatMul/Gemm kernels: it inserts Casts and keeps fp32 copies "
            "of the weights on the heap. Use fp16 bundles with EPs or CPUs that have fp16 kernels (ARM64 CPU, "
            "CUDA, WebGPU/transformers.js); on x86-64 CPU the fp32 bundle uses less memory."
        )
    return options


def _int4_session_options() -> dict[str, Any]:
    return {
        "config_entries": {},
        "graph_optimization_level": "ORT_ENABLE_ALL",
        "why": (
            "int4 MatMulNBits needs prepacking (onnxruntime's default) for speed: without it every product "
            "unpacks its weight on the fly, tens of times slower. Prepacking keeps a packed copy of each weight "
            "on the heap (the mapped int4 file pages are released after packing). For minimum heap, run "
            "`flexi-export prepack BUNDLE` once on the target machine: onnxruntime then saves its packed weights "
            "as external data (onnx/model.prepacked.onnx + .onnx_data) and later sessions memory-map them; "
            "load that model with these same options."
        ),
        "prepacked_model": "onnx/model.prepacked.onnx (after `flexi-export prepack`; hardware- and version-specific)",
        "measured_with": {"session.disable_prepacking": "0", "graph_optimization_level": "ORT_ENABLE_ALL"},
    }


def initializer_rows(stored: list[StoredTensor]) -> list[dict[str, Any]]:
    """One manifest row per initializer, in data-file order."""
    rows = []
    for t in stored:
        e = t.entry
        rows.append(
            {
                "name": e.name,
                "role": e.role,
                "owner_block": e.owner_block,
                "consuming_blocks": sorted(e.consuming_blocks),
                "consumers": list(e.consumers),
                "dtype": TensorProto.DataType.Name(t.elem_type),
                "shape": list(t.dims),
                "layout": e.layout,
                "bytes": t.length,
                "offset": t.offset,
                "sha256": t.sha256,
                "source": list(e.sources),
                "transform": e.transform,
                "scaling": e.scaling,
                "quantization": _quant_fields(e),
            }
        )
    return rows


def _quant_fields(entry: WeightEntry) -> dict[str, Any] | None:
    """What part of which quantized matrix a row holds (None for a float tensor)."""
    if entry.quant is None:
        return None
    config = entry.quant.config
    return {
        "part": entry.quant.part,
        "layout": entry.quant.layout,
        "op": {ROWS: "Gather", NBITS_ROWS: "GatherBlockQuantized"}.get(entry.quant.layout, config.op),
        "bits": config.bits,
        "block_size": config.block_size if entry.quant.layout in (NBITS, NBITS_ROWS) else None,
        "symmetric": config.symmetric,
        "source_shape": list(entry.torch_shape),
    }


def totals(stored: list[StoredTensor], data_file_bytes: int) -> dict[str, int]:
    """Unique weight bytes vs. what the same model needs when every block holds its own copy."""
    unique = sum(t.length for t in stored)
    # a tensor read by k executed blocks would be stored k times without sharing (a tied embedding stays once:
    # the tie is the source model's own, not a Flexi sharing)
    unshared = sum(t.length * max(1, len(t.entry.consuming_blocks)) for t in stored)
    return {
        "initializers": len(stored),
        "shared_initializers": sum(1 for t in stored if len(t.entry.consuming_blocks) > 1),
        "parameters": _parameters(stored),
        "unique_weight_bytes": unique,
        "bytes_without_sharing": unshared,
        "data_file_bytes": data_file_bytes,
        "padding_bytes": data_file_bytes - unique,
    }


def _parameters(stored: list[StoredTensor]) -> int:
    """Model parameters the bundle holds: a float tensor's elements; a quantized matrix counted once, by the
    shape of the matrix it stands for (its qweight row), not by its bytes; a block-diagonal matrix by its blocks
    (its zeros are layout, not parameters)."""
    total = 0
    for t in stored:
        quant = t.entry.quant
        if t.entry.transform == "block_diag":
            total += sum(_numel(tuple(part.shape)) for part in getattr(t.entry.ref, "parts", ()))
        elif quant is None:
            total += _numel(t.dims)
        elif quant.part == "qweight":
            total += _numel(t.entry.torch_shape)
    return total


def build_manifest(
    *,
    stored: list[StoredTensor],
    data_file_bytes: int,
    io: IOSpec,
    dtype: str,
    opset: int,
    ir_version: int,
    dense: bool,
    plan_fingerprint: str,
    source: dict[str, Any],
    inline: list[dict[str, Any]],
    quantization: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The full manifest dict (see the module docstring); ``quantization``: how an int8/int4 bundle's weights
    are quantized and how far that moves the model (None for float bundles)."""
    return {
        "format": MANIFEST_FORMAT,
        "created_by": f"flexi-export {__version__}",
        "dtype": dtype,
        "opset": opset,
        "ir_version": ir_version,
        "dense": dense,
        "plan_fingerprint": plan_fingerprint,
        "source": source,
        "files": {"model": "onnx/model.onnx", "data": "onnx/model.onnx_data"},
        "data_alignment": {
            "alignment": ALIGNMENT,
            "threshold": ALIGN_THRESHOLD,
            "page": PAGE,
            "small_alignment": SMALL_ALIGNMENT,
        },
        "totals": totals(stored, data_file_bytes),
        "initializers": initializer_rows(stored),
        "inline_initializers": inline,
        "io": io.to_json(),
        "tolerances": TOLERANCES[dtype],
        "session_options": session_options(dtype),
        "quantization": quantization,
    }


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` into ``folder``."""
    path = folder / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=1, allow_nan=False) + "\n")
    return path


def load_manifest(bundle: str | Path) -> dict[str, Any]:
    """Read a bundle's manifest (``InputError`` when missing, unreadable or of another format)."""
    path = Path(bundle) / MANIFEST_NAME
    if not path.is_file():
        raise InputError(f"{bundle} is not a bundle: {MANIFEST_NAME} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise InputError(f"{path} is not a {MANIFEST_FORMAT} manifest")
    return manifest


def _numel(dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n
