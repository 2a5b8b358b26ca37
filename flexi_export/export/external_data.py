"""Write ``onnx/model.onnx_data`` ourselves: tensor by tensor, aligned, hashed on the way.

Why not ``onnx.save_model(..., save_as_external_data=True)``: it needs every tensor in memory inside the
ModelProto first (a second full copy of the weights next to the torch model) and does not align offsets.
Here each tensor is converted (dtype, layout) in blocks of 16 MiB, written and hashed on the way, so the
export's peak memory stays near the torch model's own size.

Layout: the file is padding-free in practice (the bundle's size is its unique weight bytes, within a few KiB)
while every weight stays mappable in place:

- tensors of at least :data:`ALIGN_THRESHOLD` (4 MiB: every matrix of a model worth memory-mapping) start at a
  multiple of :data:`ALIGNMENT` (64 KiB, the mapping granularity on Windows; Linux pages divide it);
- tensors of at least one page (:data:`PAGE`) start on a page, so no page holds two of them;
- smaller tensors (norms, biases, small adapters) start on a :data:`SMALL_ALIGNMENT` (64-byte) boundary, packed
  into the gaps alignment leaves before a larger tensor, in registry order, or after the last one.

On Linux onnxruntime maps any offset (it maps from the page below); a small tensor sharing a page with another is
still one physical page. Tensors are written in registry order (a quantized matrix's parts one after the other,
so it is quantized once) at their planned offsets; never-written bytes read as zeros.
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
ALIGN_THRESHOLD = 4 * 1024 * 1024
PAGE = 4096
SMALL_ALIGNMENT = 64


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
    if length >= ALIGN_THRESHOLD:
        return ALIGNMENT
    return PAGE if length >= PAGE else SMALL_ALIGNMENT


def padding_budget(lengths: list[int]) -> int:
    """The most padding the alignment rule can add for tensors of these sizes (for size checks)."""
    return sum(alignment_for(n) - 1 for n in lengths)


def plan_offsets(lengths: list[int]) -> list[int]:
    """Where each tensor of ``lengths`` (registry order) starts in the data file (see the module docstring)."""
    offsets = [0] * len(lengths)
    pending = [i for i, n in enumerate(lengths) if alignment_for(n) == SMALL_ALIGNMENT]
    offset = 0
    for i, length in enumerate(lengths):
        if alignment_for(length) == SMALL_ALIGNMENT:
            continue
        start = _round_up(offset, alignment_for(length))
        offset, pending = _fill_gap(offset, start, pending, lengths, offsets)
        offsets[i] = start
        offset = start + length
    for i in pending:
        offsets[i] = _round_up(offset, SMALL_ALIGNMENT)
        offset = offsets[i] + lengths[i]
    return offsets


def _fill_gap(offset: int, end: int, pending: list[int], lengths: list[int], offsets: list[int]) -> tuple[int, list]:
    """Place the pending small tensors that fit between ``offset`` and ``end``; return the new offset and the rest."""
    rest = []
    for i in pending:
        start = _round_up(offset, SMALL_ALIGNMENT)
        if start + lengths[i] <= end:
            offsets[i] = start
            offset = start + lengths[i]
        else:
            rest.append(i)
    return offset, rest


def write_external_data(
    path: Path, registry: WeightRegistry, on_bytes: Callable[[int], None] | None = None
) -> list[StoredTensor]:
    """Stream every registry entry into ``path``; return where each one went (in file order)."""
    entries = list(registry.entries)
    offsets = plan_offsets([e.nbytes for e in entries])
    stored: list[StoredTensor] = []
    with open(path, "wb") as f:
        for entry, start in zip(entries, offsets, strict=True):
            f.seek(start)
            digest = hashlib.sha256()
            written = 0
            for chunk in registry.chunks(entry):
                data = memoryview(chunk).cast("B")
                f.write(data)
                digest.update(data)
                written += chunk.nbytes
            if written != entry.nbytes:  # a chunking bug must never shift every later tensor silently
                raise RuntimeError(f"{entry.name}: wrote {written} bytes, expected {entry.nbytes}")
            elem_type = helper.np_dtype_to_tensor_dtype(np.dtype(entry.np_dtype))
            stored.append(StoredTensor(entry, elem_type, entry.shape, start, written, digest.hexdigest()))
            if on_bytes is not None:
                on_bytes(written)
    end = max((t.offset + t.length for t in stored), default=0)
    if path.stat().st_size != end:  # a short write (disk full) must not pass unnoticed
        raise OSError(f"{path} has {path.stat().st_size} bytes, expected {end}")
    return sorted(stored, key=lambda t: t.offset)


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
