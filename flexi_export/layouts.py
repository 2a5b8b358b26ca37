"""Architecture adapters: where each role (embedding, q/k/v/o, gate/up/down, norms, LM head) lives.

A :class:`DecoderLayout` maps one family's parameter names to roles and reads the numbers the rest of the tool
needs (:class:`ModelDims`) from its config. A new architecture is a new layout registered here, not a branch
through the code. Llama is the reference; Mistral adds a sliding window, Qwen2 adds q/k/v biases and usually
ties its embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from flexi_export.errors import UnsupportedModelError
from flexi_export.plan import LINEAR_ROLES

#: Role -> module path inside one decoder block (identical in the three supported families).
_BLOCK_LINEARS: Mapping[str, str] = MappingProxyType(
    {
        "q_proj": "self_attn.q_proj",
        "k_proj": "self_attn.k_proj",
        "v_proj": "self_attn.v_proj",
        "o_proj": "self_attn.o_proj",
        "gate_proj": "mlp.gate_proj",
        "up_proj": "mlp.up_proj",
        "down_proj": "mlp.down_proj",
    }
)
_BLOCK_NORMS: Mapping[str, str] = MappingProxyType(
    {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
)


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding settings: ``theta`` plus the scaling type and its parameters (HF ``rope_parameters``)."""

    theta: float
    rope_type: str = "default"
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelDims:
    """The numbers of a decoder model that the builders and the exporter need."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    num_blocks: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeSpec
    tie_word_embeddings: bool
    hidden_act: str
    max_position_embeddings: int
    #: Roles whose Linear has a bias.
    bias_roles: frozenset[str]
    #: Per source block: sliding-window size, or None for full attention.
    sliding_windows: tuple[int | None, ...]


def _llama_biases(config: Any) -> frozenset[str]:
    roles: set[str] = set()
    if getattr(config, "attention_bias", False):
        roles |= {"q_proj", "k_proj", "v_proj", "o_proj"}
    if getattr(config, "mlp_bias", False):
        roles |= {"gate_proj", "up_proj", "down_proj"}
    return frozenset(roles)


def _no_biases(config: Any) -> frozenset[str]:
    return frozenset()


def _qwen2_biases(config: Any) -> frozenset[str]:
    return frozenset({"q_proj", "k_proj", "v_proj"})


def _no_windows(config: Any) -> tuple[int | None, ...]:
    return (None,) * config.num_hidden_layers


def _mistral_windows(config: Any) -> tuple[int | None, ...]:
    window = getattr(config, "sliding_window", None)
    return (window,) * config.num_hidden_layers


def _layer_type_windows(config: Any) -> tuple[int | None, ...]:
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return tuple(window if t == "sliding_attention" else None for t in types)


@dataclass(frozen=True)
class DecoderLayout:
    """Where the roles of one decoder family live, and how to read its dimensions from a config."""

    family: str
    model_types: tuple[str, ...]
    biases: Callable[[Any], frozenset[str]]
    windows: Callable[[Any], tuple[int | None, ...]]
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    rotary: str = "model.rotary_emb"
    linears: Mapping[str, str] = field(default_factory=lambda: _BLOCK_LINEARS)
    norms: Mapping[str, str] = field(default_factory=lambda: _BLOCK_NORMS)
    #: The Linear whose output is each residual branch's output (OFN normalises it).
    branch_outputs: tuple[str, ...] = ("o_proj", "down_proj")

    def dims(self, config: Any) -> ModelDims:
        """Read :class:`ModelDims` from a transformers config of this family."""
        self.check(config)
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        rope_params = dict(getattr(config, "rope_parameters", None) or {})
        theta = rope_params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        rope = RopeSpec(
            theta=float(theta),
            rope_type=str(rope_params.get("rope_type", "default")),
            params={k: v for k, v in rope_params.items() if k not in ("rope_theta", "rope_type")},
        )
        return ModelDims(
            model_type=config.model_type,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
            num_blocks=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(config.rms_norm_eps),
            rope=rope,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            hidden_act=config.hidden_act,
            max_position_embeddings=config.max_position_embeddings,
            bias_roles=self.biases(config),
            sliding_windows=self.windows(config),
        )

    def check(self, config: Any) -> None:
        """Raise :class:`UnsupportedModelError` for config features this layout cannot express."""
        if config.model_type not in self.model_types:
            raise UnsupportedModelError(f"layout {self.family!r} does not handle model_type {config.model_type!r}")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise UnsupportedModelError(
                f"hidden_act {config.hidden_act!r} is not supported (only SwiGLU with 'silu' is)"
            )

    def block_linear(self, role: str) -> str:
        """Module path of ``role`` inside a block, e.g. ``self_attn.q_proj``."""
        return self.linears[role]


LAYOUTS: dict[str, DecoderLayout] = {}


def register_layout(layout: DecoderLayout) -> DecoderLayout:
    """Make ``layout`` available for each of its model types."""
    assert set(layout.linears) == set(LINEAR_ROLES), "a layout must map every linear role"
    for model_type in layout.model_types:
        LAYOUTS[model_type] = layout
    return layout


LLAMA = register_layout(DecoderLayout("llama", ("llama",), biases=_llama_biases, windows=_no_windows))
MISTRAL = register_layout(DecoderLayout("mistral", ("mistral",), biases=_no_biases, windows=_mistral_windows))
QWEN2 = register_layout(DecoderLayout("qwen2", ("qwen2",), biases=_qwen2_biases, windows=_layer_type_windows))


def supported_model_types() -> list[str]:
    """Sorted model types that have a layout."""
    return sorted(LAYOUTS)


def layout_for(model_type: str) -> DecoderLayout:
    """The layout of ``model_type``; :class:`UnsupportedModelError` listing the supported types otherwise."""
    try:
        return LAYOUTS[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(supported_model_types())}"
        ) from None
