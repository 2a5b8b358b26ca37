"""``reference.npz``: golden inputs and outputs computed at export time from the PyTorch model (fp32).

Two cases from three prompts: ``single`` (one prompt, batch 1) and ``batch`` (two prompts of different
lengths, left-padded into one batch). For each case the file holds ``{case}.input_ids``,
``{case}.attention_mask``, ``{case}.position_ids`` (int64), ``{case}.logits`` (float32 prefill logits) and
``{case}.greedy`` (int64 ``[B, 16]``: greedy tokens from the torch model with its KV cache, never stopping at
EOS), plus ``cases`` (the case names) and the tolerances as ``tol.<name>`` scalars. Anything that reads a
bundle (``device_tests/``, ``flexi-export verify``) can replay it with onnxruntime and numpy alone
(``device_tests/flexi_device.py`` reads it without torch).

Position ids follow transformers' ``generate``: ``cumsum(attention_mask) - 1``, padding positions set to 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedModel

from flexi_export.verify.runtime import REFERENCE_NAME, ReferenceCase, load_reference, position_ids_from_mask

GREEDY_TOKENS = 16
MAX_PROMPT_TOKENS = 16
#: The texts of the reference prompts (encoded with the bundle's tokenizer, at most 16 tokens each).
REFERENCE_TEXTS = (
    "def fibonacci(n):\n    if n < 2:",
    "The quick brown fox jumps over the lazy dog because it",
    "import os\nprint(os.",
)
_RANDOM_LENGTHS = (9, 12, 6)


def reference_prompts(tokenizer: Any | None, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Three prompts: the tokenizer's encoding of fixed texts, or fixed random ids without a usable tokenizer."""
    if tokenizer is not None:
        prompts = [list(tokenizer(text)["input_ids"])[:MAX_PROMPT_TOKENS] for text in REFERENCE_TEXTS]
        if all(len(p) >= 2 and max(p) < vocab_size and min(p) >= 0 for p in prompts):
            return _distinct_batch_lengths(prompts)
    rng = np.random.default_rng(seed)
    low = min(3, vocab_size - 1)  # skip the usual special ids (pad/bos/eos) when the vocabulary allows it
    return [rng.integers(low, vocab_size, size=n).tolist() for n in _RANDOM_LENGTHS]


def _distinct_batch_lengths(prompts: list[list[int]]) -> list[list[int]]:
    """The batched pair must differ in length, or the batch case would test no padding."""
    if len(prompts[1]) == len(prompts[2]):
        prompts[2] = prompts[2][: max(1, len(prompts[2]) - 2)]
    return prompts


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad ``prompts`` into ``(input_ids, attention_mask)``."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = p
        mask[row, width - len(p) :] = 1
    return ids, mask


@torch.no_grad()
def torch_greedy(
    model: PreTrainedModel, ids: np.ndarray, mask: np.ndarray, steps: int = GREEDY_TOKENS
) -> tuple[np.ndarray, np.ndarray]:
    """``(prefill logits, steps greedy tokens)`` with the model's KV cache.

    A plain ``DynamicCache`` keeps every token in every layer; sliding-window layers are masked, which gives
    the same logits as transformers' windowed cache. The first step's logits are the prompt's full logits.
    """
    cache = DynamicCache()
    mask_t = torch.from_numpy(mask)
    pos = torch.from_numpy(position_ids_from_mask(mask))
    step_ids = torch.from_numpy(ids)
    tokens, prefill = [], None
    for _ in range(steps):
        out = model(input_ids=step_ids, attention_mask=mask_t, position_ids=pos, past_key_values=cache, use_cache=True)
        prefill = out.logits.float().numpy() if prefill is None else prefill
        step_ids = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(step_ids)
        mask_t = torch.cat([mask_t, torch.ones_like(step_ids)], dim=1)
        pos = pos[:, -1:] + 1
    return prefill, torch.cat(tokens, dim=1).numpy().astype(np.int64)


def compute_reference(model: PreTrainedModel, tokenizer: Any | None, pad_id: int) -> list[ReferenceCase]:
    """The golden cases of ``model`` (a float32 model in eval mode)."""
    prompts = reference_prompts(tokenizer, model.config.vocab_size)
    cases = []
    for name, group in (("single", prompts[:1]), ("batch", prompts[1:])):
        ids, mask = left_pad(group, pad_id)
        logits, greedy = torch_greedy(model, ids, mask)
        cases.append(ReferenceCase(name, ids, mask, position_ids_from_mask(mask), logits, greedy))
    return cases


def save_reference(path: Path, cases: list[ReferenceCase], tolerances: dict[str, Any]) -> Path:
    """Write the cases and the (numeric) tolerances as a compressed ``.npz``."""
    arrays: dict[str, np.ndarray] = {"cases": np.array([c.name for c in cases])}
    for c in cases:
        for field in ("input_ids", "attention_mask", "position_ids", "logits", "greedy"):
            arrays[f"{c.name}.{field}"] = getattr(c, field)
    for key, value in tolerances.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            arrays[f"tol.{key}"] = np.array(value, dtype=np.float64)
    np.savez_compressed(path, **arrays)
    return path


__all__ = [
    "GREEDY_TOKENS",
    "REFERENCE_NAME",
    "REFERENCE_TEXTS",
    "ReferenceCase",
    "compute_reference",
    "left_pad",
    "load_reference",
    "reference_prompts",
    "save_reference",
    "torch_greedy",
]
