"""Token sequences for calibration, training and evaluation: tokenise documents and pack them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from flexi_export.errors import InputError


def tokenize_documents(tokenizer: Any, texts: Iterable[str], eos_id: int | None = None) -> list[int]:
    """One long id stream: each text's ids followed by ``eos_id`` (the tokenizer's EOS by default)."""
    if eos_id is None:
        eos_id = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos_id is not None:
            stream.append(int(eos_id))
    return stream


def pack(stream: Sequence[int], seq_len: int, max_sequences: int | None = None) -> torch.Tensor:
    """Cut a token stream into ``[N, seq_len]`` rows (the tail that does not fill a row is dropped)."""
    if seq_len <= 1:
        raise InputError(f"sequence length must be > 1, got {seq_len}")
    n = len(stream) // seq_len
    if max_sequences is not None:
        n = min(n, max_sequences)
    if n == 0:
        raise InputError(f"not enough text: {len(stream)} tokens do not fill one sequence of {seq_len}")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)
