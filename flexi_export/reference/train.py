"""Train (or reuse) the reference model: a small Llama that has learned the Python standard library's text.

Compression *quality* can only be judged on a model that learned something, and no machine here reaches a model
hub, so the project trains its own: a byte-level BPE tokenizer (the ``tokenizers`` library) and a Llama with
grouped-query attention and tied embeddings, on :mod:`flexi_export.reference.corpus`, with a fixed seed, in a few
minutes on 2 CPU cores. The result is a normal Hugging Face folder cached under the user cache folder, keyed by
the training spec and the corpus, so re-runs reuse it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from flexi_export.data import pack, tokenize_documents
from flexi_export.errors import InputError
from flexi_export.files import atomic_output_dir
from flexi_export.reference.corpus import Document, corpus_fingerprint, split, stdlib_documents

#: Bump when the training code changes in a way that changes the trained weights.
TRAINER_VERSION = 2
RESULT_FILE = "reference.json"


@dataclass(frozen=True)
class ReferenceSpec:
    """Everything that determines the reference model (part of its cache key)."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    seq_len: int
    batch_size: int
    steps: int
    lr: float
    warmup: int
    #: Characters of training text used to train the tokenizer (None: all).
    tokenizer_chars: int | None
    eval_sequences: int
    seed: int = 1234


SPECS: dict[str, ReferenceSpec] = {
    # ~10.7M parameters (40.6 MiB fp32), 88% of them in the 8 blocks (as in real LLMs, where blocks dominate);
    # ~8 min on 2 cores. Wide rather than deep: onnxruntime's fixed per-node heap (~5 KiB a node) stays well
    # under 10% of the weights of a 30%-compressed export, so memory checks measure weights, not overhead.
    "default": ReferenceSpec(
        "default", vocab_size=4096, hidden_size=320, intermediate_size=896, num_layers=8, num_heads=4,
        num_kv_heads=2, seq_len=256, batch_size=8, steps=320, lr=3e-3, warmup=20, tokenizer_chars=4_000_000,
        eval_sequences=64,
    ),
    # For tests and `demo --quick`: trains in well under a minute.
    "tiny": ReferenceSpec(
        "tiny", vocab_size=512, hidden_size=64, intermediate_size=192, num_layers=6, num_heads=4, num_kv_heads=2,
        seq_len=128, batch_size=8, steps=120, lr=5e-3, warmup=10, tokenizer_chars=400_000, eval_sequences=32,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class ReferenceResult:
    """What training measured; written to ``reference.json`` beside the model."""

    spec: ReferenceSpec
    corpus_sha256: str
    heldout_loss: float
    heldout_perplexity: float
    initial_heldout_perplexity: float
    train_tokens: int
    heldout_tokens: int
    seconds: float
    torch_version: str


def cache_root() -> Path:
    """``$FLEXI_EXPORT_CACHE``, else ``$XDG_CACHE_HOME/flexi-export``, else ``~/.cache/flexi-export``."""
    if os.environ.get("FLEXI_EXPORT_CACHE"):
        return Path(os.environ["FLEXI_EXPORT_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "flexi-export"


def reference_dir(size: str = "default", cache_dir: Path | None = None, docs: list[Document] | None = None) -> Path:
    """Where the reference model of ``size`` lives (trained or not): keyed by spec, corpus and trainer version."""
    spec = _spec(size)
    docs = docs if docs is not None else stdlib_documents()
    key_text = json.dumps([asdict(spec), corpus_fingerprint(docs), TRAINER_VERSION], sort_keys=True)
    key = hashlib.sha256(key_text.encode()).hexdigest()[:12]
    return (cache_dir or cache_root()) / f"reference-{size}-{key}"


def ensure_reference_model(
    size: str = "default", cache_dir: Path | None = None, force: bool = False, progress: bool = True
) -> Path:
    """The reference model folder of ``size`` ("default" or "tiny"), training it first if it is not cached."""
    docs = stdlib_documents()
    out = reference_dir(size, cache_dir, docs)
    if (out / RESULT_FILE).is_file() and not force:
        return out
    train_reference(_spec(size), docs, out, progress=progress)
    return out


def load_result(path: Path) -> ReferenceResult:
    """Read ``reference.json`` of a trained reference model."""
    data = json.loads((path / RESULT_FILE).read_text())
    return ReferenceResult(**{**data, "spec": ReferenceSpec(**data["spec"])})


def _spec(size: str) -> ReferenceSpec:
    if size not in SPECS:
        raise InputError(f"unknown reference model size {size!r}; choose one of {', '.join(SPECS)}")
    return SPECS[size]


def train_reference(spec: ReferenceSpec, docs: list[Document], out: Path, progress: bool = True) -> ReferenceResult:
    """Train tokenizer and model on the corpus' train split; evaluate on its held-out split; write ``out``."""
    start = time.perf_counter()
    torch.manual_seed(spec.seed)
    train_docs, heldout_docs = split(docs)
    tokenizer = train_tokenizer([d.text for d in train_docs], spec)
    train = pack(tokenize_documents(tokenizer, (d.text for d in train_docs)), spec.seq_len)
    heldout = pack(tokenize_documents(tokenizer, (d.text for d in heldout_docs)), spec.seq_len, spec.eval_sequences)
    model = _new_model(spec, tokenizer)
    initial = mean_token_loss(model, heldout)
    _fit(model, train, spec, progress)
    loss = mean_token_loss(model, heldout)
    result = ReferenceResult(
        spec=spec,
        corpus_sha256=corpus_fingerprint(docs),
        heldout_loss=loss,
        heldout_perplexity=math.exp(loss),
        initial_heldout_perplexity=math.exp(initial),
        train_tokens=spec.steps * spec.batch_size * spec.seq_len,
        heldout_tokens=heldout.numel(),
        seconds=time.perf_counter() - start,
        torch_version=torch.__version__,
    )
    with atomic_output_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / RESULT_FILE).write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result


def train_tokenizer(texts: list[str], spec: ReferenceSpec):  # noqa: ANN201 (a transformers fast tokenizer)
    """A byte-level BPE tokenizer with ``<pad>``=0, ``<s>``=1, ``</s>``=2 (no unknown tokens possible)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    budget = spec.tokenizer_chars
    sample: list[str] = []
    # a spread of documents (code and prose), not the first ones in id order
    for text in sorted(texts, key=lambda t: hashlib.sha1(t.encode("utf-8")).hexdigest()):
        if budget is not None and budget <= 0:
            break
        sample.append(text if budget is None else text[:budget])
        budget = None if budget is None else budget - len(text)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(sample, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",  # decoder-only batched generation pads on the left
        model_input_names=["input_ids", "attention_mask"],  # no token_type_ids: clients' generate() rejects them
    )


def reference_config(spec: ReferenceSpec, vocab_size: int | None = None):  # noqa: ANN201 (a LlamaConfig)
    """The Llama config of the reference model (``<pad>``=0, ``<s>``=1, ``</s>``=2, tied embeddings)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size or spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.02,
    )


def _new_model(spec: ReferenceSpec, tokenizer) -> torch.nn.Module:  # noqa: ANN001
    from transformers import LlamaForCausalLM

    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    return LlamaForCausalLM(reference_config(spec, len(tokenizer)))


def _fit(model: torch.nn.Module, rows: torch.Tensor, spec: ReferenceSpec, progress: bool) -> None:
    """AdamW with linear warm-up and cosine decay to 10%; rows sampled without replacement (seeded)."""
    gen = torch.Generator().manual_seed(spec.seed)
    order = torch.randperm(rows.shape[0], generator=gen)
    needed = spec.steps * spec.batch_size
    if needed > len(order):  # small corpora: cycle through permutations
        order = torch.cat([order] + [torch.randperm(rows.shape[0], generator=gen) for _ in range(needed // len(order))])
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.1)

    def schedule(step: int) -> float:
        if step < spec.warmup:
            return (step + 1) / spec.warmup
        t = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    bar = tqdm(range(spec.steps), desc=f"training reference model ({spec.name})", disable=not progress, unit="step")
    start = time.perf_counter()
    for step in bar:
        batch = rows[order[step * spec.batch_size : (step + 1) * spec.batch_size]]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        rate = (step + 1) * batch.numel() / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{rate:.0f}")
    model.eval()


@torch.no_grad()
def mean_token_loss(model: torch.nn.Module, rows: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy over all predicted tokens of ``rows`` (``[N, L]``)."""
    model.eval()
    total = 0.0
    count = 0
    for i in range(0, rows.shape[0], batch_size):
        batch = rows[i : i + batch_size]
        logits = model(input_ids=batch).logits[:, :-1].float()
        target = batch[:, 1:]
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
        ).item()
        count += target.numel()
    return total / count
