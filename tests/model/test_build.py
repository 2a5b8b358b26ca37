"""build_flexi: sharing by reference, exact equivalences, KV-cache generation, bad plans."""

from __future__ import annotations

import copy

import pytest
import torch

from flexi_export.errors import PlanError
from flexi_export.layouts import layout_for
from flexi_export.model import OutputFeatureNorm, SharedLinear, build_flexi, get_module, get_plan
from flexi_export.plan import AdapterSpec, BlockPlan, SourceInfo, original, removed, shared
from flexi_export.stats import count_parameters, plan_parameters, plan_unshared_parameters
from tests.helpers import FAMILIES, mixed_plan, randomize_own, tiny_model

IDS = torch.randint(3, 320, (2, 11), generator=torch.Generator().manual_seed(0))


def _replace_plan(model_type: str, rank: int, ofn: str = "none") -> BlockPlan:
    """Block 2 replaced by a shared copy of block 1 with adapters; everything else original."""
    adapter = AdapterSpec(rank=rank, alpha=2.0 * rank)
    entries = (
        original(0),
        original(1),
        shared(1, replaces=2, adapter=adapter, ofn=ofn),
        original(3),
        original(4),
        original(5),
    )
    return BlockPlan(SourceInfo(model_type, 6), entries)


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_plan_reproduces_source_logits(family):
    source = tiny_model(family)
    flexi = build_flexi(source, BlockPlan.identity(source.config.model_type, 6))
    with torch.no_grad():
        diff = (flexi(IDS).logits - source(IDS).logits).abs().max().item()
    assert diff <= 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_flexi_model_reuses_the_source_parameters_without_copying(family):
    source = tiny_model(family)
    flexi = build_flexi(source, mixed_plan(source.config.model_type))
    src_layers, layers = source.model.layers, flexi.model.layers
    assert layers[0].self_attn.q_proj.weight is src_layers[0].self_attn.q_proj.weight
    assert layers[3].mlp.down_proj.weight is src_layers[4].mlp.down_proj.weight  # block 3 removed, 4 executes at 3
    shared_q = layers[2].self_attn.q_proj
    assert isinstance(shared_q, SharedLinear)
    assert shared_q.base.weight is src_layers[1].self_attn.q_proj.weight
    assert shared_q.base is layers[1].self_attn.q_proj  # a reference to the owner module, not a copy
    assert flexi.model.embed_tokens.weight is source.model.embed_tokens.weight
    if source.config.tie_word_embeddings:
        assert flexi.lm_head.weight is flexi.model.embed_tokens.weight
    # own parameters are new tensors, not views of the source
    own_norm = layers[2].input_layernorm.weight
    assert own_norm.data_ptr() != src_layers[2].input_layernorm.weight.data_ptr()
    assert torch.equal(own_norm, src_layers[2].input_layernorm.weight)  # initialised from the pruned block


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_block_with_adapters_equals_merged_weights(family):
    """W_j x + s B A x computed by the shared block == a plain block whose weights are W_j + s B A."""
    source = tiny_model(family)
    flexi = randomize_own(build_flexi(source, _replace_plan(source.config.model_type, rank=4)))
    merged = copy.deepcopy(source)
    layout = layout_for(source.config.model_type)
    with torch.no_grad():
        for path in layout.linears.values():
            module = get_module(flexi.model.layers[2], path)
            target = get_module(merged.model.layers[2], path)
            assert module.delta_weight().abs().max() > 0  # the adapter path is really exercised
            target.weight.copy_(module.base.weight + module.delta_weight())
            if module.base.bias is not None:
                target.bias.copy_(module.base.bias)
        diff = (flexi(IDS).logits - merged(IDS).logits).abs().max().item()
    assert diff <= 1e-5


def test_output_feature_norm_matches_its_formula():
    gamma = torch.linspace(0.5, 2.0, 16)
    h = torch.randn(3, 5, 16) * 7 + 2
    rms = OutputFeatureNorm(16, "rms", 1e-6, gamma)(h)
    ln = OutputFeatureNorm(16, "layernorm", 1e-6, gamma)(h)
    expected_rms = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * gamma
    centred = h - h.mean(-1, keepdim=True)
    expected_ln = centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + 1e-6) * gamma
    torch.testing.assert_close(rms, expected_rms)
    torch.testing.assert_close(ln, expected_ln)


@pytest.mark.parametrize("family", FAMILIES)
def test_inserted_blocks_start_as_identity(family):
    """OFN gamma starts at 0 for inserted blocks, so an extended model computes exactly the original."""
    source = tiny_model(family)
    entries = [original(i) for i in range(6)]
    entries.insert(3, shared(2, replaces=None, adapter=AdapterSpec(4), ofn="rms"))
    flexi = build_flexi(source, BlockPlan(SourceInfo(source.config.model_type, 6), tuple(entries)))
    assert flexi.config.num_hidden_layers == 7
    with torch.no_grad():
        assert torch.equal(flexi(IDS).logits, source(IDS).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_removed_and_inserted_blocks_generate_with_kv_cache(family):
    source = tiny_model(family)
    flexi = randomize_own(build_flexi(source, mixed_plan(source.config.model_type, ofn="rms")))
    prompt = IDS[:1, :6]
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        cached = flexi.generate(prompt, use_cache=True, **kwargs)
        uncached = flexi.generate(prompt, use_cache=False, **kwargs)
    assert cached.shape[1] == 18
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("family", FAMILIES)
def test_incremental_decoding_equals_full_sequence(family):
    source = tiny_model(family)
    flexi = randomize_own(build_flexi(source, mixed_plan(source.config.model_type, ofn="layernorm")))
    with torch.no_grad():
        full = flexi(IDS).logits
        out = flexi(IDS[:, :7], use_cache=True)
        steps = [out.logits]
        past = out.past_key_values
        for t in range(7, IDS.shape[1]):
            out = flexi(IDS[:, t : t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)


def test_build_does_not_modify_the_source():
    source = tiny_model("qwen2")
    before = {k: v.clone() for k, v in source.state_dict().items()}
    modules_before = [(n, type(m)) for n, m in source.named_modules()]
    flexi = randomize_own(build_flexi(source, mixed_plan("qwen2", ofn="rms")))
    with torch.no_grad():
        flexi(IDS)
    after = source.state_dict()
    assert [(n, type(m)) for n, m in source.named_modules()] == modules_before
    assert source.config.num_hidden_layers == 6
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert get_plan(source) is None


@pytest.mark.parametrize("family", FAMILIES)
def test_plan_parameter_prediction_matches_the_built_model(family):
    source = tiny_model(family)
    plan = mixed_plan(source.config.model_type, ofn="rms")
    counts = count_parameters(build_flexi(source, plan))
    dims = layout_for(source.config.model_type).dims(source.config)
    assert counts.unique_params == plan_parameters(plan, dims)
    assert counts.unshared_params == plan_unshared_parameters(plan, dims)
    assert counts.unique_params < counts.unshared_params


def test_plan_for_another_model_is_refused():
    source = tiny_model("llama")
    with pytest.raises(PlanError, match="the plan is for 4 blocks, the model has 6"):
        build_flexi(source, BlockPlan.identity("llama", 4))
    with pytest.raises(PlanError, match="the plan is for model_type 'qwen2'"):
        build_flexi(source, BlockPlan.identity("qwen2", 6))


def test_adapter_rank_larger_than_the_matrices_is_refused():
    source = tiny_model("llama")
    with pytest.raises(PlanError, match="adapter rank 100 exceeds"):
        build_flexi(source, _replace_plan("llama", rank=100))


def test_init_values_are_used_and_unknown_names_are_refused():
    source = tiny_model("llama")
    plan = _replace_plan("llama", rank=2)
    name = "model.layers.2.self_attn.q_proj.lora_B.weight"
    value = torch.full((64, 2), 0.25)
    flexi = build_flexi(source, plan, init={name: value})
    assert torch.equal(flexi.get_parameter(name), value)
    with pytest.raises(PlanError, match="init has tensors the plan does not own"):
        build_flexi(source, plan, init={"model.layers.0.self_attn.q_proj.lora_B.weight": value})


def test_removed_block_is_skipped():
    source = tiny_model("llama")
    plan = BlockPlan(
        SourceInfo("llama", 6), (original(0), removed(1), original(2), original(3), original(4), original(5))
    )
    flexi = build_flexi(source, plan)
    assert flexi.config.num_hidden_layers == 5
    assert flexi.model.layers[1].self_attn.q_proj.weight is source.model.layers[2].self_attn.q_proj.weight
