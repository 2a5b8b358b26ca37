"""Extension: inserted shared blocks start as the identity and then learn."""

from __future__ import annotations

import pytest
import torch

from flexi_export.compress.distill import LossWeights, teacher_view
from flexi_export.compress.extend import extend_plan, parse_blocks
from flexi_export.compress.recover import RecoveryConfig, recover
from flexi_export.errors import CompressError
from flexi_export.model import build_flexi
from flexi_export.plan import AdapterSpec, BlockPlan, removed
from tests.helpers import tiny_model


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_extended_model_equals_the_original_at_step_0(family):
    model = tiny_model(family)
    plan = extend_plan(BlockPlan.identity(family, 6), [1, 4, 4], AdapterSpec(4), ofn="rms")
    assert plan.num_executed == 9
    assert [e.source for e in plan.entries if e.inserted] == [1, 4, 4]
    ids = torch.randint(3, 320, (2, 20), generator=torch.Generator().manual_seed(0))
    extended = build_flexi(model, plan)
    with torch.no_grad():
        assert torch.equal(extended(input_ids=ids).logits, model(input_ids=ids).logits)
    gammas = [m.weight for m in extended.modules() if type(m).__name__ == "OutputFeatureNorm"]
    assert len(gammas) == 6 and all(not g.any() for g in gammas)


def test_training_teaches_the_inserted_blocks():
    model = tiny_model("llama")
    plan = extend_plan(BlockPlan.identity("llama", 6), [2], AdapterSpec(4), ofn="rms")
    extended = build_flexi(model, plan)
    ids = torch.randint(3, 320, (8, 16), generator=torch.Generator().manual_seed(1))
    config = RecoveryConfig(tokens=4 * 16 * 6, batch_size=4, lr=1e-2, loss=LossWeights(kl=0.0, ce=1.0))
    result = recover(extended, teacher_view(model, extended), ids, config, progress=False)
    assert result.steps == 6
    assert extended.model.layers[3].mlp.down_proj.ofn.weight.abs().sum() > 0
    assert extended.model.layers[3].mlp.down_proj.lora_B.weight.abs().sum() > 0
    with torch.no_grad():
        assert not torch.equal(extended(input_ids=ids).logits, model(input_ids=ids).logits)


def test_bad_extension_requests():
    base = BlockPlan.identity("llama", 6)
    with pytest.raises(CompressError, match="does not exist"):
        extend_plan(base, [6], AdapterSpec(4))
    pruned = BlockPlan(base.source, (*base.entries[:3], removed(3), *base.entries[4:]))
    with pytest.raises(CompressError, match="block 3 is pruned"):
        extend_plan(pruned, [3], AdapterSpec(4))
    with pytest.raises(CompressError, match="needs OFN"):
        extend_plan(base, [1], AdapterSpec(4), ofn="none")
    assert parse_blocks("3, 5") == [3, 5]
    with pytest.raises(CompressError, match="comma-separated block numbers"):
        parse_blocks("three")
