"""Build a Flexi model: a transformers model whose blocks follow a :class:`~flexi_export.plan.BlockPlan`.

Two phases (as in gpt-fast): first a *skeleton* is made on the meta device with the executed block structure
(shared blocks hold :class:`SharedLinear` modules that reference their owner's Linear modules), then
:func:`materialize` assigns real tensors by parameter name. :func:`build_flexi` feeds it the source model's own
``nn.Parameter`` objects (never copies) plus fresh adapter / norm / OFN tensors; ``load_flexi`` feeds it the
tensors of a checkpoint. Both therefore produce the same module structure and the same parameter names.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from flexi_export.errors import CheckpointError, PlanError
from flexi_export.layouts import DecoderLayout, ModelDims, layout_for
from flexi_export.model.modules import OutputFeatureNorm, SharedLinear, SharedNorm
from flexi_export.plan import BlockEntry, BlockPlan, ExecutedBlock

#: Attribute under which a Flexi model carries its plan.
PLAN_ATTR = "flexi_plan"


def get_plan(model: nn.Module) -> BlockPlan | None:
    """The plan a Flexi model was built from (None for a plain transformers model)."""
    return getattr(model, PLAN_ATTR, None)


def get_module(root: nn.Module, path: str) -> Any:
    """``root.a.b.c`` for ``path="a.b.c"`` (numeric parts index ModuleLists)."""
    obj: Any = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def _split(path: str) -> tuple[str, str]:
    parent, _, leaf = path.rpartition(".")
    return parent, leaf


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at ``path``."""
    parent, leaf = _split(path)
    setattr(get_module(root, parent) if parent else root, leaf, module)


def set_parameter(root: nn.Module, path: str, value: torch.Tensor) -> None:
    """Set the parameter at ``path``; an ``nn.Parameter`` is assigned as is (the same object, shared)."""
    parent, leaf = _split(path)
    param = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=value.is_floating_point())
    setattr(get_module(root, parent), leaf, param)


# --------------------------------------------------------------------------------------------------- config
def executed_config(source_config: PretrainedConfig, plan: BlockPlan) -> PretrainedConfig:
    """The source config with ``num_hidden_layers`` = executed blocks (and per-block layer types remapped).

    A replacement block takes the attention type of the block it replaces; an inserted block that of its source.
    """
    executed = plan.executed()
    config = copy.deepcopy(source_config)
    config.num_hidden_layers = len(executed)
    layer_types = getattr(source_config, "layer_types", None)
    if layer_types is not None:
        config.layer_types = [layer_types[_position_of(b.entry)] for b in executed]
    return config


def _position_of(entry: BlockEntry) -> int:
    """The source block whose *position* an executed entry takes."""
    return entry.replaces if entry.kind == "shared" and entry.replaces is not None else entry.source


def check_plan_fits(plan: BlockPlan, source_config: PretrainedConfig) -> None:
    """Raise :class:`PlanError` unless ``plan`` was made for a model like ``source_config``."""
    plan.validate()
    problems = []
    if plan.source.model_type != source_config.model_type:
        problems.append(
            f"the plan is for model_type {plan.source.model_type!r}, the model is {source_config.model_type!r}"
        )
    if plan.source.num_blocks != source_config.num_hidden_layers:
        problems.append(
            f"the plan is for {plan.source.num_blocks} blocks, the model has {source_config.num_hidden_layers}"
        )
    if problems:
        raise PlanError(problems)


# ------------------------------------------------------------------------------------------------- skeleton
def make_skeleton(config: PretrainedConfig, plan: BlockPlan, attn_implementation: str | None = None) -> PreTrainedModel:
    """The Flexi model's structure on the meta device (no memory for weights).

    ``config`` is the *executed* config (see :func:`executed_config`).
    """
    layout = layout_for(config.model_type)
    dims = layout.dims(config)
    executed = plan.executed()
    if len(executed) != config.num_hidden_layers:
        raise PlanError(
            f"the plan executes {len(executed)} blocks but the config has num_hidden_layers={config.num_hidden_layers}"
        )
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
        layers = get_module(model, layout.layers)
        for block in executed:
            if block.entry.kind == "shared":
                _install_shared(layers[block.index], layers[block.owner], block, layout, dims)
    setattr(model, PLAN_ATTR, plan)
    return model


def _install_shared(
    layer: nn.Module, owner: nn.Module, block: ExecutedBlock, layout: DecoderLayout, dims: ModelDims
) -> None:
    entry = block.entry
    adapter = entry.adapter
    for role, path in layout.linears.items():
        base = get_module(owner, path)
        rank = adapter.rank if adapter is not None and role in adapter.targets else None
        if rank is not None and rank > min(base.in_features, base.out_features):
            raise PlanError(
                f"executed block {block.index} ({entry.describe()}): adapter rank {rank} exceeds "
                f"{role}'s smaller dimension {min(base.in_features, base.out_features)}"
            )
        ofn = None
        if entry.ofn != "none" and role in layout.branch_outputs:
            gamma = torch.empty(base.out_features)
            ofn = OutputFeatureNorm(base.out_features, entry.ofn, dims.rms_norm_eps, gamma)
        scaling = adapter.scaling if adapter is not None else 1.0
        set_module(layer, path, SharedLinear(base, rank=rank, scaling=scaling, ofn=ofn))
    if entry.norms == "source":
        for path in layout.norms.values():
            set_module(layer, path, SharedNorm(get_module(owner, path)))


# ---------------------------------------------------------------------------------------------- materialize
def materialize(model: PreTrainedModel, tensors: Mapping[str, torch.Tensor], device: torch.device | str) -> None:
    """Assign a real tensor to every parameter of a skeleton, re-tie embeddings, rebuild meta buffers.

    ``tensors`` must hold exactly the skeleton's parameter names. ``nn.Parameter`` values are assigned as they
    are (the same object), which is how a Flexi model shares the source's weights.
    """
    layout = layout_for(model.config.model_type)
    expected = dict(model.named_parameters())
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(_key_mismatch(missing, unexpected))
    for name, value in tensors.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{name} has shape {tuple(value.shape)}, the plan needs {tuple(expected[name].shape)}"
            )
        set_parameter(model, name, value)
    if getattr(model.config, "tie_word_embeddings", False):
        set_parameter(model, layout.lm_head + ".weight", get_module(model, layout.embed).weight)
    rotary = get_module(model, layout.rotary)
    set_module(model, layout.rotary, type(rotary)(config=model.config).to(device))
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if leftovers:  # a layout forgot a module with buffers; a bug, not a user error
        raise RuntimeError(f"tensors left on the meta device after materialize: {leftovers[:5]}")


def _key_mismatch(missing: list[str], unexpected: list[str]) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensors missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
    return "tensors do not match the plan: " + "; ".join(parts)


# ------------------------------------------------------------------------------------------------ build_flexi
def build_flexi(
    source: PreTrainedModel,
    plan: BlockPlan,
    init: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
) -> PreTrainedModel:
    """The Flexi model of ``plan`` over ``source``, sharing ``source``'s parameters by reference.

    Original blocks, the embedding, final norm and LM head *are* the source's ``nn.Parameter`` objects. Each
    shared block's Linear modules reference its owner's Linear (the same weight object) and own ``lora_A`` /
    ``lora_B`` (PEFT default init: A Kaiming-uniform, B zero, unless ``init`` gives them), norms (copied from the
    block it replaces, or from its source when inserted) and OFN gamma (1 for a replacement, 0 for an inserted
    block, so that an inserted block starts as the identity). ``init`` maps Flexi parameter names to initial
    values for any of those own parameters. ``source`` is not modified.
    """
    check_plan_fits(plan, source.config)
    layout = layout_for(source.config.model_type)
    config = executed_config(source.config, plan)
    model = make_skeleton(config, plan, attn_implementation=source.config._attn_implementation)
    reference = source.get_parameter(layout.embed + ".weight")
    values = _flexi_values(model, source, plan, layout, dict(init or {}), seed)
    materialize(model, values, reference.device)
    model.generation_config = copy.deepcopy(source.generation_config)
    model.train(source.training)
    return model


def _flexi_values(
    model: PreTrainedModel,
    source: PreTrainedModel,
    plan: BlockPlan,
    layout: DecoderLayout,
    init: dict[str, torch.Tensor],
    seed: int,
) -> dict[str, torch.Tensor]:
    executed = {b.index: b for b in plan.executed()}
    src_layers = get_module(source, layout.layers)
    prefix = layout.layers + "."
    generator = torch.Generator().manual_seed(seed)
    values: dict[str, torch.Tensor] = {}
    for name, meta in model.named_parameters():
        if not name.startswith(prefix):
            values[name] = source.get_parameter(name)
            continue
        index_text, _, rest = name[len(prefix) :].partition(".")
        block = executed[int(index_text)]
        src_layer = src_layers[block.entry.source]
        if block.entry.kind == "original":
            values[name] = src_layer.get_parameter(rest)
            continue
        like = src_layer.get_parameter(next(iter(dict(src_layer.named_parameters()))))
        if name in init:
            values[name] = init.pop(name).detach().to(device=like.device, dtype=like.dtype).clone()
        else:
            values[name] = _default_own(rest, meta, block, src_layers, like, generator)
    if init:
        raise PlanError(f"init has tensors the plan does not own: {sorted(init)[:5]}")
    return values


def _default_own(
    rest: str,
    meta: torch.Tensor,
    block: ExecutedBlock,
    src_layers: nn.ModuleList,
    like: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """Default initial value of a shared block's own parameter ``rest`` (a name inside the block)."""
    entry = block.entry
    if rest.endswith(".lora_A.weight"):
        fan_in = meta.shape[1]
        bound = math.sqrt(6.0 / ((1 + 5.0) * fan_in))  # kaiming_uniform_(a=sqrt(5)), as nn.Linear and PEFT
        value = torch.empty(meta.shape).uniform_(-bound, bound, generator=generator)
    elif rest.endswith(".lora_B.weight"):
        value = torch.zeros(meta.shape)
    elif rest.endswith(".ofn.weight"):
        value = torch.zeros(meta.shape) if entry.inserted else torch.ones(meta.shape)
    else:  # the block's own norms start as those of the block it stands in for
        donor = src_layers[entry.replaces if entry.replaces is not None else entry.source]
        value = donor.get_parameter(rest).detach().clone()
    return value.to(device=like.device, dtype=like.dtype)
