"""Text for calibration, recovery training and evaluation: read documents, split them, tokenise and pack.

Sources (``--data PATH``):

- a ``.txt`` file: split at blank lines into paragraphs, grouped into documents of at least
  :data:`TXT_DOCUMENT_CHARS` characters (so one big file still has documents to hold out);
- a ``.jsonl`` file: one document per line, the text in field ``text`` (``--text-field``);
- a folder written by ``datasets``' ``save_to_disk`` (``Dataset`` or ``DatasetDict``; needs the ``datasets``
  package): one document per row;
- any other folder: every ``.txt`` and ``.jsonl`` file under it, in sorted order;
- nothing: the reference model's corpus (:mod:`flexi_export.reference.corpus`).

The held-out split is made *by document* and depends only on document ids, never on the seed: held-out text is
never used for calibration or training. For the reference corpus it is the corpus' own fixed held-out set (the
documents the reference model never saw); for other text it is 1 document in 20 by a hash of its id (at least
one). Calibration sequences are the first packed sequences of the training documents in a seeded, shuffled
order; recovery training reads the same training documents.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flexi_export.data import pack
from flexi_export.errors import DataError
from flexi_export.reference.corpus import HELDOUT_MODULUS, Document

#: A ``.txt`` file's paragraphs are grouped into documents of at least this many characters.
TXT_DOCUMENT_CHARS = 4000
REFERENCE_CORPUS = "reference-corpus"


@dataclass(frozen=True)
class TextCorpus:
    """Documents split by document into training (calibration + recovery) and held-out parts."""

    name: str
    train: tuple[Document, ...]
    heldout: tuple[Document, ...]

    def fingerprint(self) -> str:
        """sha256 over the ids and texts of both parts (provenance of every figure computed on it)."""
        digest = hashlib.sha256()
        for part, docs in (("train", self.train), ("heldout", self.heldout)):
            digest.update(part.encode())
            for doc in docs:
                digest.update(doc.id.encode() + b"\0" + doc.text.encode("utf-8") + b"\0")
        return digest.hexdigest()

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary for reports."""
        return {
            "name": self.name,
            "train_documents": len(self.train),
            "heldout_documents": len(self.heldout),
            "fingerprint": self.fingerprint(),
        }


def load_corpus(path: str | Path | None = None, text_field: str = "text") -> TextCorpus:
    """Read the documents at ``path`` (the reference corpus when None) and split off the held-out part."""
    if path is None:
        from flexi_export.reference.corpus import split, stdlib_documents

        train, heldout = split(stdlib_documents())
        return TextCorpus(REFERENCE_CORPUS, tuple(train), tuple(heldout))
    docs = read_documents(path, text_field)
    train, heldout = split_by_id(docs)
    return TextCorpus(str(path), tuple(train), tuple(heldout))


def read_documents(path: str | Path, text_field: str = "text") -> list[Document]:
    """All non-empty documents at ``path`` (see the module docstring for the accepted sources)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path not found: {path}")
    if path.is_dir() and _is_saved_dataset(path):
        docs = _read_saved_dataset(path, text_field)
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl"))
        if not files:
            raise DataError(f"{path} holds no .txt or .jsonl files (and is not a saved `datasets` folder)")
        docs = [d for f in files for d in _read_file(f, f.relative_to(path).as_posix(), text_field)]
    else:
        docs = _read_file(path, path.name, text_field)
    if not docs:
        raise DataError(f"no text found in {path}: every document is empty")
    return docs


def _read_file(path: Path, name: str, text_field: str) -> list[Document]:
    if path.suffix == ".txt":
        return _txt_documents(_read_text(path), name)
    if path.suffix == ".jsonl":
        return _jsonl_documents(_read_text(path), name, text_field, path)
    raise DataError(f"unsupported data file {path}: expected .txt, .jsonl or a folder")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _txt_documents(text: str, name: str) -> list[Document]:
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    docs: list[Document] = []
    current: list[str] = []
    size = 0
    for paragraph in paragraphs:
        current.append(paragraph)
        size += len(paragraph)
        if size >= TXT_DOCUMENT_CHARS:
            docs.append(Document(f"{name}#{len(docs)}", "\n\n".join(current)))
            current, size = [], 0
    if current:
        docs.append(Document(f"{name}#{len(docs)}", "\n\n".join(current)))
    return docs


def _jsonl_documents(text: str, name: str, text_field: str, path: Path) -> list[Document]:
    docs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number} is not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or text_field not in row:
            raise DataError(f"{path}:{number} has no field {text_field!r} (choose the field with --text-field)")
        value = row[text_field]
        if not isinstance(value, str):
            raise DataError(f"{path}:{number}: field {text_field!r} is not a string")
        if value.strip():
            docs.append(Document(f"{name}:{number}", value))
    return docs


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def _read_saved_dataset(path: Path, text_field: str) -> list[Document]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{path} is a saved `datasets` folder, but the `datasets` package is not installed "
            "(pip install datasets), or pass .txt / .jsonl files instead"
        ) from None
    loaded = datasets.load_from_disk(str(path))
    parts = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [("", loaded)]
    docs = []
    for split_name, table in parts:
        if text_field not in table.column_names:
            raise DataError(
                f"{path}: dataset {split_name or '(single)'} has no column {text_field!r} "
                f"(columns: {', '.join(table.column_names)}; choose one with --text-field)"
            )
        prefix = f"{split_name}/" if split_name else ""
        for index, value in enumerate(table[text_field]):
            if isinstance(value, str) and value.strip():
                docs.append(Document(f"{prefix}{index}", value))
    return docs


def _id_hash(doc_id: str) -> int:
    return int(hashlib.sha1(doc_id.encode()).hexdigest(), 16)


def split_by_id(docs: Sequence[Document]) -> tuple[list[Document], list[Document]]:
    """``(train, heldout)``: 1 document in :data:`HELDOUT_MODULUS` by id hash, at least one, never all."""
    if len(docs) < 2:
        raise DataError(
            f"need at least 2 documents to hold one out for evaluation, found {len(docs)} "
            "(a .txt file becomes several documents once it has a few blank-line separated paragraphs)"
        )
    heldout_ids = {d.id for d in docs if _id_hash(d.id) % HELDOUT_MODULUS == 0}
    if not heldout_ids:
        heldout_ids = {min(docs, key=lambda d: _id_hash(d.id)).id}
    if len(heldout_ids) == len(docs):
        heldout_ids.discard(max(docs, key=lambda d: _id_hash(d.id)).id)
    train = [d for d in docs if d.id not in heldout_ids]
    heldout = [d for d in docs if d.id in heldout_ids]
    return train, heldout


def shuffled(docs: Iterable[Document], seed: int) -> list[Document]:
    """Documents in a seeded order that depends only on their ids (not on the order they were read in)."""
    return sorted(docs, key=lambda d: hashlib.sha1(f"{seed}\0{d.id}".encode()).hexdigest())


def token_sequences(
    tokenizer: Any,
    docs: Sequence[Document],
    seq_len: int,
    max_sequences: int | None = None,
    what: str = "text",
) -> torch.Tensor:
    """Tokenise ``docs`` in order (EOS after each) and pack them into ``[N, seq_len]``, stopping as soon as
    ``max_sequences`` rows are full (so a large corpus is not tokenised beyond what is needed)."""
    if tokenizer is None:
        raise DataError("the model folder has no tokenizer: text cannot be tokenised")
    if not docs:
        raise DataError(f"no documents for {what}")
    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    need = None if max_sequences is None else max_sequences * seq_len
    for doc in docs:
        stream.extend(tokenizer(doc.text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(int(eos))
        if need is not None and len(stream) >= need:
            break
    if len(stream) < seq_len:
        raise DataError(
            f"not enough {what}: {len(stream)} tokens do not fill one sequence of {seq_len} tokens "
            "(give more text or a smaller --seq-len)"
        )
    return pack(stream, seq_len, max_sequences)


@dataclass(frozen=True)
class TokenData:
    """Packed token sequences for one compression run."""

    calibration: torch.Tensor
    train: torch.Tensor
    heldout: torch.Tensor
    corpus: dict[str, Any]


def prepare_tokens(
    corpus: TextCorpus,
    tokenizer: Any,
    seq_len: int,
    calibration_sequences: int,
    train_sequences: int,
    heldout_sequences: int | None,
    seed: int = 0,
) -> TokenData:
    """Calibration, training and held-out sequences. Calibration is the first ``calibration_sequences`` of the
    shuffled training documents; training packs up to ``train_sequences`` from the same documents (so the
    calibration text is part of the training text, and neither ever contains held-out text)."""
    order = shuffled(corpus.train, seed)
    train_rows = max(calibration_sequences, train_sequences)
    train = token_sequences(tokenizer, order, seq_len, train_rows, what="training text")
    if train.shape[0] < calibration_sequences:
        raise DataError(
            f"the training text fills only {train.shape[0]} sequences of {seq_len} tokens, "
            f"fewer than the {calibration_sequences} calibration sequences asked for (--calib-sequences)"
        )
    heldout = token_sequences(tokenizer, corpus.heldout, seq_len, heldout_sequences, what="held-out text")
    info = {
        **corpus.describe(),
        "seq_len": seq_len,
        "seed": seed,
        "calibration_sequences": calibration_sequences,
        "train_sequences": int(train.shape[0]),
        "heldout_sequences": int(heldout.shape[0]),
    }
    return TokenData(train[:calibration_sequences], train[:train_sequences], heldout, info)
