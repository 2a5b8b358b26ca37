"""Recovery: teach the replacement blocks' own parameters by distillation from the dense teacher.

Only the parameters the caller names train (for a Flexi model: every adapter, OFN gamma and own norm of its
shared blocks); everything else is frozen for the run and its ``requires_grad`` flags are restored afterwards.
AdamW with linear warm-up and cosine decay to ``min_lr_ratio * lr``; gradient clipping; a token budget
(``steps = ceil(tokens / (batch_size * seq_len))``). On a GPU the forward runs under bf16 autocast with
gradient checkpointing; on a CPU everything is fp32. Batches are a seeded permutation of the training rows per
epoch; with N processes each takes 1/N of every global batch, and DDP (or FSDP) averages the gradients, so the
loss curve does not depend on N beyond rounding.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from flexi_export.compress import distributed as D
from flexi_export.compress.distill import Distiller, LossWeights, distillation_loss, fsdp_groups, matched_blocks
from flexi_export.compress.train_state import TrainState, has_checkpoint, load_checkpoint, read_state, save_checkpoint
from flexi_export.errors import CheckpointError, CompressError
from flexi_export.layouts import layout_for
from flexi_export.model.build import get_plan


@dataclass(frozen=True)
class RecoveryConfig:
    """Settings of one recovery run (see the module docstring)."""

    tokens: int = 0
    batch_size: int = 8
    micro_batch_size: int = 0  # sequences per forward pass on one process; 0 = the whole per-process batch
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup: float = 0.05  # fraction of the steps
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    loss: LossWeights = field(default_factory=LossWeights)
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0 = never
    seed: int = 0
    strategy: str = "auto"  # auto | ddp | fsdp (only used with several processes)
    gradient_checkpointing: bool | None = None  # None: on for CUDA

    def steps(self, seq_len: int) -> int:
        """Optimizer steps that spend the token budget."""
        return math.ceil(self.tokens / (self.batch_size * seq_len)) if self.tokens > 0 else 0

    def identity(self) -> dict[str, Any]:
        """The settings that decide the result (a resume must match them)."""
        data = asdict(self)
        data.pop("checkpoint_every")
        return data


@dataclass(frozen=True)
class StepInfo:
    """What a step callback sees."""

    step: int
    total: int
    loss: float
    lr: float
    tokens: int


@dataclass
class RecoveryResult:
    """Outcome of :func:`recover`."""

    steps: int
    tokens: int
    seconds: float
    losses: list[float]
    resumed_from: int
    #: The trained parameters as whole tensors (also written into the student unless it was FSDP-sharded).
    params: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        """Training throughput over the whole run (all processes)."""
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def flexi_trainable(student: PreTrainedModel) -> list[str]:
    """Names of a Flexi model's own parameters: everything registered in its shared blocks."""
    plan = get_plan(student)
    if plan is None:
        raise ValueError("flexi_trainable needs a Flexi model")
    layers = layout_for(student.config.model_type).layers
    shared = {b.index for b in plan.executed() if b.entry.kind == "shared"}
    return [n for n, _ in student.named_parameters() if _block_of(n, layers) in shared]


def _block_of(name: str, layers: str) -> int | None:
    prefix = layers + "."
    if not name.startswith(prefix):
        return None
    head = name[len(prefix) :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def lr_at(step: int, total: int, config: RecoveryConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine to ``min_lr_ratio``."""
    warm = max(1, round(config.warmup * total)) if config.warmup > 0 else 0
    if step < warm:
        return config.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    floor = config.min_lr_ratio
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


class _Batches:
    """Global batch ``step``: rows ``[step * B, (step + 1) * B)`` of a per-epoch seeded permutation."""

    def __init__(self, rows: int, batch: int, seed: int) -> None:
        self.rows, self.batch, self.seed = rows, batch, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.rows, generator=gen)}
        return self._perms[epoch]

    def indices(self, step: int) -> torch.Tensor:
        positions = range(step * self.batch, (step + 1) * self.batch)
        return torch.stack([self._perm(p // self.rows)[p % self.rows] for p in positions])


def run_id(config: RecoveryConfig, student: nn.Module, train_ids: torch.Tensor) -> str:
    """Identity of a run: settings, plan and data (a checkpoint only resumes the same run)."""
    digest = hashlib.sha256(json.dumps(config.identity(), sort_keys=True, default=str).encode())
    plan = get_plan(student)
    digest.update((plan.fingerprint() if plan is not None else "no-plan").encode())
    digest.update(train_ids.contiguous().numpy().tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def _only_trainable(module: nn.Module, names: set[str]) -> Iterator[None]:
    """Freeze every parameter of ``module`` except ``names``; restore the flags afterwards."""
    params = dict(module.named_parameters())
    before = {n: p.requires_grad for n, p in params.items()}
    try:
        for n, p in params.items():
            p.requires_grad_(n in names)
        yield
    finally:
        for n, p in params.items():
            p.requires_grad_(before[n])


def recover(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    train_ids: torch.Tensor,
    config: RecoveryConfig,
    trainable: list[str] | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[StepInfo], None] | None = None,
    extra: dict[str, Any] | None = None,
    device: torch.device | None = None,
) -> RecoveryResult:
    """Train ``trainable`` (default :func:`flexi_trainable`) parameters of ``student`` toward ``teacher``.

    ``train_ids`` is ``[N, seq_len]`` on the CPU. With ``checkpoint_dir`` the state is saved every
    ``config.checkpoint_every`` steps; ``resume=True`` continues from the checkpoint there, if any. ``extra``
    (JSON-ready) is stored in every checkpoint for the caller. ``device`` is where the batches are computed
    (default: the student's); with FSDP the models may sit on the CPU and only their shards move there.
    """
    info = D.dist_info()
    seq_len = int(train_ids.shape[1])
    _check_batching(config, info.world_size)
    total = config.steps(seq_len)
    names = trainable if trainable is not None else flexi_trainable(student)
    if total == 0:
        return RecoveryResult(0, 0, 0.0, [], 0, _whole(dict(student.named_parameters()), names))
    if not names:
        raise CompressError("nothing to train: the model has no adapters, norms or OFN of its own")
    device = device or next(student.parameters()).device
    pairs = matched_blocks(get_plan(student)) if config.loss.hidden_mse and get_plan(student) else []
    distiller = Distiller(student, teacher, pairs)
    distiller.with_hidden = bool(config.loss.hidden_mse)
    identity = run_id(config, student, train_ids)
    checkpointing = (
        config.gradient_checkpointing if config.gradient_checkpointing is not None else device.type == "cuda"
    )
    with _only_trainable(distiller, {"student." + n for n in names}), _checkpointing(student, checkpointing):
        model, strategy = _wrap(distiller, device, config, info)
        params = {n: dict(distiller.named_parameters())["student." + n] for n in names}
        optimizer = torch.optim.AdamW(
            list(params.values()), lr=config.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=config.weight_decay
        )
        state = _start_state(checkpoint_dir, resume, identity, params, optimizer)
        state.extra = dict(extra or {})
        resumed_from = state.step
        _train_loop(
            model,
            params,
            optimizer,
            state,
            train_ids,
            config,
            total,
            device,
            strategy,
            checkpoint_dir,
            progress,
            on_step,
        )
        whole = {n: D.full_tensor(p.detach()).clone() for n, p in params.items()}
    return RecoveryResult(state.step, state.tokens, state.seconds, state.losses, resumed_from, whole)


def _whole(params: Mapping[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    return {n: params[n].detach().clone() for n in names}


def _check_batching(config: RecoveryConfig, world: int) -> None:
    if config.tokens < 0:
        raise CompressError(f"--tokens must be >= 0, got {config.tokens}")
    if config.batch_size < 1 or config.batch_size % world:
        raise CompressError(f"--batch-size {config.batch_size} must be a positive multiple of the {world} processes")
    per_rank = config.batch_size // world
    micro = config.micro_batch_size or per_rank
    if per_rank % micro:
        raise CompressError(f"--micro-batch-size {micro} must divide the per-process batch {per_rank}")
    if config.lr <= 0:
        raise CompressError(f"--lr must be > 0, got {config.lr}")
    if config.loss.temperature <= 0:
        raise CompressError(f"--temperature must be > 0, got {config.loss.temperature}")
    if min(config.loss.kl, config.loss.hidden_mse, config.loss.ce) < 0 or not (
        config.loss.kl or config.loss.hidden_mse or config.loss.ce
    ):
        raise CompressError("loss weights (--kl, --hidden-mse, --ce) must be >= 0 and not all zero")


@contextlib.contextmanager
def _checkpointing(student: PreTrainedModel, enabled: bool) -> Iterator[None]:
    """Activation (gradient) checkpointing of the student's blocks for the duration of the run."""
    if not enabled:
        yield
        return
    kwargs = {"use_reentrant": False}  # the non-reentrant form works with frozen inputs and with DDP
    if hasattr(student, "activation_checkpointing_enable"):  # transformers >= 5.x name
        student.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    try:
        yield
    finally:
        if hasattr(student, "activation_checkpointing_disable"):
            student.activation_checkpointing_disable()
        else:
            student.gradient_checkpointing_disable()


def _wrap(
    distiller: Distiller, device: torch.device, config: RecoveryConfig, info: D.DistInfo
) -> tuple[nn.Module, str]:
    if not info.distributed:
        return distiller, "single"
    strategy = D.choose_strategy(config.strategy)
    if strategy == "fsdp":
        return D.wrap_fsdp(distiller, fsdp_groups(distiller), device), "fsdp"
    return D.wrap_ddp(distiller, device), "ddp"


def _start_state(
    checkpoint_dir: str | Path | None,
    resume: bool,
    identity: str,
    params: Mapping[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
) -> TrainState:
    if checkpoint_dir is None or not has_checkpoint(checkpoint_dir):
        return TrainState(run_id=identity)
    if not resume:
        raise CheckpointError(
            f"recovery checkpoint {checkpoint_dir} exists: pass --resume to continue it, or --overwrite to start over"
        )
    if read_state(checkpoint_dir).run_id != identity:
        raise CheckpointError(
            f"the recovery checkpoint in {checkpoint_dir} belongs to another run (different plan, data or settings)"
        )
    return load_checkpoint(checkpoint_dir, params, optimizer)


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; fp32 (no autocast) elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _accumulate(
    model: nn.Module,
    rows: torch.Tensor,
    train_ids: torch.Tensor,
    micro: int,
    config: RecoveryConfig,
    device: torch.device,
    strategy: str,
) -> float:
    """Forward and backward over this process's rows in micro-batches; the mean loss of the rows."""
    total = 0.0
    chunks = rows.split(micro)
    for k, chunk in enumerate(chunks):
        ids = train_ids[chunk].to(device)
        last = k == len(chunks) - 1
        # DDP all-reduces on every backward unless told not to: only the last micro-batch syncs.
        sync = model.no_sync() if strategy == "ddp" and not last else contextlib.nullcontext()
        with sync:
            with _autocast(device):
                out = model(ids)
            loss, _ = distillation_loss(out, ids, config.loss)
            share = len(chunk) / len(rows)
            (loss * share).backward()
        total += float(loss.detach()) * share
    return total


def _train_loop(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    train_ids: torch.Tensor,
    config: RecoveryConfig,
    total: int,
    device: torch.device,
    strategy: str,
    checkpoint_dir: str | Path | None,
    progress: bool,
    on_step: Callable[[StepInfo], None] | None,
) -> None:
    info = D.dist_info()
    batches = _Batches(int(train_ids.shape[0]), config.batch_size, config.seed)
    per_rank = config.batch_size // info.world_size
    micro = config.micro_batch_size or per_rank
    step_tokens = config.batch_size * int(train_ids.shape[1])
    started, done_before, session_tokens = time.perf_counter(), state.seconds, 0
    model.train()
    bar = tqdm(total=total, initial=state.step, desc="recovery", unit="step", disable=not (progress and info.is_main))
    with bar:
        while state.step < total:
            lr = lr_at(state.step, total, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            rows = batches.indices(state.step)[info.rank * per_rank : (info.rank + 1) * per_rank]
            loss = _accumulate(model, rows, train_ids, micro, config, device, strategy)
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(list(params.values()), config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss = D.mean_across(loss, device)
            elapsed = time.perf_counter() - started
            session_tokens += step_tokens
            state.step += 1
            state.tokens += step_tokens
            state.seconds = done_before + elapsed
            state.losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{session_tokens / max(elapsed, 1e-9):,.0f}")
            due = config.checkpoint_every and state.step % config.checkpoint_every == 0 and state.step < total
            if checkpoint_dir is not None and due:
                save_checkpoint(checkpoint_dir, state, params, optimizer)
                D.barrier()
            if on_step is not None:
                on_step(StepInfo(state.step, total, loss, lr, state.tokens))
    model.eval()
