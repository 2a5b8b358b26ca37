"""Perplexity and mean token loss on held-out text, for an HF model folder or a Flexi checkpoint."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from flexi_export.compress.data import load_corpus, shuffled, token_sequences
from flexi_export.compress.device import resolve_device

DEFAULT_SEQ_LEN = 256
DEFAULT_MAX_SEQUENCES = 128


@dataclass(frozen=True)
class EvalResult:
    """Mean next-token cross-entropy (nats) over every predicted token, and ``perplexity = exp(mean_loss)``."""

    mean_loss: float
    perplexity: float
    tokens: int
    sequences: int
    seq_len: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


@torch.no_grad()
def evaluate_model(model: nn.Module, sequences: torch.Tensor, batch_size: int = 8, progress: bool = True) -> EvalResult:
    """Evaluate ``model`` (on its own device, fp32, eval mode) on the ``[N, S]`` rows ``sequences``.

    Each row predicts its tokens 1..S-1 from the ones before (no context across rows), so
    ``tokens = N * (S - 1)``.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    started = time.perf_counter()
    try:
        for start in tqdm(range(0, sequences.shape[0], batch_size), desc="evaluate", disable=not progress, leave=False):
            ids = sequences[start : start + batch_size].to(device)
            logits = model(input_ids=ids, use_cache=False).logits.float()
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            )
            total += loss.double().cpu()
            count += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    mean = float(total) / count
    return EvalResult(
        mean_loss=mean,
        perplexity=math.exp(min(mean, 700.0)),  # exp overflows a float past ~709
        tokens=count,
        sequences=int(sequences.shape[0]),
        seq_len=int(sequences.shape[1]),
        seconds=time.perf_counter() - started,
    )


def heldout_sequences(
    tokenizer: Any,
    data: str | Path | None = None,
    text_field: str = "text",
    seq_len: int = DEFAULT_SEQ_LEN,
    max_sequences: int | None = DEFAULT_MAX_SEQUENCES,
    split: str = "heldout",
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Packed evaluation rows from ``data``'s held-out part (``split="all"``: every document, in a fixed order)."""
    corpus = load_corpus(data, text_field)
    if split == "heldout":
        docs = list(corpus.heldout)
    elif split == "all":
        docs = shuffled([*corpus.train, *corpus.heldout], seed=0)
    else:
        raise ValueError(f"unknown split {split!r}")
    rows = token_sequences(tokenizer, docs, seq_len, max_sequences, what=f"{split} text")
    return rows, {**corpus.describe(), "split": split, "documents": len(docs)}


def evaluate_path(
    path: str | Path,
    data: str | Path | None = None,
    text_field: str = "text",
    seq_len: int = DEFAULT_SEQ_LEN,
    max_sequences: int | None = DEFAULT_MAX_SEQUENCES,
    split: str = "heldout",
    device: str = "auto",
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Load the model at ``path`` (HF folder or Flexi checkpoint) and evaluate it; a JSON-ready summary."""
    from flexi_export.source import load_source

    target = resolve_device(device)
    source = load_source(path, device=target)
    rows, data_info = heldout_sequences(source.tokenizer, data, text_field, seq_len, max_sequences, split)
    result = evaluate_model(source.model, rows, batch_size, progress)
    return {
        "format": "flexi-evaluate/1",
        "model": str(path),
        "is_flexi": source.is_flexi,
        "plan_fingerprint": source.plan.fingerprint() if source.is_flexi else None,
        "device": str(target),
        "data": data_info,
        **result.to_json(),
    }
