"""Flexi checkpoints: ``config.json`` + ``flexi_plan.json`` + ``model.safetensors`` (+ tokenizer files).

Each tensor is stored once, under its owner's name: a shared block's base weights are not parameters of the
shared block (they are references), so they never appear twice. No pickle anywhere: safetensors and JSON only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from flexi_export.errors import CheckpointError, FlexiError, InputError
from flexi_export.files import atomic_output_dir
from flexi_export.layouts import layout_for
from flexi_export.model.build import get_plan, make_skeleton, materialize
from flexi_export.plan import BlockPlan

CHECKPOINT_FORMAT = "flexi-checkpoint/1"
WEIGHTS_NAME = "model.safetensors"
PLAN_NAME = "flexi_plan.json"


def flexi_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter once, by its first (owner) name: what a checkpoint stores."""
    return {name: p.detach() for name, p in model.named_parameters()}


def save_flexi(
    model: PreTrainedModel,
    out_dir: str | Path,
    tokenizer: Any | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (built by :func:`~flexi_export.model.build_flexi`) as a Flexi checkpoint.

    The folder is written under a temporary name and renamed at the end, so an interrupted save leaves nothing
    half-written. ``tokenizer`` (a transformers tokenizer) is saved beside the weights when given.
    """
    plan = get_plan(model)
    if plan is None:
        raise InputError("save_flexi needs a Flexi model (built by build_flexi or load_flexi)")
    tensors = {k: v.contiguous().cpu() for k, v in flexi_tensors(model).items()}
    metadata = {"format": "pt", "flexi_format": CHECKPOINT_FORMAT, "flexi_plan_fingerprint": plan.fingerprint()}
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        plan.save(tmp / PLAN_NAME)
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=metadata)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def is_flexi_checkpoint(path: str | Path) -> bool:
    """True when ``path`` is a folder with a ``flexi_plan.json``."""
    return (Path(path) / PLAN_NAME).is_file()


def read_config(path: str | Path) -> PretrainedConfig:
    """The transformers config of a model folder, with one-line errors for missing or unreadable files."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"no such file or folder: {path}")
    if not path.is_dir():
        raise InputError(f"{path} is not a folder (expected a model folder with config.json)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise InputError(f"{path} is not a model folder: config.json is missing")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise CheckpointError(f"{config_file} is not valid JSON ({exc})") from None
    layout_for(str(model_type))  # unsupported architectures fail here, with the supported list
    try:
        return AutoConfig.from_pretrained(path)
    except Exception as exc:  # transformers and huggingface_hub raise many types for an inconsistent config
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read {config_file}: {first.strip()}") from None


def load_flexi(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """Load a Flexi checkpoint written by :func:`save_flexi`; shared parameters share storage again.

    ``attn_implementation`` ("eager", "sdpa", ...) defaults to transformers' default, as ``from_pretrained``.
    """
    path = Path(path)
    config = read_config(path)
    if not (path / PLAN_NAME).is_file():
        raise CheckpointError(f"{path} has no {PLAN_NAME}: it is not a Flexi checkpoint")
    try:
        plan = BlockPlan.load(path / PLAN_NAME)
    except InputError as exc:
        raise CheckpointError(str(exc)) from None
    if plan.num_executed != config.num_hidden_layers:
        raise CheckpointError(
            f"{path}: config.json has num_hidden_layers={config.num_hidden_layers} but the plan executes "
            f"{plan.num_executed} blocks"
        )
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{path} has no {WEIGHTS_NAME}")
    model = make_skeleton(config, plan, attn_implementation=attn_implementation)
    tensors, metadata = _read_safetensors(weights, device)
    stored = metadata.get("flexi_plan_fingerprint")
    if stored is not None and stored != plan.fingerprint():
        raise CheckpointError(
            f"{weights} was written for another plan (fingerprint {stored[:12]} != {plan.fingerprint()[:12]})"
        )
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    try:
        materialize(model, tensors, device)
    except FlexiError as exc:
        raise CheckpointError(f"{weights}: {exc}") from None
    model.eval()
    return model


def _read_safetensors(path: Path, device: str | torch.device) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as exc:  # safetensors raises its own error type for corrupt or truncated files
        raise CheckpointError(f"{path} is corrupt or truncated ({type(exc).__name__}: {exc})") from None
    return tensors, metadata
