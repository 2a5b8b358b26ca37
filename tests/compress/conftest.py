"""Fixtures of the compression tests: a tiny Llama folder with a real (tiny) BPE tokenizer, and small text."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flexi_export.reference.corpus import stdlib_documents
from tests.helpers import tiny_model

#: A few standard-library documents, cut short: enough text to tokenise, pack and hold one out.
_DOC_CHARS = 2500
_NUM_DOCS = 24


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices run far faster on one thread (no OpenMP hand-offs on a shared 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def documents() -> list[str]:
    docs = [d for d in stdlib_documents() if d.id.startswith("lib/") and len(d.text) > _DOC_CHARS]
    return [d.text[:_DOC_CHARS] for d in docs[:: max(1, len(docs) // _NUM_DOCS)][:_NUM_DOCS]]


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory: pytest.TempPathFactory, documents: list[str]) -> Path:
    """A folder of .txt files, one short document each."""
    folder = tmp_path_factory.mktemp("text")
    for k, text in enumerate(documents):
        (folder / f"doc{k:02d}.txt").write_text(text)
    return folder


@pytest.fixture(scope="session")
def tokenizer(documents: list[str]):
    from dataclasses import replace

    from flexi_export.reference.train import SPECS, train_tokenizer

    return train_tokenizer(documents, replace(SPECS["tiny"], vocab_size=320, tokenizer_chars=None))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    """A tiny Llama (6 blocks, hidden 64, GQA 4/2) saved with its tokenizer, as a user would pass it."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama")
    assert len(tokenizer) <= model.config.vocab_size
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
