"""Load the model to compress or export: a Hugging Face folder (or hub id) or a Flexi checkpoint."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from flexi_export.checkpoint import is_flexi_checkpoint, load_flexi, read_config
from flexi_export.errors import CheckpointError, InputError
from flexi_export.files import update_digest
from flexi_export.layouts import DecoderLayout, layout_for
from flexi_export.model.build import PLAN_ATTR, get_plan
from flexi_export.plan import BlockPlan

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class SourceModel:
    """A loaded model with what the rest of the pipeline needs to know about it."""

    model: PreTrainedModel
    tokenizer: Any | None
    layout: DecoderLayout
    path: str
    #: The checkpoint's plan for a Flexi checkpoint, the identity plan for a plain model.
    plan: BlockPlan
    is_flexi: bool


def load_source(
    path: str | Path,
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
) -> SourceModel:
    """Load an HF model folder, a hub id found in the local HF cache, or a Flexi checkpoint.

    Every user-caused failure (missing folder, missing config, unsupported architecture, corrupt weights)
    raises a :class:`~flexi_export.errors.FlexiError` with a one-line message.
    """
    text = str(path)
    local = Path(path)
    if not local.exists() and _looks_like_hub_id(text):
        return load_source(_hub_folder(text), dtype, device, attn_implementation)
    config = read_config(local)
    layout = layout_for(config.model_type)
    if is_flexi_checkpoint(local):
        model = load_flexi(local, device=device, dtype=dtype, attn_implementation=attn_implementation)
        plan = get_plan(model)
        assert plan is not None
        return SourceModel(model, _tokenizer(local), layout, text, plan, is_flexi=True)
    try:
        extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
        model = AutoModelForCausalLM.from_pretrained(local, dtype=dtype or "auto", **extra).to(device)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointError(f"cannot load the weights in {local}: {_first_line(exc)}") from None
    except Exception as exc:  # safetensors' own error type for corrupt files
        if type(exc).__name__ == "SafetensorError":
            raise CheckpointError(f"the weights in {local} are corrupt or truncated: {_first_line(exc)}") from None
        raise
    model.eval()
    plan = BlockPlan.identity(config.model_type, config.num_hidden_layers, name=text)
    setattr(model, PLAN_ATTR, plan)
    return SourceModel(model, _tokenizer(local), layout, text, plan, is_flexi=False)


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~"))


def _hub_folder(model_id: str) -> Path:
    try:
        return Path(_hub_snapshot(model_id))
    except Exception as exc:  # no network, unknown id, gated repo: all end the same way for the user
        raise InputError(
            f"{model_id} is not a local folder, and the hub model could not be loaded ({_first_line(exc)})"
        ) from None


def _hub_snapshot(model_id: str) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(model_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"])


def _tokenizer(path: Path) -> Any | None:
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"cannot load the tokenizer in {path}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def model_fingerprint(path: str | Path) -> str:
    """sha256 over the config and weight files of a model folder (names and bytes), for provenance."""
    digest = hashlib.sha256()
    for file in sorted(Path(path).iterdir()):
        if file.is_file() and (file.name == "config.json" or file.suffix == ".safetensors"):
            digest.update(file.name.encode())
            update_digest(digest, file)
    return digest.hexdigest()
