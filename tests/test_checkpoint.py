"""Flexi checkpoints: each tensor once, exact round trip, sharing restored, one-line errors, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch

import flexi_export.checkpoint as checkpoint
from flexi_export.checkpoint import load_flexi, save_flexi
from flexi_export.errors import CheckpointError, InputError, UnsupportedModelError
from flexi_export.model import build_flexi
from flexi_export.plan import BlockPlan
from flexi_export.source import load_source
from flexi_export.stats import count_parameters
from tests.helpers import FAMILIES, mixed_plan, randomize_own, tiny_model

IDS = torch.randint(3, 320, (2, 9), generator=torch.Generator().manual_seed(1))


def _flexi(family: str = "qwen2"):
    source = tiny_model(family)
    return randomize_own(build_flexi(source, mixed_plan(source.config.model_type, ofn="rms")))


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_gives_identical_logits_and_restores_sharing(family, tmp_path):
    flexi = _flexi(family)
    save_flexi(flexi, tmp_path / "ck")
    loaded = load_flexi(tmp_path / "ck", attn_implementation="eager")  # the tiny sources use eager attention
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, flexi(IDS).logits)
    layers = loaded.model.layers
    assert layers[2].self_attn.q_proj.base.weight is layers[1].self_attn.q_proj.weight
    assert layers[6].mlp.down_proj.base.weight is layers[0].mlp.down_proj.weight
    assert layers[2].self_attn.q_proj.base.weight.data_ptr() == layers[1].self_attn.q_proj.weight.data_ptr()
    if loaded.config.tie_word_embeddings:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.flexi_plan == flexi.flexi_plan
    assert loaded.config.num_hidden_layers == 7


def test_each_tensor_is_stored_once_under_its_owner_name(tmp_path):
    flexi = _flexi("llama")
    save_flexi(flexi, tmp_path / "ck")
    names = set(checkpoint._read_safetensors(tmp_path / "ck" / "model.safetensors", "cpu")[0])
    assert "model.layers.1.self_attn.q_proj.weight" in names
    assert not any(".base." in n for n in names)
    assert "model.layers.2.self_attn.q_proj.lora_B.weight" in names
    assert "model.layers.2.self_attn.q_proj.weight" not in names  # shared: stored only under its owner (block 1)


def test_weights_file_is_within_one_percent_of_unique_bytes(tmp_path):
    # big enough that the safetensors header (names, offsets) is not what the bound measures
    source = tiny_model("llama", hidden_size=128, intermediate_size=384, vocab_size=2048)
    flexi = build_flexi(source, mixed_plan("llama", rank=8, ofn="rms"))
    save_flexi(flexi, tmp_path / "ck")
    size = (tmp_path / "ck" / "model.safetensors").stat().st_size
    counts = count_parameters(flexi)
    assert size <= counts.unique_bytes * 1.01
    assert size < counts.unshared_bytes * 0.9  # the shared blocks' matrices are really not duplicated


def test_checkpoint_holds_no_pickle(tmp_path):
    save_flexi(_flexi(), tmp_path / "ck")
    suffixes = {p.suffix for p in (tmp_path / "ck").iterdir()}
    assert suffixes <= {".json", ".safetensors"}


def test_load_source_reads_a_flexi_checkpoint(tmp_path):
    flexi = _flexi()
    save_flexi(flexi, tmp_path / "ck")
    src = load_source(tmp_path / "ck", attn_implementation="eager")
    assert src.is_flexi and src.plan == flexi.flexi_plan
    with torch.no_grad():
        assert torch.equal(src.model(IDS).logits, flexi(IDS).logits)


def test_truncated_and_corrupt_weights_give_one_line_errors(tmp_path):
    save_flexi(_flexi(), tmp_path / "ck")
    weights = tmp_path / "ck" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_flexi(tmp_path / "ck")
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="corrupt or truncated") as info:
        load_flexi(tmp_path / "ck")
    assert "\n" not in str(info.value)


def test_missing_files_are_reported(tmp_path):
    with pytest.raises(InputError, match="no such file or folder"):
        load_flexi(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"config\.json is missing"):
        load_flexi(tmp_path / "empty")
    save_flexi(_flexi(), tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"has no model\.safetensors"):
        load_flexi(tmp_path / "ck")
    (tmp_path / "ck" / "flexi_plan.json").unlink()
    with pytest.raises(CheckpointError, match="not a Flexi checkpoint"):
        load_flexi(tmp_path / "ck")


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UnsupportedModelError, match="unsupported model_type 'gpt2'; supported: llama, mistral, qwen2"):
        load_source(tmp_path / "m")


def test_weights_of_another_plan_are_refused(tmp_path):
    save_flexi(_flexi(), tmp_path / "ck")
    plan = BlockPlan.load(tmp_path / "ck")
    plan.with_provenance(edited=True).save(tmp_path / "ck" / "flexi_plan.json")
    with pytest.raises(CheckpointError, match="written for another plan"):
        load_flexi(tmp_path / "ck")


def test_config_and_plan_disagreeing_is_refused(tmp_path):
    save_flexi(_flexi(), tmp_path / "ck")
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    config["num_hidden_layers"] = 6
    (tmp_path / "ck" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="num_hidden_layers"):
        load_flexi(tmp_path / "ck")


def test_save_is_all_or_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_flexi(_flexi(), tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary folder is left


def test_existing_output_needs_overwrite(tmp_path):
    flexi = _flexi()
    out = tmp_path / "ck"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        save_flexi(flexi, out)
    assert (out / "keep.txt").exists()
    save_flexi(flexi, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
