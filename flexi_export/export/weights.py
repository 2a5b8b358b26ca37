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
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from flexi_export.export.spec import Derived, TensorRef

#: Stored layouts: as torch holds it, or transposed to ``[in, out]`` for ``MatMul``.
AS_IS = "as_is"
TRANSPOSED = "transposed"

_NUMPY_DTYPES = {"fp32": np.float32, "fp16": np.float16}
_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
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
        if dtype not in _NUMPY_DTYPES:
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

    def array(self, entry: WeightEntry) -> np.ndarray:
        """The stored values of ``entry``: bundle dtype, stored layout, C-contiguous (one temporary per call)."""
        return stored_array(entry.ref, entry.layout, self.dtype)


def stored_array(ref: TensorRef, layout: str, dtype: str) -> np.ndarray:
    """``ref``'s values as the bundle stores them (dtype converted once here, matrices transposed once here)."""
    with torch.no_grad():
        tensor = ref.compute() if isinstance(ref, Derived) else ref.detach()
        tensor = tensor.to(device="cpu", dtype=_TORCH_DTYPES[dtype])
        if layout == TRANSPOSED:
            tensor = tensor.t()
        return np.ascontiguousarray(tensor.numpy())


def numpy_dtype(dtype: str) -> type[np.floating]:
    """The numpy element type of a bundle dtype (``fp32`` / ``fp16``)."""
    return _NUMPY_DTYPES[dtype]
