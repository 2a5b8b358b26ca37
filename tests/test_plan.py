"""BlockPlan: pure data, canonical JSON, fingerprint, validation errors that name the offending entry."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flexi_export.errors import InputError, PlanError
from flexi_export.plan import (
    PLAN_FORMAT,
    AdapterSpec,
    BlockPlan,
    SourceInfo,
    original,
    removed,
    shared,
)
from tests.helpers import mixed_plan


def _plan(*entries, n=4) -> BlockPlan:
    return BlockPlan(SourceInfo("llama", n), tuple(entries))


def test_plan_module_does_not_import_torch():
    code = "import sys, flexi_export.plan; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_json_round_trip_preserves_every_field(tmp_path):
    plan = mixed_plan("llama", ofn="layernorm").with_provenance(block_influence=[0.1, 0.2], ratio=0.3)
    again = BlockPlan.from_json(json.loads(json.dumps(plan.to_json())))
    assert again == plan
    plan.save(tmp_path / "flexi_plan.json")
    assert BlockPlan.load(tmp_path / "flexi_plan.json") == plan
    assert BlockPlan.load(tmp_path) == plan  # a folder means the flexi_plan.json inside it


def test_canonical_json_is_versioned_and_sorted():
    plan = mixed_plan("llama")
    text = plan.canonical_json()
    assert json.loads(text)["format"] == PLAN_FORMAT == "flexi-plan/1"
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))


def test_fingerprint_is_stable_across_key_order_and_reload():
    plan = mixed_plan("llama")
    data = plan.to_json()
    reordered = {k: data[k] for k in reversed(list(data))}
    assert BlockPlan.from_json(reordered).fingerprint() == plan.fingerprint()
    assert len(plan.fingerprint()) == 64


def test_fingerprint_changes_when_any_decision_changes():
    plan = mixed_plan("llama", rank=4)
    assert mixed_plan("llama", rank=8).fingerprint() != plan.fingerprint()
    assert mixed_plan("llama", ofn="rms").fingerprint() != plan.fingerprint()
    assert plan.with_provenance(note="x").fingerprint() != plan.fingerprint()


def test_provenance_converts_nan_and_tuples_to_json():
    plan = _plan(*(original(i) for i in range(4))).with_provenance(scores=(1.0, float("nan")))
    assert json.loads(plan.canonical_json())["provenance"]["scores"] == [1.0, None]


def test_executed_blocks_and_owners():
    plan = mixed_plan("llama")
    executed = plan.executed()
    assert [b.entry.kind for b in executed] == [
        "original",
        "original",
        "shared",
        "original",
        "shared",
        "original",
        "shared",
    ]
    assert plan.num_executed == 7
    owners = {b.index: b.owner for b in executed if b.entry.kind == "shared"}
    assert owners == {2: 1, 4: 3, 6: 0}  # source 4 executes at index 3 because block 3 is removed


def test_identity_plan_is_valid():
    plan = BlockPlan.identity("qwen2", 5)
    assert plan.num_executed == 5 and plan.count("original") == 5


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        (
            (original(0), original(1), original(2), original(7)),
            "entry 3 (original(source=7)): source block 7 does not exist",
        ),
        (
            (original(0), removed(1), shared(1, replaces=2, adapter=AdapterSpec(4)), original(3)),
            "entry 2 (shared(source=1, replaces=2, rank=4)): sources block 1, which is removed",
        ),
        (
            (
                original(0),
                shared(0, replaces=1, adapter=AdapterSpec(4)),
                shared(1, replaces=2, adapter=AdapterSpec(4)),
                original(3),
            ),
            "sources block 1, which is itself replaced by a shared block",
        ),
        (
            (original(0), original(1), shared(1, replaces=2, adapter=AdapterSpec(0)), original(3)),
            "adapter rank must be a positive integer, got 0",
        ),
        (
            (original(0), original(1), shared(1, replaces=2, adapter=AdapterSpec(-3)), original(3)),
            "adapter rank must be a positive integer, got -3",
        ),
        (
            (original(0), original(1), shared(1, replaces=2, adapter=AdapterSpec(4, alpha=0)), original(3)),
            "adapter alpha must be > 0",
        ),
        (
            (original(0), original(1), shared(1, replaces=2, adapter=AdapterSpec(4, targets=("qkv",))), original(3)),
            "unknown adapter targets ['qkv']",
        ),
        ((original(0), original(1), shared(1, replaces=2, ofn="batchnorm"), original(3)), "ofn must be one of"),
        ((original(0), original(1), original(2)), "source block 3 is not accounted for"),
        ((original(0), original(1), original(2), original(3), removed(3)), "source block 3 is accounted for 2 times"),
        ((original(0), original(1), shared(2, replaces=2), original(3)), "a block cannot replace itself"),
        ((removed(0), removed(1), removed(2), removed(3)), "no block executes"),
    ],
)
def test_validation_names_the_offending_entry(entries, expected):
    with pytest.raises(PlanError) as info:
        _plan(*entries).validate()
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_validation_reports_every_problem_at_once():
    plan = _plan(original(0), removed(1), shared(1, replaces=2, adapter=AdapterSpec(0)), n=4)
    with pytest.raises(PlanError) as info:
        plan.validate()
    assert len(info.value.problems) == 3  # removed source, rank 0, block 3 missing


def test_from_json_rejects_wrong_format_and_malformed_entries():
    with pytest.raises(PlanError, match="unsupported plan format"):
        BlockPlan.from_json({"format": "flexi-plan/0", "source": {}, "entries": []})
    with pytest.raises(PlanError, match="malformed plan JSON"):
        BlockPlan.from_json({"format": PLAN_FORMAT, "source": {"model_type": "llama"}, "entries": []})
    with pytest.raises(PlanError, match="must be a JSON object"):
        BlockPlan.from_json([1, 2])


def test_load_reports_missing_and_corrupt_files(tmp_path):
    with pytest.raises(InputError, match="plan file not found"):
        BlockPlan.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        BlockPlan.load(bad)


def test_adapter_scaling():
    assert AdapterSpec(8).scaling == 1.0
    assert AdapterSpec(8, alpha=16).scaling == 2.0
