"""Torch and onnxruntime runs the export tests compare."""

from __future__ import annotations

import numpy as np
import torch
from transformers import DynamicCache

from flexi_export.export.quant import QuantConfig
from flexi_export.export.quant_reference import quantized_reference, reference_registry
from flexi_export.verify.runtime import OrtDecoder, device, position_ids_from_mask

ATOL = RTOL = 1e-4


@torch.no_grad()
def torch_step(model, ids, mask, pos, cache: DynamicCache | None = None):
    """Logits and the full cache of each layer ``[(key, value), ...]`` after one forward with a plain cache."""
    cache = DynamicCache() if cache is None else cache
    out = model(
        input_ids=torch.from_numpy(ids),
        attention_mask=torch.from_numpy(mask),
        position_ids=torch.from_numpy(pos),
        past_key_values=cache,
        use_cache=True,
    )
    presents = [(layer.keys.numpy(), layer.values.numpy()) for layer in cache.layers]
    return out.logits.numpy(), presents, cache


def max_excess(ours: np.ndarray, ref: np.ndarray) -> float:
    """How far ``ours`` is outside ``atol + rtol * |ref|`` (<= 0 means within tolerance)."""
    return float(np.max(np.abs(ours - ref) - (ATOL + RTOL * np.abs(ref))))


def max_diff(ours: np.ndarray, ref: np.ndarray) -> float:
    """Largest absolute difference."""
    return float(np.max(np.abs(ours.astype(np.float32) - ref.astype(np.float32))))


def random_ids(vocab: int, batch: int, length: int, seed: int = 0) -> np.ndarray:
    """Token ids in ``[3, vocab)``."""
    return np.random.default_rng(seed).integers(3, vocab, size=(batch, length)).astype(np.int64)


def decoder(bundle) -> OrtDecoder:
    """A one-thread session over ``bundle`` with the manifest's recommended options."""
    return OrtDecoder(bundle.path, threads=1)


def reference_evaluator_run(bundle, ids, mask, pos) -> np.ndarray:
    """Logits from ``onnx.reference.ReferenceEvaluator``: the graph's ONNX semantics, computed by numpy in the
    graph's own dtypes (an oracle independent of onnxruntime's fusions and automatic fp32 fallbacks)."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    proto = onnx.load(str(bundle.onnx_path))
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    for value in proto.graph.input:
        if value.name.startswith("past_key_values."):
            tensor = value.type.tensor_type
            dims = [d.dim_value for d in tensor.shape.dim]
            dtype = np.float16 if tensor.elem_type == onnx.TensorProto.FLOAT16 else np.float32
            feeds[value.name] = np.zeros((ids.shape[0], dims[1], 0, dims[3]), dtype=dtype)
    return ReferenceEvaluator(proto).run(["logits"], feeds)[0]


def char_tokenizer():
    """A character-level fast tokenizer (ids < 104) built locally: nothing downloaded."""
    import string

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for char in string.printable:
        vocab.setdefault(char, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


__all__ = [
    "ATOL",
    "RTOL",
    "char_tokenizer",
    "decoder",
    "max_diff",
    "max_excess",
    "ort_vs_quantized_reference",
    "position_ids_from_mask",
    "random_ids",
    "reference_evaluator_run",
    "torch_step",
]


def ort_vs_quantized_reference(bundle, model, config_json, batch=2, length=7, seed=1):
    """(onnxruntime logits, PyTorch logits of the model with the same quantization) on left-padded prompts."""
    vocab = model.config.vocab_size
    ids = random_ids(vocab, batch, length, seed)
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    pos = position_ids_from_mask(mask)
    described = device.Bundle(bundle.path)
    got, _ = OrtDecoder(described.model, described.options("recommended", 1), 1).run(ids, mask, pos)
    config = QuantConfig.from_json(config_json)
    spec, registry = reference_registry(model, config)
    with quantized_reference(model, spec, registry):
        want, _, _ = torch_step(model, ids, mask, pos)
    keep = mask.astype(bool)
    return got[keep], want[keep]
