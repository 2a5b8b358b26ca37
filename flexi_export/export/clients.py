"""Which external clients can run a bundle: the limits of each, checked at export time.

The bundle is meant to run unchanged in optimum (``ORTModelForCausalLM``), onnxruntime-genai, transformers.js
and onnxruntime's mobile format (``scripts/clients/check_clients.py`` runs all four). Each client assumes
things about a model that its ONNX graph alone does not tell it; :func:`client_issues` lists, per client, what
in a bundle's config and I/O the client cannot express, and :func:`warn_client_issues` turns them into
:class:`ClientCompatibilityWarning` warnings (``flexi-export export`` shows them on stderr) and
:func:`compatibility` records them in the manifest (``clients``).

What the clients read (optimum-onnx 0.1.0, onnxruntime-genai 0.18.0, transformers.js 4.3.1):

- optimum sizes the first, empty, cache as ``[batch, num_key_value_heads, 0, hidden_size // num_attention_heads]``
  for every model type except a few that read ``config.head_dim`` (gemma, gemma3_text, gpt_oss, nemotron),
  and uses one ``num_key_value_heads`` for every layer. ``config.json``'s ``model_type`` must be a type it knows.
- onnxruntime-genai allocates the cache from ``genai_config.json``'s single ``num_key_value_heads`` x
  ``head_size`` and accepts only the model types it was built with.
- transformers.js builds the empty cache from each ``past_key_values.*`` input's own shape (per-layer shapes
  work), needs a causal-LM ``model_type`` it knows, and its bundled onnxruntime-node 1.30 loads opsets <= 26.
- onnxruntime mobile (``.ort``): standard ops only, which the exporter always emits; nothing to warn about.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from flexi_export.export.io_spec import IOSpec

OPTIMUM = "optimum"
GENAI = "onnxruntime-genai"
TRANSFORMERS_JS = "transformers.js"
CLIENTS = (OPTIMUM, GENAI, TRANSFORMERS_JS, "ort-mobile")


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


# optimum-onnx 0.1.0: TasksManager's model types for "text-generation-with-past" (decoder-only ones)
_OPTIMUM_TYPES = _names(
    """arcee bloom codegen cohere deepseek_v3 falcon gemma gemma2 gemma3 gemma3_text glm gpt2 gpt_bigcode gpt_neo
    gpt_neox gpt_oss gptj granite helium internlm2 llama mistral mpt nemotron olmo olmo2 opt phi phi3 qwen2 qwen3
    qwen3_moe smollm3 stablelm"""
)
# optimum reads config.head_dim for these; every other type gets hidden_size // num_attention_heads
_OPTIMUM_HEAD_DIM_TYPES = frozenset({"gemma", "gemma3_text", "gpt_oss", "nemotron"})
# onnxruntime-genai 0.18.0: src/models/model_type.h
_GENAI_TYPES = _names(
    """chatglm decoder ernie4_5 gemma gemma2 gemma3_text gpt2 gptoss granite internlm2 lfm2 llama mistral nemotron
    olmo phi phimoe phi3 phi3small qwen2 qwen3 smollm3"""
)
# transformers.js 4.3.1: MODEL_FOR_CAUSAL_LM_MAPPING_NAMES (text-only decoders)
_TRANSFORMERS_JS_TYPES = _names(
    """bloom gpt2 gpt_oss jais gptj gpt_bigcode gpt_neo gpt_neox codegen llama nanochat apertus llama4_text arcee
    afmoe lfm2 lfm2_moe smollm3 exaone olmo olmo2 olmo3 olmo_hybrid mobilellm granite granitemoehybrid cohere
    cohere2 gemma gemma2 vaultgemma gemma3_text helium glm glm_moe_dsa openelm qwen2 qwen2_moe qwen3 qwen3_moe
    qwen3_next qwen3_5_text phi phi3 mpt opt mistral ministral ministral3 ernie4_5 starcoder2 deepseek_v3 falcon
    falcon_h1 nemotron_h stablelm"""
)
_TRANSFORMERS_JS_MAX_OPSET = 26  # onnxruntime-node 1.30, which transformers.js 4.3 bundles


class ClientCompatibilityWarning(UserWarning):
    """A bundle was written that one of the supported external clients cannot run."""


@dataclass(frozen=True)
class ClientIssue:
    """Why ``client`` cannot run the bundle."""

    client: str
    reason: str

    def __str__(self) -> str:
        return f"{self.client} cannot run this bundle: {self.reason}"


def cache_shapes(io: IOSpec) -> list[tuple[int, int]]:
    """``(kv_heads, head_dim)`` of every ``past_key_values.*`` input, in order."""
    shapes = []
    for spec in io.inputs:
        if spec.name.startswith("past_key_values."):
            heads, head_dim = spec.dims[1], spec.dims[3]
            shapes.append((int(heads), int(head_dim)))
    return shapes


def client_issues(config: Any, io: IOSpec, opset: int) -> list[ClientIssue]:
    """What each client cannot express about a bundle of ``config`` (its ``config.json``) and ``io``."""
    model_type = config.model_type
    shapes = sorted(set(cache_shapes(io)))
    issues = []
    for client, known in ((OPTIMUM, _OPTIMUM_TYPES), (GENAI, _GENAI_TYPES), (TRANSFORMERS_JS, _TRANSFORMERS_JS_TYPES)):
        if model_type not in known:
            issues.append(ClientIssue(client, f"it does not know model_type {model_type!r}"))
    if len(shapes) > 1:
        listed = ", ".join(f"{h}x{d}" for h, d in shapes)
        reason = f"the layers' caches differ in kv heads x head_dim ({listed}); it sizes every layer's cache alike"
        issues += [ClientIssue(OPTIMUM, reason), ClientIssue(GENAI, reason)]
    if shapes and model_type not in _OPTIMUM_HEAD_DIM_TYPES:
        derived = config.hidden_size // config.num_attention_heads
        wrong = sorted({d for _, d in shapes if d != derived})
        if wrong:
            issues.append(
                ClientIssue(
                    OPTIMUM,
                    f"it assumes head_dim = hidden_size // num_attention_heads = {derived} for {model_type}, "
                    f"the cache has head_dim {', '.join(map(str, wrong))}",
                )
            )
    if opset > _TRANSFORMERS_JS_MAX_OPSET:
        issues.append(
            ClientIssue(
                TRANSFORMERS_JS, f"its onnxruntime-node loads opsets <= {_TRANSFORMERS_JS_MAX_OPSET}, not {opset}"
            )
        )
    return issues


def warn_client_issues(issues: list[ClientIssue]) -> None:
    """Emit one :class:`ClientCompatibilityWarning` per issue."""
    for issue in issues:
        warnings.warn(str(issue), ClientCompatibilityWarning, stacklevel=3)


def compatibility(issues: list[ClientIssue]) -> dict[str, dict[str, Any]]:
    """The manifest's ``clients`` section: per client, ``compatible`` (none of its known limits applies) and the
    ``issues`` that do apply. Whether a client really runs a bundle is what ``scripts/clients`` checks."""
    out = {}
    for client in CLIENTS:
        reasons = [i.reason for i in issues if i.client == client]
        out[client] = {"compatible": not reasons, "issues": reasons}
    return out
