"""The initializer registry: every exported tensor once, keyed by the identity of its torch Parameter.

Sharing follows the plan's explicit map, never values: a Parameter read by several blocks (a shared block's
base matrices, a tied embedding) is *the same object* in the Flexi model, so it gets one entry and one
initializer, named after its owner (the first name ``named_parameters`` gives it). Two distinct Parameters with
equal contents (zero-initialised ``lora_B`` tensors, all-ones norms) stay two initializers: deduplicating by
value would merge tensors that training will make different and break their PEFT-style names.

Each entry also records how it is stored: ``transposed`` (``[in, out]``, what ``MatMul`` reads, converted once
here) or ``as_is`` (norms, biases, the embedding read by ``Gather`` and by ``Gemm(transB=1)``). No graph node
ever transposes, reshapes or casts a weight: onnxruntime would fold that into a heap copy per use.

A quantized matrix (int8/int4 bundles, :mod:`~flexi_export.export.quant`) is several initializers, one per
part (``<owner name>.qweight``, ``.scales``, ``.zero_points``), registered together on the Parameter's first
use and keyed by the same identity: a shared matrix is quantized once and every consuming block reads the
same parts.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from flexi_export.export.quant import QuantConfig, part_layouts, quantize
from flexi_export.export.spec import Derived, TensorRef

#: Stored layouts: as torch holds it, or transposed to ``[in, out]`` for ``MatMul``.
AS_IS = "as_is"
TRANSPOSED = "transposed"

_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
_NP_DTYPES = {"fp32": np.float32, "fp16": np.float16}
#: Size of the pieces tensors are converted and written in.
CHUNK_BYTES = 16 * 1024 * 1024
_BLOCK = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class QuantPart:
    """Which part of a quantized matrix an initializer holds, in which stored layout, under which config."""

    layout: str
    part: str
    config: QuantConfig


@dataclass
class WeightEntry:
    """One initializer: what it is, who owns it, who reads it, and where its values come from."""

    name: str
    ref: TensorRef
    role: str
    layout: str
    #: Executed index of the block that owns the tensor (None for embedding, final norm, LM head).
    owner_block: int | None
    #: Torch names of the Parameters its values come from, and how (``identity``, ``copy``, ``lora_merge``).
    sources: tuple[str, ...]
    transform: str
    scaling: float | None = None
    consumers: list[str] = field(default_factory=list)
    consuming_blocks: set[int] = field(default_factory=set)
    #: numpy dtype of the stored values (the bundle's float type, or a quantized part's own type).
    np_dtype: type = np.float32
    quant: QuantPart | None = None

    @property
    def torch_shape(self) -> tuple[int, ...]:
        """Shape as torch holds it (``[out, in]`` for a matrix)."""
        return tuple(self.ref.shape)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape as stored in the bundle."""
        if self.quant is not None:
            return part_layouts(self.quant.layout, self.torch_shape, self.quant.config)[self.quant.part][0]
        return self.torch_shape[::-1] if self.layout == TRANSPOSED else self.torch_shape

    @property
    def nbytes(self) -> int:
        """Stored bytes."""
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.np_dtype).itemsize

    @property
    def is_parameter(self) -> bool:
        """True for a model Parameter, False for a tensor derived at export time (``--dense``)."""
        return isinstance(self.ref, nn.Parameter)


class WeightRegistry:
    """Hands out initializer names; the same Parameter always gets the same (single) initializer."""

    def __init__(self, names: dict[int, str], dtype: str) -> None:
        if dtype not in _TORCH_DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}")
        self._names = names
        self.dtype = dtype
        self._entries: dict[int | tuple[int, str, str], WeightEntry] = {}
        # the quantized parts of the matrix written last: its parts are written one after the other, so a
        # one-slot cache quantizes each matrix once without ever holding two
        self._cached: tuple[tuple[int, str], dict[str, np.ndarray]] | None = None

    def use(self, ref: TensorRef, role: str, layout: str, node: str, block: int | None = None) -> str:
        """The initializer name of ``ref``, registering it on first use; ``node`` is the consuming node."""
        key = id(ref)
        entry = self._entries.get(key)
        if entry is None:
            if self._stored_otherwise(ref, None):
                raise RuntimeError(f"{self._base_name(ref)} is quantized and would also be stored as a float")
            entry = self._new_entry(ref, role, layout)
            self._entries[key] = entry
        elif entry.layout != layout:  # one tensor, one layout: a second layout would need a runtime Transpose
            raise RuntimeError(f"{entry.name} is read as {entry.layout} and as {layout}")
        elif role not in entry.role.split("+"):
            entry.role = f"{entry.role}+{role}"
        entry.consumers.append(node)
        if block is not None:
            entry.consuming_blocks.add(block)
        return entry.name

    def use_quantized(
        self,
        ref: TensorRef,
        role: str,
        quant: tuple[str, QuantConfig],
        nodes: str | dict[str, str],
        block: int | None = None,
    ) -> dict[str, str]:
        """The initializer names of ``ref``'s quantized parts (``{part: name}``) in layout ``quant = (layout,
        config)``, registering all of them on first use. ``nodes``: the node reading every part, or one per part."""
        layout, config = quant
        names = {}
        for part, (_shape, dtype) in part_layouts(layout, tuple(ref.shape), config).items():
            key = (id(ref), layout, part)
            entry = self._entries.get(key)
            if entry is None:
                if self._stored_otherwise(ref, layout):  # one matrix, one stored form (a second one is a copy)
                    raise RuntimeError(f"{self._base_name(ref)} would be stored in two layouts")
                entry = self._new_entry(ref, f"{role}.{part}", layout, suffix=f".{part}")
                entry.np_dtype, entry.quant = dtype, QuantPart(layout, part, config)
                self._entries[key] = entry
            elif f"{role}.{part}" not in entry.role.split("+"):
                entry.role = f"{entry.role}+{role}.{part}"
            entry.consumers.append(nodes if isinstance(nodes, str) else nodes[part])
            if block is not None:
                entry.consuming_blocks.add(block)
            names[part] = entry.name
        return names

    def _stored_otherwise(self, ref: TensorRef, layout: str | None) -> bool:
        """True when ``ref`` is already registered in another form (float, or another quantized layout)."""
        quantized = {k[1] for k in self._entries if isinstance(k, tuple) and k[0] == id(ref)}
        return bool(quantized - {layout}) or (layout is not None and id(ref) in self._entries)

    def _base_name(self, ref: TensorRef) -> str:
        return ref.name if isinstance(ref, Derived) else self._names[id(ref)]

    def _new_entry(self, ref: TensorRef, role: str, layout: str, suffix: str = "") -> WeightEntry:
        if isinstance(ref, Derived):
            sources, transform, scaling = ref.sources, ref.transform, ref.scaling
        else:
            sources, transform, scaling = (self._names[id(ref)],), "identity", None
        base = self._base_name(ref)
        name = base + suffix
        if any(e.name == name for e in self._entries.values()):
            raise RuntimeError(f"two different tensors would both be named {name}")
        match = _BLOCK.search("." + base)
        owner = int(match.group(1)) if match else None
        return WeightEntry(name, ref, role, layout, owner, sources, transform, scaling, np_dtype=_NP_DTYPES[self.dtype])

    @property
    def entries(self) -> list[WeightEntry]:
        """All entries in order of first use (the order they are written to the data file)."""
        return list(self._entries.values())

    def chunks(self, entry: WeightEntry) -> Iterator[np.ndarray]:
        """The stored values of ``entry`` as consecutive C-contiguous pieces (see :func:`stored_chunks`)."""
        if entry.quant is None:
            return stored_chunks(entry.ref, entry.layout, self.dtype)
        return _row_chunks(self.quantized(entry)[entry.quant.part])

    def quantized(self, entry: WeightEntry) -> dict[str, np.ndarray]:
        """All parts of ``entry``'s quantized matrix (computed once for consecutive parts of one matrix)."""
        assert entry.quant is not None
        key = (id(entry.ref), entry.quant.layout)
        if self._cached is None or self._cached[0] != key:
            self._cached = None  # drop the previous matrix's parts before computing the next one
            self._cached = (key, quantize(source_matrix(entry.ref), entry.quant.layout, entry.quant.config))
        return self._cached[1]


def source_matrix(ref: TensorRef) -> np.ndarray:
    """``ref``'s values as a float32 numpy matrix in torch layout (a view of the Parameter when it is float32)."""
    with torch.no_grad():
        tensor = ref.compute() if isinstance(ref, Derived) else ref.detach()
        return tensor.to("cpu", torch.float32).numpy()


def _row_chunks(array: np.ndarray, chunk_bytes: int = CHUNK_BYTES) -> Iterator[np.ndarray]:
    rows = array.shape[0] if array.ndim else 1
    step = max(1, chunk_bytes // max(1, array.nbytes // max(1, rows)))
    for start in range(0, rows, step):
        yield np.ascontiguousarray(array[start : start + step] if array.ndim else array)


def stored_chunks(ref: TensorRef, layout: str, dtype: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[np.ndarray]:
    """``ref``'s values as the bundle stores them (bundle dtype, stored layout), in row blocks of about
    ``chunk_bytes``: converting or transposing a whole embedding at once would put a second copy of the
    largest tensor next to the model; a block at a time keeps the export's extra memory at ``chunk_bytes``."""
    with torch.no_grad():
        tensor = ref.compute() if isinstance(ref, Derived) else ref.detach()
        tensor = tensor.to("cpu")
        if layout == TRANSPOSED:
            tensor = tensor.t()  # a view; each block below is copied into the new layout on its own
        target = _TORCH_DTYPES[dtype]
        rows = tensor.shape[0] if tensor.dim() else 1
        row_bytes = max(1, tensor.numel() // max(1, rows) * target.itemsize)
        step = max(1, chunk_bytes // row_bytes)
        for start in range(0, rows, step):
            block = tensor[start : start + step] if tensor.dim() else tensor
            yield np.ascontiguousarray(block.to(target).numpy())
