"""Torch and onnxruntime runs the export tests compare."""

from __future__ import annotations

import numpy as np
import torch
from transformers import DynamicCache

from flexi_export.verify.ort_runner import OrtDecoder, position_ids_from_mask

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


__all__ = ["ATOL", "RTOL", "decoder", "max_diff", "max_excess", "position_ids_from_mask", "random_ids", "torch_step"]
