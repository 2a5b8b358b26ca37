"""Parity of the exported graph with the PyTorch Flexi model (fp32: 1e-4 on logits and every present)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import GenerationConfig

from flexi_export.export.reference import left_pad
from tests.export.util import (
    decoder,
    max_diff,
    max_excess,
    position_ids_from_mask,
    random_ids,
    reference_evaluator_run,
    torch_step,
)
from tests.helpers import FAMILIES

CASES = [(family, plan) for family in FAMILIES for plan in ("identity", "mixed")]


@pytest.mark.parametrize(("family", "plan"), CASES)
def test_prefill_logits_and_every_present_match_torch(family, plan, flexi_model, bundle):
    model = flexi_model(family, plan)
    ids = random_ids(model.config.vocab_size, batch=2, length=11)
    mask = np.ones_like(ids)
    pos = position_ids_from_mask(mask)
    ref_logits, ref_presents, _ = torch_step(model, ids, mask, pos)
    logits, presents = decoder(bundle(family, plan)).run(ids, mask, pos)
    assert max_excess(logits, ref_logits) <= 0, max_diff(logits, ref_logits)
    assert len(presents) == 2 * len(ref_presents) == 2 * model.config.num_hidden_layers
    for i, (key, value) in enumerate(ref_presents):
        assert max_excess(presents[f"present.{i}.key"], key) <= 0
        assert max_excess(presents[f"present.{i}.value"], value) <= 0


@pytest.mark.parametrize(("family", "plan"), CASES)
def test_decoding_with_a_past_equals_the_full_sequence(family, plan, flexi_model, bundle):
    """Prefill 6 tokens (past 0), then 2 tokens at once and 5 one by one (past > 0), past the sliding window of
    Mistral (8): every step's logits equal the full-sequence logits at those positions."""
    model = flexi_model(family, plan)
    ids = random_ids(model.config.vocab_size, batch=2, length=13, seed=1)
    mask = np.ones_like(ids)
    pos = position_ids_from_mask(mask)
    full, _, _ = torch_step(model, ids, mask, pos)
    onnx = decoder(bundle(family, plan))
    full_onnx, _ = onnx.run(ids, mask, pos)
    assert max_excess(full_onnx, full) <= 0
    bounds = [(0, 6), (6, 8), *((t, t + 1) for t in range(8, 13))]
    past = None
    for start, end in bounds:
        logits, present = onnx.run(ids[:, start:end], mask[:, :end], pos[:, start:end], past)
        assert max_excess(logits, full[:, start:end]) <= 0, (start, max_diff(logits, full[:, start:end]))
        assert present["present.0.key"].shape[2] == end
        past = onnx.as_past(present)


@pytest.mark.parametrize(("family", "plan"), CASES)
def test_batched_left_padded_prompts_match_torch(family, plan, flexi_model, bundle):
    model = flexi_model(family, plan)
    long, short = random_ids(model.config.vocab_size, 1, 12, seed=2)[0], random_ids(model.config.vocab_size, 1, 5)[0]
    ids, mask = left_pad([long.tolist(), short.tolist()], pad_id=0)
    pos = position_ids_from_mask(mask)
    ref_logits, ref_presents, cache = torch_step(model, ids, mask, pos)
    onnx = decoder(bundle(family, plan))
    logits, presents = onnx.run(ids, mask, pos)
    keep = mask.astype(bool)
    assert max_excess(logits[keep], ref_logits[keep]) <= 0
    for i, pair in enumerate(ref_presents):  # [B, kv, T, D]: compare the real (non-padding) tokens
        for name, ref in zip(("key", "value"), pair, strict=True):
            ours = presents[f"present.{i}.{name}"].transpose(0, 2, 1, 3)[keep]
            assert max_excess(ours, ref.transpose(0, 2, 1, 3)[keep]) <= 0
    # one decode step of the padded batch
    step = np.array([[7], [9]], dtype=np.int64)
    mask2 = np.concatenate([mask, np.ones_like(step)], axis=1)
    pos2 = pos[:, -1:] + 1
    ref_step, _, _ = torch_step(model, step, mask2, pos2, cache)
    logits2, _ = onnx.run(step, mask2, pos2, onnx.as_past(presents))
    assert max_excess(logits2, ref_step) <= 0


@pytest.mark.parametrize(("family", "plan"), CASES)
def test_sixteen_greedy_tokens_equal_torch_generate(family, plan, flexi_model, bundle):
    model = flexi_model(family, plan)
    prompts = [random_ids(model.config.vocab_size, 1, 9, seed=3)[0].tolist(), [5, 6, 7]]
    ids, mask = left_pad(prompts, pad_id=0)
    config = GenerationConfig(max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), generation_config=config)
    expected = out[:, ids.shape[1] :].numpy()
    _, tokens = decoder(bundle(family, plan)).greedy(ids, mask, steps=16)
    assert expected.shape == (2, 16)
    np.testing.assert_array_equal(tokens, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_bundle_reference_greedy_tokens_replay_in_onnxruntime(family, bundle):
    """The greedy tokens stored at export time (torch, KV cache) come out of onnxruntime unchanged."""
    b = bundle(family, "mixed")
    onnx = decoder(b)
    for case in b.reference():
        np.testing.assert_array_equal(onnx.greedy(case.input_ids, case.attention_mask, 16)[1], case.greedy)


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_export_computes_the_same_function(family, flexi_model, bundle):
    model = flexi_model(family, "mixed")
    ids, mask = left_pad([random_ids(model.config.vocab_size, 1, 10, seed=4)[0].tolist(), [3, 4, 5, 6]], pad_id=0)
    pos = position_ids_from_mask(mask)
    ref_logits, _, _ = torch_step(model, ids, mask, pos)
    logits, _ = decoder(bundle(family, "mixed", dense=True)).run(ids, mask, pos)
    keep = mask.astype(bool)
    assert max_excess(logits[keep], ref_logits[keep]) <= 0


@pytest.mark.parametrize("family", FAMILIES)
def test_fp16_top1_agrees_with_fp32_torch_on_the_reference_prompts(family, bundle):
    b = bundle(family, "mixed", dtype="fp16")
    onnx = decoder(b)
    agree, total = 0, 0
    for case in b.reference():
        logits, _ = onnx.run(case.input_ids, case.attention_mask, case.position_ids)
        assert logits.dtype == np.float16
        keep = case.attention_mask.astype(bool)
        agree += int(np.sum(logits[keep].argmax(-1) == case.logits[keep].argmax(-1)))
        total += int(keep.sum())
    assert agree / total >= b.manifest["tolerances"]["top1_agreement_min"] == 0.99


@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_reference_evaluator_agrees_with_torch(family, flexi_model, bundle):
    """An oracle independent of onnxruntime: the graph's ONNX semantics, evaluated by numpy."""
    b = bundle(family, "mixed")
    case = b.reference()[1]
    logits = reference_evaluator_run(b, case.input_ids, case.attention_mask, case.position_ids)
    keep = case.attention_mask.astype(bool)
    assert max_excess(logits[keep], case.logits[keep]) <= 0
