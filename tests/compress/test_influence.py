"""Block Influence against a hand computation."""

from __future__ import annotations

import copy

import pytest
import torch

from flexi_export.compress.influence import block_influence
from flexi_export.errors import DataError
from tests.helpers import tiny_model


def _hand_bi(model, ids):
    """BI from ``output_hidden_states`` of a copy whose final norm is the identity (so every state is raw)."""
    raw = copy.deepcopy(model)
    raw.model.norm = torch.nn.Identity()
    with torch.no_grad():
        states = raw(input_ids=ids, output_hidden_states=True).hidden_states
    out = []
    for i in range(len(states) - 1):
        a, b = states[i].reshape(-1, states[i].shape[-1]), states[i + 1].reshape(-1, states[i].shape[-1])
        cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
        out.append(1.0 - cos.double().mean().item())
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_block_influence_equals_hand_computation(family):
    model = tiny_model(family)
    ids = torch.randint(3, 320, (5, 12), generator=torch.Generator().manual_seed(1))
    scores = block_influence(model, ids, batch_size=2, progress=False)
    assert scores == pytest.approx(_hand_bi(model, ids), abs=1e-6)


def test_last_block_uses_the_raw_output_not_the_final_norm():
    model = tiny_model("llama")
    with torch.no_grad():  # a trained final norm is not all ones (with all ones it would not change cosines)
        model.model.norm.weight.uniform_(0.2, 2.0)
    ids = torch.randint(3, 320, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        states = model(input_ids=ids, output_hidden_states=True).hidden_states
    a, b = states[-2], states[-1]  # the last entry is after the final norm
    normed = 1.0 - torch.nn.functional.cosine_similarity(a, b, dim=-1).double().mean().item()
    last = block_influence(model, ids, progress=False)[-1]
    assert abs(last - normed) > 1e-3


def test_padding_tokens_are_excluded():
    model = tiny_model("llama")
    ids = torch.randint(3, 320, (1, 10), generator=torch.Generator().manual_seed(3))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], dim=1)  # left padding
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], dim=1)
    plain = block_influence(model, ids, progress=False)
    masked = block_influence(model, padded, attention_mask=mask, progress=False)
    assert masked == pytest.approx(plain, abs=1e-5)
    with pytest.raises(DataError, match="non-padding"):
        block_influence(model, padded, attention_mask=torch.zeros_like(mask), progress=False)


def test_block_influence_leaves_the_model_as_it_was():
    model = tiny_model("llama").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    block_influence(model, torch.randint(3, 320, (2, 8)), progress=False)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(layer._forward_hooks for layer in model.model.layers)
