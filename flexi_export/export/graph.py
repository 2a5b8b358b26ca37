"""A small ONNX graph builder: named nodes, cached constants, weights through the registry.

Node names follow onnxruntime-genai's builder (``/model/layers.0/attn/q_proj/MatMul``) and a node's output is
named ``<node name>/output_0``, so a value in a profile or an error message points straight at its node.
Small constants (shapes, axes, eps, scalars) are ``Constant`` nodes, deduplicated by value; the graph's
initializers are only the model's weights (external data) plus the RoPE ``inv_freq`` table.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import NodeProto, TensorProto, helper, numpy_helper

from flexi_export.export.quant import QuantConfig
from flexi_export.export.weights import WeightRegistry

_NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.bool_): TensorProto.BOOL,
    np.dtype(np.uint8): TensorProto.UINT8,
}


class GraphBuilder:
    """Collects nodes, constants and inline initializers for one graph."""

    def __init__(self, registry: WeightRegistry, float_type: int, quant: QuantConfig | None = None) -> None:
        self.registry = registry
        #: ONNX element type of weights and activations (FLOAT or FLOAT16).
        self.float_type = float_type
        #: How block matrices are quantized (None: float weights).
        self.quant = quant
        self.nodes: list[NodeProto] = []
        self.inline: list[TensorProto] = []
        self._constants: dict[tuple[Any, ...], str] = {}
        self._names: set[str] = set()

    @property
    def float_np(self) -> type[np.floating]:
        """numpy type of weights and activations."""
        return np.float16 if self.float_type == TensorProto.FLOAT16 else np.float32

    def op(self, op_type: str, inputs: list[str], name: str, **attrs: Any) -> str:
        """Add one node with one output; return the output name."""
        return self.op_n(op_type, inputs, name, 1, **attrs)[0]

    def op_n(self, op_type: str, inputs: list[str], name: str, n_outputs: int, **attrs: Any) -> list[str]:
        """Add one node with ``n_outputs`` outputs; return their names."""
        outputs = [f"{name}/output_{k}" for k in range(n_outputs)]
        return self.op_to(op_type, inputs, name, outputs, **attrs)

    def op_to(self, op_type: str, inputs: list[str], name: str, outputs: list[str], **attrs: Any) -> list[str]:
        """Add one node writing to the given output names (used for graph outputs such as ``present.0.key``)."""
        if name in self._names:  # a duplicate name is a builder bug; onnx would only warn about it
            raise RuntimeError(f"duplicate node name {name}")
        self._names.add(name)
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, **attrs))
        return outputs

    def const(self, value: Any, dtype: type | np.dtype | None = None) -> str:
        """A ``Constant`` node holding ``value`` (cached: the same value is one node)."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key in self._constants:
            return self._constants[key]
        text = "_".join(str(v) for v in array.reshape(-1)[:8].tolist()) if array.size else "empty"
        type_name = TensorProto.DataType.Name(_NP_TO_ONNX[array.dtype])
        name = f"/model/constants/{type_name}/{list(array.shape)}/{text}".replace(" ", "")
        while name in self._names:
            name += "_"
        out = self.op_to("Constant", [], name, [name + "/output_0"], value=numpy_helper.from_array(array))[0]
        self._constants[key] = out
        return out

    def fconst(self, value: float) -> str:
        """A scalar constant in the activation dtype."""
        return self.const(value, self.float_np)

    def f32const(self, value: float) -> str:
        """A scalar float32 constant (for the parts computed in fp32: norms, softmax, RoPE angles)."""
        return self.const(value, np.float32)

    def ints(self, *values: int) -> str:
        """A 1-D int64 constant (shapes, axes)."""
        return self.const(list(values), np.int64)

    def inline_initializer(self, name: str, array: np.ndarray) -> str:
        """A small initializer stored in ``model.onnx`` itself (not a model weight: e.g. RoPE ``inv_freq``)."""
        self.inline.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def to_float(self, value: str, name: str) -> str:
        """Cast an fp16 *activation* to fp32 (identity in an fp32 graph)."""
        if self.float_type == TensorProto.FLOAT:
            return value
        return self.op("Cast", [value], name, to=TensorProto.FLOAT)

    def from_float(self, value: str, name: str) -> str:
        """Cast an fp32 *activation* back to the activation dtype (identity in an fp32 graph)."""
        if self.float_type == TensorProto.FLOAT:
            return value
        return self.op("Cast", [value], name, to=self.float_type)
