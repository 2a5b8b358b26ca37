"""The models whose bundles the client tests run: random weights, real architectures, real (trained) tokenizers.

- ``qwen2_tied``: tests.helpers' tiny Qwen2 (q/k/v biases, tied embeddings) under the mixed Flexi plan (shared
  blocks with adapters and OFN, a removed block, inserted blocks), with a 320-token byte-level BPE tokenizer.
- ``reference_flexi30``: the reference model's architecture (``SPECS["default"]``: Llama, hidden 320, GQA 4/2,
  head_dim 80, tied embeddings) under the golden 30% plan (``graphs/golden/reference-flexi-30.plan.json``),
  random weights, with a 1024-token tokenizer trained on the reference corpus in a fraction of a second; CI does
  not need the 10-minute reference training. (The real trained model's export is checked by hand: docs/clients.md.)
- ``mistral_window``: tests.helpers' tiny Mistral (sliding window 8, shorter than the 16-token reference prompts)
  under the mixed Flexi plan: the window must hold when a client pads a batch on the right (onnxruntime-genai).
- ``llama_wide_heads``: a tiny Llama whose head_dim (32) is not hidden / heads (16): a bundle optimum cannot run.

Seeds and initializer ranges are chosen so that greedy decoding is decisive (:func:`greedy_margin`: no step's
top-2 logits closer than 100x the fp32 logits tolerance) and no reference row reaches EOS (all 16 tokens of
every row are compared).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel

from flexi_export.export.bundle import pad_token_id
from flexi_export.export.reference import GREEDY_TOKENS, left_pad, reference_prompts
from flexi_export.model import build_flexi
from flexi_export.plan import BlockPlan
from flexi_export.reference.corpus import split, stdlib_documents
from flexi_export.reference.train import SPECS, reference_config, train_tokenizer
from flexi_export.verify.runtime import position_ids_from_mask
from tests.helpers import mixed_plan, randomize_own, tiny_model

GOLDEN_PLAN = Path(__file__).resolve().parents[2] / "graphs" / "golden" / "reference-flexi-30.plan.json"


@functools.cache
def tokenizer(vocab_size: int, chars: int) -> Any:
    """A byte-level BPE tokenizer (``<pad>``=0, ``<s>``=1, ``</s>``=2) trained on ``chars`` characters of the
    reference corpus' training split, exactly as the reference model's tokenizer is trained."""
    texts = [d.text for d in split(stdlib_documents())[0]]
    spec = dataclasses.replace(SPECS["tiny"], vocab_size=vocab_size, tokenizer_chars=chars)
    return train_tokenizer(texts, spec)


def qwen2_tied() -> tuple[PreTrainedModel, Any]:
    """The tiny tied-embedding Qwen2 under the mixed Flexi plan, and its tokenizer."""
    model = randomize_own(build_flexi(tiny_model("qwen2", seed=8), mixed_plan("qwen2", ofn="layernorm")), seed=8)
    return model, tokenizer(320, 100_000)


def reference_flexi30() -> tuple[PreTrainedModel, Any]:
    """The reference architecture, random weights (initializer range 0.1), under the golden 30% plan."""
    tok = tokenizer(1024, 200_000)
    config = reference_config(SPECS["default"], vocab_size=len(tok))
    config.initializer_range = 0.1  # wide logits: decisive greedy steps (0.02, the training init, gives near-ties)
    torch.manual_seed(1)
    source = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    return randomize_own(build_flexi(source, BlockPlan.load(GOLDEN_PLAN)), seed=1), tok


def mistral_window() -> tuple[PreTrainedModel, Any]:
    """The tiny Mistral (sliding window 8) under the mixed Flexi plan, and its tokenizer."""
    model = build_flexi(tiny_model("mistral", seed=19), mixed_plan("mistral", ofn="layernorm"))
    return randomize_own(model, seed=19), tokenizer(320, 100_000)


def llama_wide_heads() -> tuple[PreTrainedModel, Any]:
    """A tiny Llama with head_dim 32 while hidden / heads is 16 (optimum assumes the latter)."""
    return tiny_model("llama", head_dim=32), tokenizer(320, 100_000)


@torch.no_grad()
def greedy_margin(model: PreTrainedModel, tok: Any) -> tuple[float, int]:
    """``(smallest top-1 minus top-2 logit gap, EOS tokens)`` over the reference prompts' greedy steps."""
    prompts = reference_prompts(tok, model.config.vocab_size)
    gaps, eos = [], 0
    for group in (prompts[:1], prompts[1:]):
        ids, mask = left_pad(group, pad_token_id(model, tok))
        pos = torch.from_numpy(position_ids_from_mask(mask))
        step, mask_t, cache = torch.from_numpy(ids), torch.from_numpy(mask), DynamicCache()
        for _ in range(GREEDY_TOKENS):
            logits = model(input_ids=step, attention_mask=mask_t, position_ids=pos, past_key_values=cache).logits[:, -1]
            top = logits.topk(2).values
            gaps.append(float((top[:, 0] - top[:, 1]).min()))
            step = logits.argmax(-1, keepdim=True)
            eos += int((step == model.config.eos_token_id).sum())
            mask_t, pos = torch.cat([mask_t, torch.ones_like(step)], dim=1), pos[:, -1:] + 1
    return min(gaps), eos
