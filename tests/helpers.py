"""Tiny models and plans shared by the test suites (random weights, built from configs: nothing downloaded)."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
)

from flexi_export.model.modules import OutputFeatureNorm, SharedLinear
from flexi_export.plan import AdapterSpec, BlockPlan, SourceInfo, original, removed, shared

FAMILIES = ("llama", "mistral", "qwen2")

_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=320,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    initializer_range=0.2,  # larger than the default so logits are not flat and greedy decoding is decisive
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def tiny_config(family: str, **overrides: object) -> PretrainedConfig:
    """A tiny config of ``family``: Llama with llama3 RoPE scaling and GQA, Mistral with a sliding window of 8,
    Qwen2 with q/k/v biases and tied embeddings."""
    kwargs = {**_COMMON, **overrides}
    if family == "llama":
        kwargs.setdefault(
            "rope_parameters",
            {
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        )
        return LlamaConfig(**kwargs)
    if family == "mistral":
        kwargs.setdefault("sliding_window", 8)
        return MistralConfig(**kwargs)
    if family == "qwen2":
        kwargs.setdefault("tie_word_embeddings", True)
        return Qwen2Config(**kwargs)
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0, **overrides: object) -> PreTrainedModel:
    """A tiny random model of ``family`` in eval mode (fp32, eager attention for exact comparisons)."""
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.eval()


def mixed_plan(
    model_type: str, num_blocks: int = 6, rank: int = 4, ofn: str = "none", targets: tuple[str, ...] | None = None
) -> BlockPlan:
    """Every entry kind in one plan over 6 source blocks, executing 7 blocks:

    ``0, 1, shared(1) for pruned 2, (3 removed), 4, shared(4) inserted, 5, shared(0) inserted``; adapters on every
    matrix, or on ``targets`` only.
    """
    assert num_blocks == 6
    adapter = AdapterSpec(rank=rank, alpha=2.0 * rank, **({} if targets is None else {"targets": targets}))
    return BlockPlan(
        SourceInfo(model_type, num_blocks),
        (
            original(0),
            original(1),
            shared(1, replaces=2, adapter=adapter, ofn=ofn),
            removed(3),
            original(4),
            shared(4, replaces=None, adapter=adapter, ofn="rms"),
            original(5),
            shared(0, replaces=None, adapter=adapter, ofn="rms"),
        ),
    )


def randomize_own(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every adapter a non-zero B and every OFN gamma a non-trivial value, in place (test models only),
    so that tests exercise the adapter and OFN paths instead of zero no-ops."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SharedLinear) and module.lora_B is not None:
                w = module.lora_B.weight
                w.copy_(torch.randn(w.shape, generator=gen) * 0.1)
            if isinstance(module, OutputFeatureNorm):
                w = module.weight
                w.copy_(1.0 + 0.5 * torch.randn(w.shape, generator=gen))
    return model
