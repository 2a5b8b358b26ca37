"""Multi-process recovery through ``torch.distributed``: DDP for models that fit one device, FSDP2 for the rest.

Processes are started by ``torchrun`` (the environment variables ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``) or locally by :func:`spawn` (``compress --nproc N``). The backend is NCCL on
GPUs and gloo on CPUs. Every rank computes the same thing on its own slice of each global batch, so the run's
result does not depend on the number of processes beyond floating-point summation order.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES: tuple[str, ...] = ("auto", "ddp", "fsdp")


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run (``world_size == 1`` without ``torch.distributed``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on the process that logs and writes outputs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


def dist_info() -> DistInfo:
    """The current process group's view (a single process when none is initialised)."""
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return DistInfo(dist.get_rank(), dist.get_world_size(), local)
    return DistInfo()


def init_from_env(device_type: str) -> DistInfo:
    """Join the process group described by torchrun's environment variables (no-op for a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (dist.is_initialized()):
        return dist_info()
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist_info()


def shutdown() -> None:
    """Leave the process group if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process (no-op for a single process)."""
    if dist_info().distributed:
        dist.barrier()


def mean_across(value: float, device: torch.device) -> float:
    """The mean of ``value`` over all processes."""
    info = dist_info()
    if not info.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / info.world_size


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of process ``src`` on every process (picklable Python objects only: JSON-like data here)."""
    if not dist_info().distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def free_port() -> int:
    """An unused local TCP port for the rendezvous of :func:`spawn`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _spawned(rank: int, world: int, port: int, device_type: str, fn: Callable[..., Any], args: Sequence[Any]) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    init_from_env(device_type)
    try:
        fn(*args)
    finally:
        shutdown()


def spawn(fn: Callable[..., Any], nproc: int, args: Sequence[Any] = (), device_type: str = "cpu") -> None:
    """Run ``fn(*args)`` in ``nproc`` fresh local processes that form one process group (like torchrun):
    gloo for ``device_type="cpu"``, NCCL (one GPU per process) for ``"cuda"``."""
    import torch.multiprocessing as mp

    mp.spawn(_spawned, args=(nproc, free_port(), device_type, fn, tuple(args)), nprocs=nproc, join=True)


def choose_strategy(strategy: str) -> str:
    """``auto`` -> ``ddp`` (FSDP only when asked: it pays off only when the model does not fit one device)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}")
    return "ddp" if strategy == "auto" else strategy


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """DDP over ``module``: only parameters that require grad are all-reduced (the adapters, not the base)."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = (
        [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    )
    return DistributedDataParallel(module, device_ids=device_ids)


def wrap_fsdp(root: nn.Module, groups: Sequence[Sequence[nn.Module]], device: torch.device) -> nn.Module:
    """FSDP2 (``fully_shard``) with one shard group per entry of ``groups``, then the root.

    Blocks that share weights must be in one group (the owner block with every block that runs its matrices by
    reference): FSDP gathers a group's parameters before any of its modules runs, so a shared block sees the
    full weight it borrows. On GPUs parameters are gathered in bf16 and gradients reduced in fp32.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist_info().world_size,))
    policy = MixedPrecisionPolicy()
    if device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for group in groups:
        fully_shard(list(group) if len(group) > 1 else group[0], mesh=mesh, mp_policy=policy)
    fully_shard(root, mesh=mesh, mp_policy=policy)
    return root


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a (possibly FSDP-sharded) parameter or optimizer state."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def like_shard(value: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor) laid out like ``reference`` (sharded the same way when it is a DTensor)."""
    if hasattr(reference, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(
            value.to(reference.device_mesh.device_type), reference.device_mesh, reference.placements
        )
    return value.to(device=reference.device, dtype=reference.dtype)


def broadcast_tensors(tensors: dict[str, torch.Tensor] | None, device: torch.device) -> dict[str, torch.Tensor]:
    """Rank 0's init tensors on every process (names and shapes as JSON-like lists, values by broadcast)."""
    info = dist_info()
    if not info.distributed:
        return tensors or {}
    spec = broadcast_object(
        [(k, list(v.shape), str(v.dtype)) for k, v in (tensors or {}).items()] if info.is_main else None
    )
    out = {}
    for name, shape, dtype in spec:
        value = (
            tensors[name].to(device)
            if info.is_main and tensors
            else torch.empty(shape, dtype=getattr(torch, dtype.split(".")[1]), device=device)
        )
        dist.broadcast(value, src=0)
        out[name] = value
    return out
