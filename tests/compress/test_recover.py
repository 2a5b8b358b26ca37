"""Recovery training: the loss, what trains, the schedule, checkpoints and resuming."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from flexi_export.compress.distill import DistillOutput, LossWeights, distillation_loss, matched_blocks, teacher_view
from flexi_export.compress.init import initial_values
from flexi_export.compress.recover import RecoveryConfig, flexi_trainable, lr_at, recover
from flexi_export.compress.train_state import has_checkpoint, read_state
from flexi_export.errors import CheckpointError, CompressError
from flexi_export.model import build_flexi
from flexi_export.plan import AdapterSpec, BlockPlan, SourceInfo, original, removed, shared
from tests.helpers import mixed_plan, tiny_model


def _plan(ofn: str = "rms", family: str = "llama") -> BlockPlan:
    adapter = AdapterSpec(4)
    entries = (
        original(0),
        original(1),
        original(2),
        shared(0, replaces=3, adapter=adapter, ofn=ofn),
        shared(2, replaces=4, adapter=adapter, ofn=ofn),
        original(5),
    )
    return BlockPlan(SourceInfo(family, 6), entries)


def _setup(family: str = "llama", plan: BlockPlan | None = None):
    model = tiny_model(family)
    ids = torch.randint(3, 320, (16, 16), generator=torch.Generator().manual_seed(0))
    plan = plan or _plan(family=family)
    student = build_flexi(model, plan, init=initial_values(model, plan, ids[:4], progress=False))
    return model, student, ids


def _own(student):
    return {n: p.detach().clone() for n, p in student.named_parameters() if n in set(flexi_trainable(student))}


def test_kl_ce_and_hidden_terms_match_hand_computations():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=gen), torch.randn(2, 5, 11, generator=gen)
    hs, ht = [torch.randn(2, 5, 4, generator=gen)], [torch.randn(2, 5, 4, generator=gen)]
    ids = torch.randint(0, 11, (2, 5), generator=gen)
    out = DistillOutput(s, t, hs, ht)
    T = 2.0
    p_t, log_p_t, log_p_s = F.softmax(t / T, -1), F.log_softmax(t / T, -1), F.log_softmax(s / T, -1)
    kl = (p_t * (log_p_t - log_p_s)).sum(-1).mean() * T * T
    ce = F.cross_entropy(s[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
    mse = (hs[0] - ht[0]).pow(2).sum(-1).mean() / ht[0].pow(2).sum(-1).mean()
    total, parts = distillation_loss(out, ids, LossWeights(kl=0.5, temperature=T, hidden_mse=3.0, ce=0.25))
    assert parts == pytest.approx({"kl": float(kl), "ce": float(ce), "hidden_mse": float(mse)}, rel=1e-5)
    assert float(total) == pytest.approx(float(0.5 * kl + 3.0 * mse + 0.25 * ce), rel=1e-5)


def test_learning_rate_warms_up_then_decays_by_cosine():
    config = RecoveryConfig(lr=1.0, warmup=0.1, min_lr_ratio=0.1)
    lrs = [lr_at(s, 100, config) for s in range(100)]
    assert lrs[:10] == pytest.approx([(k + 1) / 10 for k in range(10)])
    assert lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1, abs=2e-3)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_teacher_view_is_the_dense_model_built_from_shared_modules(family):
    model, student, ids = _setup(family)
    view = teacher_view(model, student)
    with torch.no_grad():
        assert torch.equal(view(input_ids=ids[:2]).logits, model(input_ids=ids[:2]).logits)
    assert view.model.layers[5] is student.model.layers[5]  # a kept block is the student's module
    assert view.model.layers[3] is model.model.layers[3]  # a pruned block comes from the source


def test_only_own_parameters_train_and_the_loss_falls():
    model, student, ids = _setup()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = _own(student)
    config = RecoveryConfig(tokens=16 * 16 * 8, batch_size=16, lr=5e-3, warmup=0.0)
    result = recover(student, teacher_view(model, student), ids, config, progress=False)
    assert result.steps == 8 and result.tokens == 16 * 16 * 8
    assert result.losses[-1] < result.losses[0]
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters())  # teacher and shared weights
    after = _own(student)
    assert sorted(after) == sorted(before) and all(not torch.equal(before[n], after[n]) for n in before)
    assert any(".ofn." in n for n in after) and any("layernorm" in n for n in after)
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_micro_batches_accumulate_to_the_full_batch():
    runs = []
    for micro in (0, 2):
        model, student, ids = _setup()
        config = RecoveryConfig(tokens=8 * 16 * 3, batch_size=8, micro_batch_size=micro, lr=5e-3)
        runs.append(recover(student, teacher_view(model, student), ids, config, progress=False))
    assert runs[0].losses == pytest.approx(runs[1].losses, rel=1e-5)
    for name, value in runs[0].params.items():
        assert torch.allclose(value, runs[1].params[name], atol=1e-6)


def test_resume_after_interruption_ends_with_identical_adapters(tmp_path):
    config = RecoveryConfig(tokens=4 * 16 * 7, batch_size=4, lr=5e-3, checkpoint_every=2, seed=3)
    model, student, ids = _setup()
    straight = recover(student, teacher_view(model, student), ids, config, progress=False)

    def interrupt(info):
        if info.step == 5:
            raise KeyboardInterrupt

    model, student, ids = _setup()
    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        recover(
            student, teacher_view(model, student), ids, config, checkpoint_dir=ckpt, on_step=interrupt, progress=False
        )
    assert read_state(ckpt).step == 4
    assert sorted(p.name for p in ckpt.iterdir()) == ["state.json", "tensors.safetensors"]  # no pickle
    model, student, ids = _setup()
    resumed = recover(
        student, teacher_view(model, student), ids, config, checkpoint_dir=ckpt, resume=True, progress=False
    )
    assert resumed.resumed_from == 4 and resumed.steps == 7
    assert resumed.losses == straight.losses
    for name, value in straight.params.items():
        assert torch.equal(value, resumed.params[name]), name
        assert torch.equal(value, student.get_parameter(name))


def test_checkpoint_guards(tmp_path):
    config = RecoveryConfig(tokens=4 * 16 * 2, batch_size=4, checkpoint_every=1)
    model, student, ids = _setup()
    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        recover(
            student,
            teacher_view(model, student),
            ids,
            config,
            checkpoint_dir=ckpt,
            progress=False,
            on_step=lambda info: (_ for _ in ()).throw(KeyboardInterrupt()),
        )
    assert has_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="pass --resume"):
        recover(student, teacher_view(model, student), ids, config, checkpoint_dir=ckpt, progress=False)
    other = RecoveryConfig(tokens=4 * 16 * 2, batch_size=4, checkpoint_every=1, lr=1e-4)
    with pytest.raises(CheckpointError, match="belongs to another run"):
        recover(student, teacher_view(model, student), ids, other, checkpoint_dir=ckpt, resume=True, progress=False)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"batch_size": 0}, "positive multiple"),
        ({"batch_size": 4, "micro_batch_size": 3}, "must divide"),
        ({"lr": 0.0}, "--lr must be > 0"),
        ({"loss": LossWeights(kl=0.0)}, "not all zero"),
        ({"loss": LossWeights(temperature=0.0)}, "--temperature"),
    ],
)
def test_bad_recovery_settings(kw, message):
    model, student, ids = _setup()
    with pytest.raises(CompressError, match=message):
        recover(student, teacher_view(model, student), ids, RecoveryConfig(tokens=100, **kw), progress=False)


def test_nothing_to_train_is_a_clear_error():
    model = tiny_model("llama")
    plan = BlockPlan(SourceInfo("llama", 6), (*(original(i) for i in range(5)), removed(5)))
    student = build_flexi(model, plan)
    with pytest.raises(CompressError, match="nothing to train"):
        recover(student, model, torch.randint(3, 320, (4, 8)), RecoveryConfig(tokens=64, batch_size=4), progress=False)


def test_gradient_checkpointing_gives_the_same_training():
    runs = []
    for checkpointing in (False, True):
        model, student, ids = _setup()
        config = RecoveryConfig(tokens=8 * 16 * 3, batch_size=8, gradient_checkpointing=checkpointing)
        seen: list[bool] = []

        def on_step(info, student=student, seen=seen):
            seen.append(student.model.layers[3].gradient_checkpointing)

        runs.append(recover(student, teacher_view(model, student), ids, config, progress=False, on_step=on_step))
        assert seen == [checkpointing] * 3
        assert not student.model.layers[3].gradient_checkpointing  # switched off again afterwards
    assert runs[0].losses == pytest.approx(runs[1].losses, rel=1e-5)


def test_hidden_state_mse_pairs_blocks_by_position_and_trains():
    plan = mixed_plan("llama", ofn="rms")  # original, replacement, removed and inserted blocks
    assert matched_blocks(plan) == [(0, 0), (1, 1), (2, 2), (4, 3), (5, 5)]
    model, student, ids = _setup()
    config = RecoveryConfig(tokens=16 * 16 * 6, batch_size=16, lr=5e-3, loss=LossWeights(kl=0.0, hidden_mse=1.0))
    result = recover(student, teacher_view(model, student), ids, config, progress=False)
    assert result.losses[-1] < result.losses[0]
