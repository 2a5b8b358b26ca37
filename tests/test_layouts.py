"""DecoderLayout: one registry entry per family, dimensions read from configs, clear errors."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig, Qwen2Config

from flexi_export.errors import UnsupportedModelError
from flexi_export.layouts import layout_for, supported_model_types
from tests.helpers import tiny_config


def test_supported_model_types():
    assert supported_model_types() == ["llama", "mistral", "qwen2"]


def test_unsupported_model_type_lists_supported_ones():
    with pytest.raises(
        UnsupportedModelError, match="unsupported model_type 'falcon'; supported: llama, mistral, qwen2"
    ):
        layout_for("falcon")


def test_llama_dims_with_gqa_and_llama3_rope():
    dims = layout_for("llama").dims(tiny_config("llama"))
    assert (dims.num_heads, dims.num_kv_heads, dims.head_dim) == (4, 2, 16)
    assert dims.rope.rope_type == "llama3" and dims.rope.params["factor"] == 8.0 and dims.rope.theta == 10000.0
    assert dims.bias_roles == frozenset() and not dims.tie_word_embeddings
    assert dims.sliding_windows == (None,) * 6


def test_llama_attention_and_mlp_biases():
    config = LlamaConfig(hidden_size=32, num_attention_heads=2, attention_bias=True, mlp_bias=True)
    assert layout_for("llama").dims(config).bias_roles == frozenset(
        {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    )


def test_qwen2_biases_and_tied_embeddings():
    dims = layout_for("qwen2").dims(tiny_config("qwen2"))
    assert dims.bias_roles == frozenset({"q_proj", "k_proj", "v_proj"})
    assert dims.tie_word_embeddings


def test_qwen2_sliding_layers_follow_layer_types():
    config = Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=16, max_window_layers=2)
    assert layout_for("qwen2").dims(config).sliding_windows == (None, None, 16, 16)


def test_mistral_sliding_window_applies_to_every_block():
    assert layout_for("mistral").dims(tiny_config("mistral")).sliding_windows == (8,) * 6


def test_non_swiglu_activation_is_refused():
    with pytest.raises(UnsupportedModelError, match="hidden_act 'gelu' is not supported"):
        layout_for("llama").dims(tiny_config("llama", hidden_act="gelu"))
