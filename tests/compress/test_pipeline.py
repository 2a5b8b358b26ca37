"""The compress pipeline as a library: resuming an interrupted run, and two processes through --nproc."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import flexi_export.compress.pipeline as pipeline
from flexi_export.checkpoint import load_flexi
from flexi_export.cli import main
from flexi_export.compress.pipeline import CompressOptions, compress
from flexi_export.compress.planner import PlanOptions
from flexi_export.compress.recover import RecoveryConfig
from flexi_export.compress.train_state import has_checkpoint
from flexi_export.errors import CheckpointError, CompressError


def _options(model_dir, text_dir, out, **kw) -> CompressOptions:
    recovery = RecoveryConfig(tokens=4 * 32 * 7, batch_size=4, checkpoint_every=2, seed=1)
    return CompressOptions(
        model=str(model_dir),
        out=str(out),
        plan=PlanOptions(num_blocks=2, rank=4, ofn="rms"),
        data=str(text_dir),
        calib_sequences=4,
        seq_len=32,
        eval_sequences=4,
        recovery=recovery,
        progress=False,
        **kw,
    )


def _own_tensors(path):
    model = load_flexi(path)
    return {n: p for n, p in model.named_parameters() if n.startswith("model.layers.") and "lora" in n}


def test_resumed_compress_equals_an_uninterrupted_one(model_dir, text_dir, tmp_path, monkeypatch):
    straight = compress(_options(model_dir, text_dir, tmp_path / "straight"))
    original_recover = pipeline.recover

    def interrupted(*args, **kwargs):
        def stop(info):
            if info.step == 5:
                raise KeyboardInterrupt

        return original_recover(*args, **kwargs, on_step=stop)

    monkeypatch.setattr(pipeline, "recover", interrupted)
    options = _options(model_dir, text_dir, tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        compress(options)
    assert has_checkpoint(options.checkpoint_folder()) and not (tmp_path / "resumed").exists()
    with pytest.raises(CompressError, match="pass --resume"):
        compress(options)
    other = _options(model_dir, text_dir, tmp_path / "resumed", resume=True)
    other = CompressOptions(**{**other.__dict__, "plan": PlanOptions(num_blocks=3, rank=4, ofn="rms")})
    with pytest.raises(CheckpointError, match=r"other compression options \(plan: "):
        compress(other)
    monkeypatch.setattr(pipeline, "recover", original_recover)
    resumed = compress(CompressOptions(**{**options.__dict__, "resume": True}))
    assert resumed["recovery"]["resumed_from_step"] == 4
    assert resumed["recovery"]["losses"] == straight["recovery"]["losses"]
    for key, value in straight["evaluation"].items():  # everything but the wall-clock seconds
        assert {**resumed["evaluation"][key], "seconds": 0} == {**value, "seconds": 0}
    a, b = _own_tensors(tmp_path / "straight"), _own_tensors(tmp_path / "resumed")
    assert sorted(a) == sorted(b) and all(torch.equal(a[n], b[n]) for n in a)
    assert not options.checkpoint_folder().exists()


@pytest.mark.slow
def test_two_process_runs_match_one_process(model_dir, text_dir, tmp_path):
    common = ["--num-blocks", "2", "--rank", "4", "--data", str(text_dir), "--tokens", str(4 * 32 * 6)]
    common += ["--calib-sequences", "4", "--seq-len", "32", "--eval-sequences", "4", "--batch-size", "4", "--quiet"]
    for name, extra in (("one", []), ("two", ["--nproc", "2"])):
        result = CliRunner().invoke(main, ["compress", str(model_dir), "--out", str(tmp_path / name), *common, *extra])
        assert result.exit_code == 0, result.output
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", "2", "--no-python"]
    cli = [str(Path(sys.executable).with_name("flexi-export")), "compress", str(model_dir)]
    run = subprocess.run(
        [*torchrun, *cli, "--out", str(tmp_path / "torchrun"), *common], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("wrote ") == 1  # only rank 0 reports
    one = json.loads((tmp_path / "one" / "compress_report.json").read_text())
    assert one["recovery"]["processes"] == 1
    for name in ("two", "torchrun"):
        other = json.loads((tmp_path / name / "compress_report.json").read_text())
        assert other["recovery"]["processes"] == 2
        assert other["recovery"]["losses"] == pytest.approx(one["recovery"]["losses"], rel=1e-4)
        assert other["plan_fingerprint"] == one["plan_fingerprint"]
