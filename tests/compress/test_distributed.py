"""Two processes (gloo on CPU) train like one: DDP and FSDP against the single-process run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flexi_export.compress import distributed as D
from flexi_export.compress.distill import teacher_view
from flexi_export.compress.init import initial_values
from flexi_export.compress.recover import RecoveryConfig, recover
from flexi_export.compress.train_state import read_state
from flexi_export.model import build_flexi
from flexi_export.plan import AdapterSpec, BlockPlan, SourceInfo, original, shared
from tests.helpers import tiny_model

pytestmark = pytest.mark.slow


def _run(strategy: str, ckpt: str | None = None, stop_at: int = 0) -> tuple[list[float], dict[str, torch.Tensor], bool]:
    """The same tiny recovery in every process: a 6-block Llama with blocks 3 and 4 replaced (optionally
    checkpointed every 2 steps, interrupted after step ``stop_at``, or resumed from ``ckpt``)."""
    torch.set_num_threads(1)
    model = tiny_model("llama")
    adapter = AdapterSpec(4)
    entries = [original(0), original(1), original(2), shared(0, 3, adapter, ofn="rms"), shared(2, 4, adapter)]
    plan = BlockPlan(SourceInfo("llama", 6), (*entries, original(5)))
    ids = torch.randint(3, 320, (16, 16), generator=torch.Generator().manual_seed(0))
    student = build_flexi(model, plan, init=initial_values(model, plan, ids[:4], progress=False))
    config = RecoveryConfig(tokens=8 * 16 * 6, batch_size=8, lr=5e-3, strategy=strategy, checkpoint_every=2)

    def stop(info):
        if info.step == stop_at:
            raise KeyboardInterrupt

    teacher = teacher_view(model, student)
    result = recover(student, teacher, ids, config, checkpoint_dir=ckpt, resume=True, progress=False, on_step=stop)
    sharded = type(student.model.layers[3].self_attn.q_proj.lora_A.weight).__name__ == "DTensor"
    return result.losses, result.params, sharded


def _worker(out: str, strategy: str, ckpt: str, stop_at: int) -> None:
    try:
        losses, params, sharded = _run(strategy, ckpt, stop_at)
    except KeyboardInterrupt:
        return
    if D.dist_info().is_main:
        body = {"losses": losses, "params": {k: v.tolist() for k, v in params.items()}, "sharded": sharded}
        body["world_size"] = D.dist_info().world_size
        Path(out).write_text(json.dumps(body))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, strategy):
    """DDP straight through; FSDP interrupted after step 3 and resumed from its step-2 checkpoint."""
    single_losses, single_params, _ = _run("auto")
    out, ckpt = tmp_path / "rank0.json", tmp_path / "ckpt"
    if strategy == "fsdp":
        D.spawn(_worker, 2, (str(out), strategy, str(ckpt), 3))
        assert not out.exists() and read_state(ckpt).step == 2
    D.spawn(_worker, 2, (str(out), strategy, str(ckpt), 0))
    got = json.loads(out.read_text())
    assert got["world_size"] == 2
    assert got["sharded"] == (strategy == "fsdp")  # FSDP really sharded the parameters (DDP does not)
    assert got["losses"] == pytest.approx(single_losses, rel=1e-4)
    assert sorted(got["params"]) == sorted(single_params)
    for name, value in single_params.items():
        assert torch.allclose(torch.tensor(got["params"][name]), value, atol=1e-5), name
