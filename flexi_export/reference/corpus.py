"""The reference corpus: text already on every machine (the Python standard library's own docs and sources).

Documents are the language-reference topics of ``pydoc_data`` (prose) and the standard library's ``.py`` files
(code and docstrings; generated tables such as ``encodings/`` are skipped), located through :mod:`sysconfig`.
A fixed 5% of documents, chosen by a hash of their id, is held out: it is never used for tokenizer training,
model training, calibration or recovery.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# Folders of the standard library that are tests, GUI demos, vendored packages or generated data.
_SKIP_PARTS = frozenset(
    {
        "test",
        "tests",
        "idlelib",
        "lib2to3",
        "site-packages",
        "dist-packages",
        "ensurepip",
        "turtledemo",
        "__pycache__",
        "tkinter",
        "pydoc_data",
        "encodings",
    }
)
HELDOUT_MODULUS = 20  # 1 document in 20 (5%) is held out


@dataclass(frozen=True)
class Document:
    """One text with a stable id (``topics/<name>`` or ``lib/<relative path>``)."""

    id: str
    text: str

    @property
    def heldout(self) -> bool:
        """True for the fixed 5% of documents reserved for evaluation."""
        return int(hashlib.sha1(self.id.encode()).hexdigest(), 16) % HELDOUT_MODULUS == 0


def stdlib_root() -> Path:
    """The standard library folder of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_documents(root: Path | None = None) -> list[Document]:
    """All reference documents, sorted by id (deterministic for a given Python version)."""
    root = root or stdlib_root()
    docs = [Document(f"topics/{name}", text) for name, text in _pydoc_topics().items()]
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in _SKIP_PARTS for part in rel.parts) or rel.name.startswith("_sysconfigdata"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            docs.append(Document(f"lib/{rel.as_posix()}", text))
    return sorted(docs, key=lambda d: d.id)


def _pydoc_topics() -> dict[str, str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some minimal Python builds ship without pydoc_data
        return {}
    return dict(topics)


def split(docs: Sequence[Document]) -> tuple[list[Document], list[Document]]:
    """``(train, heldout)``: held-out membership depends only on each document's id."""
    train = [d for d in docs if not d.heldout]
    heldout = [d for d in docs if d.heldout]
    return train, heldout


def corpus_fingerprint(docs: Sequence[Document]) -> str:
    """sha256 over ids and texts: the cache key of everything trained on the corpus."""
    digest = hashlib.sha256()
    for d in docs:
        digest.update(d.id.encode())
        digest.update(b"\0")
        digest.update(d.text.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()
