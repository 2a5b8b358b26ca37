"""Which device compression runs on: the GPU when there is one, unless told otherwise."""

from __future__ import annotations

import os

import torch

from flexi_export.errors import InputError

DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")


def resolve_device(choice: str = "auto") -> torch.device:
    """``auto``: ``cuda`` when available, else ``cpu``; ``cuda`` without a GPU is an error, not a fallback.

    Under torchrun each process takes the GPU of its ``LOCAL_RANK``.
    """
    if choice not in DEVICES and not choice.startswith("cuda:"):
        raise InputError(f"--device must be one of {', '.join(DEVICES)} (or cuda:N), got {choice!r}")
    if choice == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if choice == "auto":
            return torch.device("cpu")
        raise InputError(f"--device {choice} was asked for, but torch sees no CUDA GPU (torch {torch.__version__})")
    if choice.startswith("cuda:"):
        return torch.device(choice)
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
