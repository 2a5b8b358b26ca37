"""The graph's inputs and outputs, declared as data (optimum's ``text-generation-with-past`` contract).

The same :class:`IOSpec` feeds the graph builder (value infos), the manifest, ``genai_config.json`` and the
tests, so the names, dtypes and symbolic dimensions are written down exactly once:

- inputs: ``input_ids`` int64 ``[batch_size, sequence_length]``, ``attention_mask`` int64
  ``[batch_size, past_sequence_length + sequence_length]``, ``position_ids`` int64
  ``[batch_size, sequence_length]``, then ``past_key_values.{i}.key`` / ``.value``
  ``[batch_size, kv_heads, past_sequence_length, head_dim]``;
- outputs: ``logits`` ``[batch_size, sequence_length, vocab]``, then ``present.{i}.key`` / ``.value``
  ``[batch_size, kv_heads, past_sequence_length + sequence_length, head_dim]``.

Key before value, layer by layer; ``i`` counts *executed* blocks. ``kv_heads`` and ``head_dim`` are concrete
integers because transformers.js builds the first (empty) cache from the input metadata: every symbolic
dimension other than ``batch_size`` becomes 0 there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from onnx import TensorProto, ValueInfoProto, helper

BATCH = "batch_size"
SEQUENCE = "sequence_length"
PAST = "past_sequence_length"
TOTAL = "past_sequence_length + sequence_length"

#: Bundle dtype name -> ONNX element type of weights and activations.
FLOAT_TYPES: dict[str, int] = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16}

Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, ONNX element type and dimensions (ints or symbolic names)."""

    name: str
    elem_type: int
    dims: tuple[Dim, ...]

    def value_info(self) -> ValueInfoProto:
        """The ONNX ``ValueInfoProto`` declaring this tensor."""
        return helper.make_tensor_value_info(self.name, self.elem_type, list(self.dims))

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (element type by its ONNX name, e.g. ``FLOAT``)."""
        return {"name": self.name, "dtype": TensorProto.DataType.Name(self.elem_type), "shape": list(self.dims)}


@dataclass(frozen=True)
class IOSpec:
    """All inputs and outputs of the decoder graph, in order."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    num_layers: int

    def input(self, name: str) -> TensorSpec:
        """The input called ``name`` (KeyError if there is none)."""
        return _by_name(self.inputs, name)

    def output(self, name: str) -> TensorSpec:
        """The output called ``name`` (KeyError if there is none)."""
        return _by_name(self.outputs, name)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict for the manifest."""
        return {
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "num_layers": self.num_layers,
            "past_key": "past_key_values.%d.key",
            "past_value": "past_key_values.%d.value",
            "present_key": "present.%d.key",
            "present_value": "present.%d.value",
        }


def _by_name(specs: tuple[TensorSpec, ...], name: str) -> TensorSpec:
    for spec in specs:
        if spec.name == name:
            return spec
    raise KeyError(name)


def past_names(i: int) -> tuple[str, str]:
    """Input names of executed block ``i``'s cache: (key, value)."""
    return f"past_key_values.{i}.key", f"past_key_values.{i}.value"


def present_names(i: int) -> tuple[str, str]:
    """Output names of executed block ``i``'s updated cache: (key, value)."""
    return f"present.{i}.key", f"present.{i}.value"


def decoder_io(num_layers: int, kv_heads: int, head_dim: int, vocab_size: int, dtype: str) -> IOSpec:
    """The I/O of a decoder with ``num_layers`` executed blocks, each with ``kv_heads`` x ``head_dim`` cache."""
    float_type = FLOAT_TYPES[dtype]
    inputs = [
        TensorSpec("input_ids", TensorProto.INT64, (BATCH, SEQUENCE)),
        TensorSpec("attention_mask", TensorProto.INT64, (BATCH, TOTAL)),
        TensorSpec("position_ids", TensorProto.INT64, (BATCH, SEQUENCE)),
    ]
    outputs = [TensorSpec("logits", float_type, (BATCH, SEQUENCE, vocab_size))]
    for i in range(num_layers):
        for name in past_names(i):
            inputs.append(TensorSpec(name, float_type, (BATCH, kv_heads, PAST, head_dim)))
        for name in present_names(i):
            outputs.append(TensorSpec(name, float_type, (BATCH, kv_heads, TOTAL, head_dim)))
    return IOSpec(tuple(inputs), tuple(outputs), num_layers)
