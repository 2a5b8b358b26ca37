"""Write ``onnx/model.onnx_data`` ourselves: tensor by tensor, aligned, hashed on the way.

Why not ``onnx.save_model(..., save_as_external_data=True)``: it needs every tensor in memory inside the
ModelProto first (a second full copy of the weights next to the torch model) and does not align offsets.
Here each tensor is converted (dtype, layout) in blocks of 16 MiB, written and hashed on the way, so the
export's peak memory stays near the torch model's own size.

Alignment: tensors of at least :data:`ALIGN_THRESHOLD` bytes start at a multiple of :data:`ALIGNMENT`
(64 KiB, the mapping granularity on Windows; 4 KiB pages on Linux divide it), so onnxruntime can memory-map
each of them in place. Smaller tensors (norms, biases, adapters) start on a 4 KiB page: aligning them to
64 KiB would mostly store padding, and page alignment keeps every page to one tensor. onnxruntime maps each
tensor separately; a page shared by two mappings is resident once, but kernels with large page-cache folios
under-count the PSS of such overlapping mappings, which would blur every residency measurement.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

from flexi_export.export.weights import WeightEntry, WeightRegistry

ALIGNMENT = 64 * 1024
ALIGN_THRESHOLD = 64 * 1024
SMALL_ALIGNMENT = 4096


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor landed in the data file, and what it holds."""

    entry: WeightEntry
    elem_type: int
    dims: tuple[int, ...]
    offset: int
    length: int
    sha256: str


def alignment_for(length: int) -> int:
    """The offset alignment used for a tensor of ``length`` bytes."""
    return ALIGNMENT if length >= ALIGN_THRESHOLD else SMALL_ALIGNMENT


def padding_budget(lengths: list[int]) -> int:
    """The most padding the alignment rule can add for tensors of these sizes (for size checks)."""
    return sum(alignment_for(n) - 1 for n in lengths)


def write_external_data(
    path: Path, registry: WeightRegistry, on_bytes: Callable[[int], None] | None = None
) -> list[StoredTensor]:
    """Stream every registry entry into ``path``; return where each one went (in file order)."""
    stored: list[StoredTensor] = []
    offset = 0
    with open(path, "wb") as f:
        for entry in registry.entries:
            length = entry.nbytes
            start = _round_up(offset, alignment_for(length))
            if start > offset:
                f.write(b"\0" * (start - offset))
            digest = hashlib.sha256()
            written = 0
            for chunk in registry.chunks(entry):
                data = memoryview(chunk).cast("B")
                f.write(data)
                digest.update(data)
                written += chunk.nbytes
            if written != length:  # a chunking bug must never shift every later tensor silently
                raise RuntimeError(f"{entry.name}: wrote {written} bytes, expected {length}")
            elem_type = helper.np_dtype_to_tensor_dtype(np.dtype(entry.np_dtype))
            stored.append(StoredTensor(entry, elem_type, entry.shape, start, length, digest.hexdigest()))
            offset = start + length
            if on_bytes is not None:
                on_bytes(length)
    if path.stat().st_size != offset:  # a short write (disk full) must not pass unnoticed
        raise OSError(f"{path} has {path.stat().st_size} bytes, expected {offset}")
    return stored


def external_initializer(tensor: StoredTensor, location: str) -> TensorProto:
    """The ``TensorProto`` of ``tensor``: name, type, shape and a pointer into the data file (no bytes)."""
    proto = TensorProto()
    proto.name = tensor.entry.name
    proto.data_type = tensor.elem_type
    proto.dims.extend(tensor.dims)
    proto.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(tensor.offset)), ("length", str(tensor.length))):
        item = proto.external_data.add()
        item.key = key
        item.value = value
    return proto


def read_external(data_path: Path, proto: TensorProto) -> np.ndarray:
    """The values of an external initializer, read from its data file (a memory map, no full read)."""
    info = {item.key: item.value for item in proto.external_data}
    dtype = helper.tensor_dtype_to_np_dtype(proto.data_type)
    offset, length = int(info.get("offset", 0)), int(info["length"])
    count = length // np.dtype(dtype).itemsize
    array = np.memmap(data_path, dtype=dtype, mode="r", offset=offset, shape=(count,))
    return array.reshape(tuple(proto.dims))


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple
