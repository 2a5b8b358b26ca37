"""The PyTorch side of a quantized bundle: the model with the same quantization applied, and how far it moves.

:func:`quantized_reference` temporarily makes a (Flexi) model compute what the bundle's graph computes:

- every matrix the bundle stores quantized holds ``dequantize(quantize(W))`` (the exporter's own numpy
  quantizer, so the values are bit for bit what the graph dequantizes). Parameters are swapped in place, so a
  shared matrix stays one Parameter read by every block that shares it and a tied embedding stays tied;
  adapters, norms and OFN keep their float values;
- the *activations* entering a quantized product are rounded as the runtime rounds them: ``int8`` bundles
  quantize them per tensor to uint8 (``DynamicQuantizeLinear``, whose rounding the ONNX spec fixes); ``int4``
  bundles with MatMulNBits ``accuracy_level`` 4 let onnxruntime's CPU kernels quantize them to int8 in blocks
  of ``block_size`` along K (symmetric, ``absmax / 127``), which is what its MLAS kernels do (measured: the
  emulation matches onnxruntime 1.32 to ~1e-6). The low-rank adapter path reads the unrounded activations,
  as in the graph;
- in a ``--dense`` bundle a shared block's matrix is its merged ``W + s B A``, quantized on its own.

Everything is restored on exit: the caller's model is never changed for good. :func:`agreement` compares two
sets of reference cases (the quantized reference vs the unquantized model).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flexi_export.export.quant import QuantConfig, dequantize, quantize
from flexi_export.export.reference import ReferenceCase
from flexi_export.export.spec import Derived, ModelSpec, TensorRef
from flexi_export.export.weights import WeightRegistry, source_matrix
from flexi_export.model.build import get_module
from flexi_export.model.modules import SharedLinear

Rounding = Callable[[torch.Tensor], torch.Tensor]


def reference_registry(model: nn.Module, config: QuantConfig, dense: bool = False) -> tuple[ModelSpec, WeightRegistry]:
    """The spec and the weight registry a bundle of ``model`` quantized as ``config`` has (no data written)."""
    from flexi_export.export.decoder import build_decoder
    from flexi_export.export.spec import read_model

    spec = read_model(model, dense=dense)
    return spec, build_decoder(spec, "fp32", quant=config).registry


@contextmanager
def quantized_reference(model: nn.Module, spec: ModelSpec, registry: WeightRegistry) -> Iterator[nn.Module]:
    """Within the block ``model`` computes what the bundle of ``spec`` / ``registry`` computes (see the module
    docstring); restored on exit."""
    values = _dequantized(registry)
    swapped: list[tuple[nn.Parameter, torch.Tensor]] = []
    patched: list[nn.Module] = []
    try:
        for ref, tensor in values.values():
            if isinstance(ref, nn.Parameter):
                swapped.append((ref, ref.data))
                ref.data = tensor.to(ref.dtype)
        for module, ref in _quantized_linears(model, spec, values):
            config = next(e.quant.config for e in registry.entries if e.quant is not None and _holds(e.ref, ref))
            merged = isinstance(ref, Derived)  # a dense bundle's own matrix: no adapter path beside it
            module.forward = functools.partial(_forward, module, values[id(ref)][1], _rounding(config), merged)
            patched.append(module)
        yield model
    finally:
        for param, original in swapped:
            param.data = original
        for module in patched:
            del module.forward  # the instance attribute hid the class's forward


def _holds(stored: TensorRef, ref: TensorRef) -> bool:
    """True when ``stored`` is ``ref`` or a pack with ``ref`` among its parts."""
    return stored is ref or (isinstance(stored, Derived) and any(p is ref for p in stored.parts))


def _dequantized(registry: WeightRegistry) -> dict[int, tuple[TensorRef, torch.Tensor]]:
    """``id(ref) -> (ref, dequantize(quantize(ref)))`` for every quantized matrix, each computed once."""
    out: dict[int, tuple[TensorRef, torch.Tensor]] = {}
    for entry in registry.entries:
        if entry.quant is None or id(entry.ref) in out:
            continue
        layout, config = entry.quant.layout, entry.quant.config
        matrix = source_matrix(entry.ref)
        out[id(entry.ref)] = (
            entry.ref,
            torch.from_numpy(dequantize(quantize(matrix, layout, config), layout, config, matrix.shape[1])),
        )
        _unpack(entry.ref, out)
    return out


def _unpack(ref: TensorRef, out: dict[int, tuple[TensorRef, torch.Tensor]]) -> None:
    """A packed matrix (``--target cpu``: q/k/v or gate/up stacked by rows) is quantized row by row, so each
    member's dequantized values are its own rows of the pack: record them under the member too."""
    start = 0
    for part in ref.parts if isinstance(ref, Derived) else ():
        rows = part.shape[0]
        out[id(part)] = (part, out[id(ref)][1][start : start + rows])
        start += rows


def _quantized_linears(
    model: nn.Module, spec: ModelSpec, values: dict[int, tuple[TensorRef, torch.Tensor]]
) -> Iterator[tuple[nn.Module, TensorRef]]:
    """Every linear module whose matrix the bundle quantizes, with that matrix (block matrices, LM head)."""
    layers = get_module(model, spec.layout.layers)
    for block in spec.blocks:
        for linear in block.linears.values():
            if id(linear.weight) in values:
                yield get_module(layers[block.index], linear.path), linear.weight
    head = spec.embed if spec.tied else spec.lm_head
    if id(head) in values:
        yield get_module(model, spec.layout.lm_head), head


def _forward(
    module: nn.Module, weight: torch.Tensor, rounding: Rounding, merged: bool, x: torch.Tensor
) -> torch.Tensor:
    y = F.linear(rounding(x), weight.to(x.dtype), module.bias)
    if isinstance(module, SharedLinear):
        if not merged and module.lora_A is not None and module.lora_B is not None:
            y = y + module.scaling * module.lora_B(module.lora_A(x))
        if module.ofn is not None:
            y = module.ofn(y)
    return y


def _rounding(config: QuantConfig) -> Rounding:
    """How the runtime rounds the activations entering a quantized product (identity when it does not)."""
    if config.dtype == "int8":
        return dynamic_uint8
    if config.accuracy_level == 4:
        return functools.partial(block_int8, block_size=config.block_size)
    return lambda x: x


def dynamic_uint8(x: torch.Tensor) -> torch.Tensor:
    """ONNX ``DynamicQuantizeLinear`` then back to float: one uint8 scale and zero point for the whole tensor,
    the range widened to include 0, rounding half to even."""
    low, high = torch.clamp(x.min(), max=0.0), torch.clamp(x.max(), min=0.0)
    scale = (high - low) / 255.0
    if float(scale) == 0.0:
        return x
    zero = torch.clamp(torch.round(-low / scale), 0, 255)
    return (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale


def block_int8(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Symmetric int8 per block of ``block_size`` along the last axis (scale ``absmax / 127``), back to float:
    MatMulNBits' int8 compute (``accuracy_level`` 4) on onnxruntime's CPU kernels."""
    k = x.shape[-1]
    blocks = -(-k // block_size)
    padded = F.pad(x, (0, blocks * block_size - k)).reshape(*x.shape[:-1], blocks, block_size)
    amax = padded.abs().amax(dim=-1, keepdim=True)
    scale = amax / 127.0
    # MLAS computes the scale absmax / 127 and multiplies by its reciprocal 1 / scale (not by 127 / absmax): the
    # two differ in the last bit, and activations that are exact multiples of a step (a dequantized int4
    # embedding row) land on rounding ties where that bit decides the code (measured on onnxruntime 1.32)
    inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    rounded = torch.round(padded * inverse) * scale
    return rounded.reshape(*x.shape[:-1], blocks * block_size)[..., :k]


def agreement(ours: list[ReferenceCase], theirs: list[ReferenceCase]) -> dict[str, Any]:
    """Prefill top-1 agreement (real positions), greedy-token agreement and max |logits diff| of ``ours`` vs
    ``theirs`` (the same prompts): how far quantization moves the model, reported, not bounded."""
    top1, greedy, diff = [], [], 0.0
    for a, b in zip(ours, theirs, strict=True):
        keep = a.attention_mask.astype(bool)
        la, lb = a.logits[keep], b.logits[keep]
        top1.append(float(np.mean(la.argmax(-1) == lb.argmax(-1))))
        greedy.append(float(np.mean(a.greedy == b.greedy)))
        diff = max(diff, float(np.abs(la - lb).max()))
    return {"prefill_top1_agreement": min(top1), "greedy_agreement": min(greedy), "max_abs_logits_diff": diff}
