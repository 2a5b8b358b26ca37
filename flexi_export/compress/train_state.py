"""Recovery checkpoints: resumable training state without pickle.

A checkpoint folder holds ``tensors.safetensors`` (trainable parameters ``param/<name>``, AdamW moments
``exp_avg/<name>`` / ``exp_avg_sq/<name>`` / ``step/<name>`` and RNG states ``rng/...``) and ``state.json`` (step,
tokens, loss history, the run's identity). It is written under a temporary name and renamed, so a crash while
saving leaves the previous checkpoint intact. Resuming restores every one of these exactly: the resumed run
ends with bit-identical adapters (same device, same number of processes).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from flexi_export.compress.distributed import dist_info, full_tensor, like_shard
from flexi_export.errors import CheckpointError
from flexi_export.files import atomic_output_dir

STATE_FORMAT = "flexi-recovery/1"
TENSORS = "tensors.safetensors"
STATE = "state.json"
_MOMENTS = ("exp_avg", "exp_avg_sq", "step")


@dataclass
class TrainState:
    """Counters and history that a resumed run continues from."""

    step: int = 0
    tokens: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    #: Identity of the run (plan fingerprint, recovery settings, data): a resume must match it.
    run_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def has_checkpoint(folder: str | Path) -> bool:
    """True when ``folder`` holds a complete recovery checkpoint."""
    folder = Path(folder)
    return (folder / STATE).is_file() and (folder / TENSORS).is_file()


def save_checkpoint(
    folder: str | Path, state: TrainState, params: Mapping[str, nn.Parameter], optimizer: torch.optim.Optimizer
) -> None:
    """Write the checkpoint (all ranks must call this under FSDP, since gathering shards is collective)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, param in params.items():
        tensors[f"param/{name}"] = full_tensor(param.detach())
        for key, value in optimizer.state.get(param, {}).items():
            if key in _MOMENTS and isinstance(value, torch.Tensor):
                tensors[f"{key}/{name}"] = full_tensor(value.detach())
    tensors["rng/cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for index, value in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{index}"] = value
    if not dist_info().is_main:
        return
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    body = {
        "format": STATE_FORMAT,
        "step": state.step,
        "tokens": state.tokens,
        "seconds": state.seconds,
        "losses": state.losses,
        "run_id": state.run_id,
        "extra": state.extra,
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
    }
    with atomic_output_dir(folder, overwrite=True) as tmp:
        save_file(tensors, str(tmp / TENSORS), metadata={"format": "pt", "flexi_format": STATE_FORMAT})
        (tmp / STATE).write_text(json.dumps(body, indent=1, allow_nan=False) + "\n")


def read_state(folder: str | Path) -> TrainState:
    """The counters of a checkpoint (no tensors)."""
    path = Path(folder) / STATE
    try:
        body = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read recovery checkpoint {path}: {exc}") from None
    if body.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a recovery checkpoint (format {body.get('format')!r})")
    return TrainState(
        step=int(body["step"]),
        tokens=int(body["tokens"]),
        seconds=float(body["seconds"]),
        losses=[float(x) for x in body["losses"]],
        run_id=str(body["run_id"]),
        extra=dict(body.get("extra") or {}),
    )


def read_params(folder: str | Path) -> dict[str, torch.Tensor]:
    """The trainable parameters stored in a checkpoint, by parameter name."""
    tensors = _read_tensors(Path(folder) / TENSORS)
    return {k[len("param/") :]: v for k, v in tensors.items() if k.startswith("param/")}


def load_checkpoint(
    folder: str | Path, params: Mapping[str, nn.Parameter], optimizer: torch.optim.Optimizer
) -> TrainState:
    """Restore parameters, AdamW moments and RNG states in place; return the counters."""
    state = read_state(folder)
    tensors = _read_tensors(Path(folder) / TENSORS)
    missing = [n for n in params if f"param/{n}" not in tensors]
    if missing:
        raise CheckpointError(f"{folder} does not match this run: {len(missing)} trainable tensors missing")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(like_shard(tensors[f"param/{name}"], param))
            moments = {k: tensors[f"{k}/{name}"] for k in _MOMENTS if f"{k}/{name}" in tensors}
            if moments:
                optimizer.state[param] = {
                    "step": moments["step"].clone(),
                    "exp_avg": like_shard(moments["exp_avg"], param),
                    "exp_avg_sq": like_shard(moments["exp_avg_sq"], param),
                }
    torch.set_rng_state(tensors["rng/cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng/cuda/")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    return state


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as exc:  # safetensors has its own error type for corrupt files
        raise CheckpointError(f"{path} is corrupt or truncated ({type(exc).__name__}: {exc})") from None


def remove_checkpoint(folder: str | Path) -> None:
    """Delete a checkpoint folder (after a successful run)."""
    shutil.rmtree(folder, ignore_errors=True)
