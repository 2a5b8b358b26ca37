"""The fair baseline: ShortGPT removal + LoRA on the kept blocks with Flexi's parameter budget."""

from __future__ import annotations

import torch

from flexi_export.compress.lora_baseline import LoRALinear, add_lora, lora_ranks
from flexi_export.compress.recover import RecoveryConfig, recover
from flexi_export.layouts import layout_for
from flexi_export.model import build_flexi
from flexi_export.plan import LINEAR_ROLES, AdapterSpec, BlockPlan, SourceInfo, original, removed, shared
from flexi_export.stats import count_parameters, linear_shapes, plan_parameters
from tests.helpers import tiny_model


def _plans():
    info = SourceInfo("llama", 6)
    kept = [original(i) for i in range(4)]
    flexi = BlockPlan(info, (*kept, shared(1, 4, AdapterSpec(4), ofn="rms"), shared(2, 5, AdapterSpec(4), ofn="rms")))
    short = BlockPlan(info, (*kept, removed(4), removed(5)))
    return flexi, short


def test_rank_split_uses_the_largest_budget_that_fits():
    split = lora_ranks(budget=1000, blocks=[0, 1, 2], per_rank=70)
    assert split.params == 70 * 14 <= 1000 < 70 * 15
    assert split.ranks == {0: 5, 1: 5, 2: 4}


def test_baseline_gets_the_same_stored_parameters_and_starts_as_the_removal_model():
    model = tiny_model("llama")
    flexi_plan, short_plan = _plans()
    dims = layout_for("llama").dims(model.config)
    budget = plan_parameters(flexi_plan, dims) - plan_parameters(short_plan, dims)
    baseline = build_flexi(model, short_plan)
    ids = torch.randint(3, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        removal_logits = baseline(input_ids=ids).logits
    split, names = add_lora(baseline, budget, LINEAR_ROLES)
    lora_params = sum(baseline.get_parameter(n).numel() for n in names)
    per_rank = sum(i + o for i, o in linear_shapes(dims).values())
    assert lora_params == split.params and 0 <= budget - split.params < per_rank
    assert count_parameters(baseline).unique_params == plan_parameters(short_plan, dims) + split.params
    with torch.no_grad():
        assert torch.equal(baseline(input_ids=ids).logits, removal_logits)  # B = 0 at the start
    wrapped = [m for m in baseline.modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 4 * 7 and wrapped[0].base.weight is model.model.layers[0].self_attn.q_proj.weight
    result = recover(
        baseline, model, ids.repeat(4, 1), RecoveryConfig(tokens=4 * 12 * 3, batch_size=4), names, progress=False
    )
    assert result.steps == 3 and sorted(result.params) == sorted(names)
    with torch.no_grad():
        assert not torch.equal(baseline(input_ids=ids).logits, removal_logits)
