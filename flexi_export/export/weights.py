"""The initializer registry: every exported tensor once, keyed by the identity of its torch Parameter.

Sharing follows the plan's explicit map, never values: a Parameter read by several blocks (a shared block's
base matrices, a tied embedding) is *the same object* in the Flexi model, so it gets one entry and one
initializer, named after its owner (the first name ``named_parameters`` gives it). Two distinct Parameters with
equal contents (zero-initialised ``lora_B`` tensors, all-ones norms) stay two initializers: deduplicating by
value would merge tensors that training will make different and break their PEFT-style names.

Each entry also records how it is stored: ``transposed`` (``[in, out]``, what ``MatMul`` reads, converted once
here) or ``as_is`` (norms, biases, the embedding read by ``Gather`` and by ``Gemm(transB=1)``). No graph node
ever transposes, reshapes or casts a weight: onnxruntime would fold that into a heap copy per use.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from flexi_export.export.spec import Derived, TensorRef

#: Stored layouts: as torch holds it, or transposed to ``[in, out]`` for ``MatMul``.
AS_IS = "as_is"
TRANSPOSED = "transposed"

_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
#: Size of the pieces tensors are converted and written in.
CHUNK_BYTES = 16 * 1024 * 1024
_BLOCK = re.compile(r"\.layers\.(\d+)\.")


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

    @property
    def torch_shape(self) -> tuple[int, ...]:
        """Shape as torch holds it (``[out, in]`` for a matrix)."""
        return tuple(self.ref.shape)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape as stored in the bundle."""
        return self.torch_shape[::-1] if self.layout == TRANSPOSED else self.torch_shape

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
        self._entries: dict[int, WeightEntry] = {}

    def use(self, ref: TensorRef, role: str, layout: str, node: str, block: int | None = None) -> str:
        """The initializer name of ``ref``, registering it on first use; ``node`` is the consuming node."""
        key = id(ref)
        entry = self._entries.get(key)
        if entry is None:
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

    def _new_entry(self, ref: TensorRef, role: str, layout: str) -> WeightEntry:
        if isinstance(ref, Derived):
            name, sources, transform, scaling = ref.name, ref.sources, ref.transform, ref.scaling
        else:
            name = self._names[id(ref)]
            sources, transform, scaling = (name,), "identity", None
        if any(e.name == name for e in self._entries.values()):
            raise RuntimeError(f"two different tensors would both be named {name}")
        match = _BLOCK.search("." + name)
        owner = int(match.group(1)) if match else None
        return WeightEntry(name, ref, role, layout, owner, sources, transform, scaling)

    @property
    def entries(self) -> list[WeightEntry]:
        """All entries in order of first use (the order they are written to the data file)."""
        return list(self._entries.values())

    def chunks(self, entry: WeightEntry) -> Iterator[np.ndarray]:
        """The stored values of ``entry`` as consecutive C-contiguous pieces (see :func:`stored_chunks`)."""
        return stored_chunks(entry.ref, entry.layout, self.dtype)


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
