"""The distillation pair: a student (Flexi or baseline model) and its dense teacher in one module.

For a Flexi student the teacher is a *view* (:func:`teacher_view`): a dense model assembled from the student's
own modules (embedding, kept blocks, final norm, LM head) plus the source's pruned blocks. The teacher
therefore costs no memory beyond the pruned blocks, and because the modules themselves are shared (not only
their parameters), DDP and FSDP see each weight once.

Loss (per token, averaged over tokens): ``kl * T^2 * KL(p_teacher^T || p_student^T)`` on logits at temperature
``T`` + ``hidden_mse * mean_l ||h_s^l - h_t^l||^2 / ||h_t^l||^2`` over the residual stream after every block
that stands at the same position in both models (originals and replacements; inserted blocks have no
counterpart) + ``ce * CE(student, next token)``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from flexi_export.layouts import layout_for
from flexi_export.model.build import get_module, get_plan, set_module
from flexi_export.plan import BlockPlan


def matched_blocks(plan: BlockPlan) -> list[tuple[int, int]]:
    """``(teacher block, student executed index)`` for every executed block that stands in for a source block."""
    out = []
    for block in plan.executed():
        entry = block.entry
        if entry.kind == "original":
            out.append((entry.source, block.index))
        elif entry.replaces is not None:
            out.append((entry.replaces, block.index))
    return out


def teacher_view(source: PreTrainedModel, student: PreTrainedModel) -> PreTrainedModel:
    """The dense source model, assembled from ``student``'s modules where it has them (see module docstring).

    Neither model is modified; the view's modules *are* the student's kept blocks and the source's pruned ones.
    """
    plan = get_plan(student)
    if plan is None:
        raise ValueError("teacher_view needs a Flexi student (built by build_flexi)")
    layout = layout_for(source.config.model_type)
    with torch.device("meta"):
        view = AutoModelForCausalLM.from_config(
            copy.deepcopy(source.config), attn_implementation=source.config._attn_implementation
        )
    student_layers = get_module(student, layout.layers)
    source_layers = get_module(source, layout.layers)
    kept = {b.entry.source: b.index for b in plan.executed() if b.entry.kind == "original"}
    blocks = [student_layers[kept[i]] if i in kept else source_layers[i] for i in range(plan.source.num_blocks)]
    set_module(view, layout.layers, nn.ModuleList(blocks))
    for path in (layout.embed, layout.final_norm, layout.lm_head, layout.rotary):
        set_module(view, path, get_module(student, path))
    view.generation_config = copy.deepcopy(source.generation_config)
    leftovers = [n for n, t in [*view.named_parameters(), *view.named_buffers()] if t.device.type == "meta"]
    if leftovers:  # a layout forgot a module: a bug, not a user error
        raise RuntimeError(f"teacher view has meta tensors: {leftovers[:5]}")
    return view.train(False)


class _Capture:
    """Forward hooks keeping the residual stream after the given blocks."""

    def __init__(self, layers: nn.ModuleList, indices: list[int]) -> None:
        self.out: dict[int, torch.Tensor] = {}
        self._handles = [layers[i].register_forward_hook(self._hook(i)) for i in indices]

    def _hook(self, index: int):  # noqa: ANN202 (a hook closure)
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            self.out.setdefault(index, output[0] if isinstance(output, tuple) else output)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@dataclass
class DistillOutput:
    """Student and teacher logits (and matched hidden states when asked for)."""

    student_logits: torch.Tensor
    teacher_logits: torch.Tensor
    student_hidden: list[torch.Tensor]
    teacher_hidden: list[torch.Tensor]


class Distiller(nn.Module):
    """``forward(input_ids)`` runs the teacher (no grad) and the student; DDP/FSDP wrap this module."""

    def __init__(self, student: PreTrainedModel, teacher: PreTrainedModel, pairs: list[tuple[int, int]]) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.pairs = pairs
        self.with_hidden = False

    def forward(self, input_ids: torch.Tensor) -> DistillOutput:
        layout = layout_for(self.student.config.model_type)
        t_layers = get_module(self.teacher, layout.layers)
        s_layers = get_module(self.student, layout.layers)
        t_cap = _Capture(t_layers, [t for t, _ in self.pairs]) if self.with_hidden else None
        try:
            with torch.no_grad():
                teacher_logits = self.teacher(input_ids=input_ids, use_cache=False).logits
        finally:
            if t_cap is not None:
                t_cap.remove()
        s_cap = _Capture(s_layers, [s for _, s in self.pairs]) if self.with_hidden else None
        try:
            student_logits = self.student(input_ids=input_ids, use_cache=False).logits
        finally:
            if s_cap is not None:
                s_cap.remove()
        s_hidden = [s_cap.out[s] for _, s in self.pairs] if s_cap is not None else []
        t_hidden = [t_cap.out[t] for t, _ in self.pairs] if t_cap is not None else []
        return DistillOutput(student_logits, teacher_logits, s_hidden, t_hidden)


def fsdp_groups(distiller: Distiller) -> list[list[nn.Module]]:
    """Shard groups: each teacher block with the student blocks that borrow its weights; pruned blocks alone."""
    layout = layout_for(distiller.student.config.model_type)
    s_layers = list(get_module(distiller.student, layout.layers))
    t_layers = list(get_module(distiller.teacher, layout.layers))
    plan = get_plan(distiller.student)
    assert plan is not None
    groups: dict[int, list[nn.Module]] = {}
    for block in plan.executed():
        groups.setdefault(block.owner, []).append(s_layers[block.index])
    student_ids = {id(m) for m in s_layers}
    out = list(groups.values())
    for layer in t_layers:
        if id(layer) not in student_ids:
            student_params = {id(p) for p in distiller.student.parameters()}
            if any(id(p) in student_params for p in layer.parameters()):
                raise ValueError(
                    "FSDP needs the teacher view (teacher_view) so that modules, not only weights, are shared"
                )
            out.append([layer])
    return out


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms and the distillation temperature."""

    kl: float = 1.0
    temperature: float = 1.0
    hidden_mse: float = 0.0
    ce: float = 0.0


def distillation_loss(
    out: DistillOutput, input_ids: torch.Tensor, weights: LossWeights
) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted loss (a scalar with grad) and its parts as floats."""
    parts: dict[str, torch.Tensor] = {}
    logits = out.student_logits.float()
    if weights.kl:
        t = weights.temperature
        log_s = F.log_softmax(logits / t, dim=-1)
        log_t = F.log_softmax(out.teacher_logits.float() / t, dim=-1)
        kl = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1).mean()
        parts["kl"] = kl * (t * t)
    if weights.hidden_mse and out.student_hidden:
        terms = [
            (s.float() - t.float()).pow(2).sum(-1).mean() / t.float().pow(2).sum(-1).mean().clamp_min(1e-12)
            for s, t in zip(out.student_hidden, out.teacher_hidden, strict=True)
        ]
        parts["hidden_mse"] = torch.stack(terms).mean()
    if weights.ce:
        parts["ce"] = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))
    factor = {"kl": weights.kl, "hidden_mse": weights.hidden_mse, "ce": weights.ce}
    if not parts:
        raise ValueError("every loss weight is zero: nothing to train")
    total = sum(factor[k] * v for k, v in parts.items())
    return total, {k: float(v.detach()) for k, v in parts.items()}


def default_loss(
    pruning: bool, kl: float | None, ce: float | None, temperature: float, hidden_mse: float
) -> LossWeights:
    """Loss weights with the defaults filled in: distillation (KL 1, CE 0) when pruning; CE 1 (continued
    pretraining) for an extension-only run, whose dense teacher it already equals at step 0."""
    if kl is None:
        kl = 1.0 if pruning else 0.0
    if ce is None:
        ce = 0.0 if pruning else 1.0
    return LossWeights(kl=kl, temperature=temperature, hidden_mse=hidden_mse, ce=ce)
