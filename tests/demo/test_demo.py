"""`flexi-export demo --quick` end to end, its figures, and Ctrl-C followed by a re-run that continues."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _demo(out: Path, cache: Path, *args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "FLEXI_EXPORT_CACHE": str(cache)}
    command = [sys.executable, "-m", "flexi_export", "demo", "--quick", "--out", str(out), *args]
    return subprocess.Popen(
        command,
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a CI runner may start the suite in the background with SIGINT ignored, which children inherit (and then
        # Python installs no KeyboardInterrupt handler): give the demo the default Ctrl-C behaviour of a terminal
        preexec_fn=_default_sigint,
        **kwargs,
    )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.mark.slow
def test_quick_demo_runs_end_to_end_and_its_figures_hold(tmp_path, cache):
    proc = _demo(tmp_path / "demo", cache, "--json", str(tmp_path / "summary.json"))
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert "verification PASSED" in out and "held-out perplexity" in out and "device tests  python -m pytest" in out
    assert s["verification_passed"] and s["parity"]["greedy_identical"] and s["parity"]["max_logits_diff"] <= 1e-4
    params = s["stored_parameters"]["flexi"] / s["stored_parameters"]["dense"]
    weights = s["unique_bytes"]["flexi"] / s["unique_bytes"]["dense"]
    assert params < 0.8 and abs(weights / params - 1) < 0.05  # the bundle shrinks like the stored parameters
    assert s["bundle_bytes"]["flexi"] < s["bundle_bytes"]["dense"]
    assert s["resident_weights"]["flexi"] < s["resident_weights"]["dense"]
    assert s["pruned"] and all(src is not None for src in s["pruned"].values())
    ppl = s["perplexity"]
    assert ppl["dense"] < ppl["shortgpt"] and ppl["flexi"] < ppl["shortgpt"]


@pytest.mark.slow
def test_ctrl_c_leaves_no_half_written_bundle_and_a_rerun_continues(tmp_path, cache):
    out = tmp_path / "demo"
    proc = _demo(out, cache, "--tokens", "60000")  # a recovery long enough to be interrupted in the middle
    deadline = time.time() + 600
    while time.time() < deadline:  # wait until recovery has written its first checkpoint
        if any((out / "flexi-checkpoint.ckpt").glob("*")):
            break
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("recovery never wrote a checkpoint")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    assert not (out / "flexi-checkpoint").exists()  # the checkpoint folder is written all-or-nothing
    assert not any(p.name.startswith("bundle-") for p in out.iterdir())
    rerun = _demo(out, cache, "--tokens", "60000")
    _, err = rerun.communicate(timeout=900)
    assert rerun.returncode == 0, err[-3000:]
    assert "resum" in err.lower()  # the recovery continued from its checkpoint instead of starting over
    for stage in ("flexi-checkpoint", "bundle-flexi", "bundle-dense", "report"):
        assert (out / stage / "stage.json").is_file()
