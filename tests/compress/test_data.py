"""Reading, splitting and packing calibration / training / held-out text."""

from __future__ import annotations

import json
import sys

import pytest

from flexi_export.compress.data import (
    TXT_DOCUMENT_CHARS,
    load_corpus,
    prepare_tokens,
    read_documents,
    shuffled,
    split_by_id,
    token_sequences,
)
from flexi_export.errors import DataError
from flexi_export.reference.corpus import Document, split, stdlib_documents


def test_txt_folder_gives_one_document_per_short_file(text_dir):
    docs = read_documents(text_dir)
    assert len(docs) == len(list(text_dir.glob("*.txt")))
    assert docs[0].id == "doc00.txt#0"


def test_long_txt_file_is_split_into_documents_at_blank_lines(tmp_path):
    paragraphs = [f"paragraph {k} " + "word " * 300 for k in range(12)]
    path = tmp_path / "big.txt"
    path.write_text("\n\n".join(paragraphs))
    docs = read_documents(path)
    assert len(docs) > 1
    assert all(len(d.text) >= TXT_DOCUMENT_CHARS for d in docs[:-1])
    assert "\n\n".join(d.text for d in docs) == path.read_text()


def test_jsonl_reads_the_text_field(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"text": "first document"}, {"text": "  "}, {"content": "x", "text": "third"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    docs = read_documents(path)
    assert [d.text for d in docs] == ["first document", "third"]
    assert [d.id for d in docs] == ["data.jsonl:1", "data.jsonl:3"]


def test_jsonl_custom_field_and_errors(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"body": "hello"}) + "\n")
    assert read_documents(path, text_field="body")[0].text == "hello"
    with pytest.raises(DataError, match=r"no field 'text'.*--text-field"):
        read_documents(path)
    path.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"data.jsonl:2 is not valid JSON"):
        read_documents(path)


@pytest.mark.parametrize("make", ["missing", "empty_folder", "blank_file", "other_suffix"])
def test_bad_data_paths_are_clear_errors(tmp_path, make):
    path = tmp_path / "x"
    if make == "empty_folder":
        path.mkdir()
    elif make == "blank_file":
        path = tmp_path / "blank.txt"
        path.write_text("\n\n   \n")
    elif make == "other_suffix":
        path = tmp_path / "data.csv"
        path.write_text("a,b\n")
    expected = {
        "missing": "data path not found",
        "empty_folder": "holds no .txt or .jsonl files",
        "blank_file": "no text found",
        "other_suffix": "unsupported data file",
    }[make]
    with pytest.raises(DataError, match=expected):
        load_corpus(path)


def test_saved_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": [f"document number {k}" for k in range(30)]}).save_to_disk(str(folder))
    corpus = load_corpus(folder)
    assert len(corpus.train) + len(corpus.heldout) == 30
    dict_folder = tmp_path / "dd"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"body": ["a b c", "d e f"]}),
            "test": datasets.Dataset.from_dict({"body": ["g"]}),
        }
    ).save_to_disk(str(dict_folder))
    docs = read_documents(dict_folder, text_field="body")
    assert sorted(d.id for d in docs) == ["test/0", "train/0", "train/1"]
    with pytest.raises(DataError, match="no column 'text'"):
        read_documents(dict_folder)


def test_saved_datasets_folder_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "state.json").write_text("{}")
    (folder / "dataset_info.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DataError, match="`datasets` package is not installed"):
        read_documents(folder)


def test_heldout_split_is_by_document_and_never_empty():
    docs = [Document(f"d{k}", f"text {k}") for k in range(5)]
    train, heldout = split_by_id(docs)
    assert heldout and train
    assert {d.id for d in train}.isdisjoint({d.id for d in heldout})
    assert split_by_id(list(reversed(docs)))[1] == heldout  # depends on ids, not on reading order
    with pytest.raises(DataError, match="at least 2 documents"):
        split_by_id(docs[:1])


def test_default_corpus_holds_out_what_the_reference_model_never_saw():
    corpus = load_corpus(None)
    _, heldout = split(stdlib_documents())
    assert [d.id for d in corpus.heldout] == [d.id for d in heldout]
    assert {d.id for d in corpus.train}.isdisjoint({d.id for d in corpus.heldout})


def test_calibration_and_training_come_from_training_documents_only(text_dir, tokenizer):
    corpus = load_corpus(text_dir)
    data = prepare_tokens(corpus, tokenizer, seq_len=32, calibration_sequences=4, train_sequences=20,
                          heldout_sequences=3, seed=7)  # fmt: skip
    assert data.calibration.shape == (4, 32) and data.train.shape == (20, 32)
    assert data.heldout.shape[0] <= 3
    assert (data.train[:4] == data.calibration).all()  # calibration is part of the training text
    order = shuffled(corpus.train, 7)
    expected = token_sequences(tokenizer, order, 32, 20)
    assert (expected == data.train).all()  # only training documents were packed
    heldout_stream = token_sequences(tokenizer, list(corpus.heldout), 32, None)
    assert heldout_stream[: data.heldout.shape[0]].equal(data.heldout)


def test_too_little_text_is_a_clear_error(text_dir, tokenizer):
    corpus = load_corpus(text_dir)
    with pytest.raises(DataError, match="fewer than the 100000 calibration sequences"):
        prepare_tokens(corpus, tokenizer, 32, 100_000, 0, 3)
    with pytest.raises(DataError, match="do not fill one sequence"):
        token_sequences(tokenizer, [Document("a", "tiny")], 512)


def test_evaluation_rows_from_the_heldout_split_or_all_documents(text_dir, tokenizer):
    from flexi_export.compress.evaluate import heldout_sequences

    corpus = load_corpus(text_dir)
    rows, info = heldout_sequences(tokenizer, text_dir, seq_len=32, max_sequences=None)
    assert info["documents"] == len(corpus.heldout) and info["split"] == "heldout"
    assert rows.equal(token_sequences(tokenizer, list(corpus.heldout), 32))
    every, info = heldout_sequences(tokenizer, text_dir, seq_len=32, max_sequences=None, split="all")
    assert info["documents"] == len(corpus.train) + len(corpus.heldout) and every.shape[0] > rows.shape[0]
