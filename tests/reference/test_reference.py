"""The reference model: trained here on the stdlib corpus, cached, and clearly better than chance."""

from __future__ import annotations

import math

import pytest

from flexi_export.reference.corpus import split, stdlib_documents
from flexi_export.reference.train import SPECS, ensure_reference_model, load_result, reference_dir
from flexi_export.source import load_source


def test_heldout_documents_are_fixed_and_disjoint_from_training():
    docs = stdlib_documents()
    train, heldout = split(docs)
    assert len(heldout) > 10 and len(train) > 10 * len(heldout)
    assert {d.id for d in train}.isdisjoint({d.id for d in heldout})
    assert [d.id for d in split(stdlib_documents())[1]] == [d.id for d in heldout]
    assert any(d.id.startswith("topics/") for d in train)  # prose as well as code


@pytest.mark.slow
def test_tiny_reference_model_trains_caches_and_learns(tmp_path):
    path = ensure_reference_model("tiny", cache_dir=tmp_path, progress=False)
    assert path == reference_dir("tiny", tmp_path)
    result = load_result(path)
    vocab = SPECS["tiny"].vocab_size
    assert result.heldout_perplexity < result.initial_heldout_perplexity / 2
    assert result.heldout_perplexity < vocab / 2
    assert math.isclose(math.log(result.heldout_perplexity), result.heldout_loss)
    # cached: a second call returns at once without retraining
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_reference_model("tiny", cache_dir=tmp_path, progress=False) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    source = load_source(path)
    assert source.tokenizer is not None and source.model.config.vocab_size == len(source.tokenizer)
    text = "def f(x):\n    return x + 1\n"
    encoded = source.tokenizer(text)
    assert "token_type_ids" not in encoded
    assert source.tokenizer.decode(encoded["input_ids"]) == text
