"""SVD adapter initialisation and OFN gamma from calibration statistics."""

from __future__ import annotations

import pytest
import torch

from flexi_export.compress.init import initial_values, ofn_gamma_init, svd_adapter_init
from flexi_export.errors import CompressError
from flexi_export.model import build_flexi
from flexi_export.model.modules import OutputFeatureNorm
from flexi_export.plan import AdapterSpec, BlockPlan, SourceInfo, original, shared
from tests.helpers import tiny_model

LINEARS = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}


def _replace_plan(pruned: int, source: int, rank: int, alpha: float | None = None, ofn: str = "none") -> BlockPlan:
    entries = [
        shared(source, replaces=i, adapter=AdapterSpec(rank, alpha), ofn=ofn) if i == pruned else original(i)
        for i in range(6)
    ]
    return BlockPlan(SourceInfo("llama", 6), tuple(entries))


def _module(model, block, role):
    return model.model.layers[block].get_submodule(LINEARS[role])


def test_svd_init_gives_the_rank_r_reconstruction_of_the_pruned_matrix():
    model = tiny_model("llama")
    plan = _replace_plan(pruned=4, source=1, rank=5, alpha=20.0)  # scaling 4: the init must divide it out
    flexi = build_flexi(model, plan, init=svd_adapter_init(model, plan, progress=False))
    for role in LINEARS:
        w_i, w_j = _module(model, 4, role).weight.double(), _module(model, 1, role).weight.double()
        U, S, Vh = torch.linalg.svd(w_i - w_j, full_matrices=False)
        expected = w_j + U[:, :5] @ torch.diag(S[:5]) @ Vh[:5]
        layer = _module(flexi, 4, role)
        assert layer.weight is _module(model, 1, role).weight  # shares, does not copy
        got = layer.weight.double() + layer.delta_weight().double()
        assert torch.allclose(got, expected, atol=1e-5), role


def test_full_rank_replacement_reproduces_the_pruned_block():
    model = tiny_model("llama", num_key_value_heads=4)  # every matrix then has a smaller side of 64
    ids = torch.randint(3, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    plan = _replace_plan(pruned=3, source=0, rank=64)
    flexi = build_flexi(model, plan, init=initial_values(model, plan, ids, progress=False))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        got = flexi(input_ids=ids).logits
        copy_of_source = build_flexi(model, plan)(input_ids=ids).logits  # zero-init adapters: block 0 again
    assert torch.allclose(got, expected, atol=1e-4)
    assert (copy_of_source - expected).abs().max() > 1e-2  # the test would notice a missing adapter


def test_replacement_norms_start_as_the_pruned_block_norms():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[4].input_layernorm.weight.uniform_(0.5, 1.5)
    flexi = build_flexi(model, _replace_plan(pruned=4, source=1, rank=2))
    own = flexi.model.layers[4].input_layernorm.weight
    assert torch.equal(own, model.model.layers[4].input_layernorm.weight)
    assert own is not model.model.layers[4].input_layernorm.weight


def _branch_inputs(model, module, ids):
    """What ``module`` receives in the dense model, as ``[tokens, in]`` fp64."""
    inputs = []
    handle = module.register_forward_hook(lambda m, a, o: inputs.append(a[0].detach()))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    return torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs]).double()


@pytest.mark.parametrize("estimator", ["fit", "rms"])
def test_ofn_gamma_is_the_documented_estimator(estimator):
    model = tiny_model("llama")
    ids = torch.randint(3, 320, (3, 12), generator=torch.Generator().manual_seed(4))
    plan = _replace_plan(pruned=4, source=1, rank=3, alpha=6.0, ofn="rms")
    adapters = svd_adapter_init(model, plan, progress=False)
    gammas = ofn_gamma_init(model, plan, adapters, ids, estimator, batch_size=2, progress=False)
    assert sorted(gammas) == ["model.layers.4.mlp.down_proj.ofn.weight", "model.layers.4.self_attn.o_proj.ofn.weight"]
    for role in ("o_proj", "down_proj"):
        x = _branch_inputs(model, _module(model, 4, role), ids)
        prefix = f"model.layers.4.{LINEARS[role]}"
        a, b = adapters[f"{prefix}.lora_A.weight"].double(), adapters[f"{prefix}.lora_B.weight"].double()
        y = x @ _module(model, 1, role).weight.double().T + 2.0 * (x @ a.T) @ b.T
        n = y / y.pow(2).mean(-1, keepdim=True).add(model.config.rms_norm_eps).sqrt()
        o = x @ _module(model, 4, role).weight.double().T
        fit, rms = (o * n).sum(0) / (n * n).sum(0), ((o * o).sum(0) / (n * n).sum(0)).sqrt()
        expected = fit if estimator == "fit" else rms
        assert torch.allclose(gammas[f"{prefix}.ofn.weight"].double(), expected, rtol=1e-4, atol=1e-6), role


def test_fitted_ofn_brings_the_replacement_closer_than_unit_gamma():
    model = tiny_model("llama")
    ids = torch.randint(3, 320, (4, 16), generator=torch.Generator().manual_seed(5))
    plan = _replace_plan(pruned=3, source=0, rank=4, ofn="layernorm")
    init = initial_values(model, plan, ids, progress=False)
    unit = {k: v for k, v in init.items() if ".ofn." not in k}
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        fitted = build_flexi(model, plan, init=init)(input_ids=ids).logits
        plain = build_flexi(model, plan, init=unit)(input_ids=ids).logits
    assert (fitted - dense).pow(2).mean() < (plain - dense).pow(2).mean()
    flexi = build_flexi(model, plan, init=init)
    assert isinstance(flexi.model.layers[3].mlp.down_proj.ofn, OutputFeatureNorm)


def test_zero_init_keeps_lora_defaults_and_bad_names_fail():
    model = tiny_model("llama")
    plan = _replace_plan(pruned=4, source=1, rank=2)
    assert initial_values(model, plan, torch.randint(3, 320, (1, 8)), adapter_init="zero", progress=False) == {}
    with pytest.raises(CompressError, match="--init must be one of"):
        initial_values(model, plan, torch.randint(3, 320, (1, 8)), adapter_init="random", progress=False)
    with pytest.raises(CompressError, match="--ofn-init must be one of"):
        ofn_gamma_init(model, plan, {}, torch.randint(3, 320, (1, 8)), "mean", progress=False)
