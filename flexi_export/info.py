"""Describe a model folder (HF or Flexi checkpoint) from its config, plan and safetensors headers, without
loading any weights."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from flexi_export.checkpoint import PLAN_NAME, is_flexi_checkpoint, read_config
from flexi_export.errors import CheckpointError
from flexi_export.layouts import ModelDims, layout_for
from flexi_export.plan import BlockPlan
from flexi_export.stats import plan_parameters, shared_reference_parameters

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass(frozen=True)
class ModelInfo:
    """What ``flexi-export info`` prints."""

    path: str
    is_flexi: bool
    dims: ModelDims
    plan: BlockPlan
    stored_params: int
    stored_bytes: int
    dtypes: tuple[str, ...]
    unshared_params: int


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, offsets)."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(f.read(length))
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not a valid safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a valid safetensors file (bad header)")
    header.pop("__metadata__", None)
    end = max((int(meta["data_offsets"][1]) for meta in header.values()), default=0)
    if 8 + length + end > path.stat().st_size:
        raise CheckpointError(
            f"{path} is truncated: its header describes {8 + length + end} bytes, the file has {path.stat().st_size}"
        )
    return header


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"{path} has no model.safetensors (only safetensors weights are supported)")
    return [single]


def describe(path: str | Path) -> ModelInfo:
    """Read a model folder's config, plan and weight headers into a :class:`ModelInfo`."""
    folder = Path(path)
    config = read_config(folder)
    flexi = is_flexi_checkpoint(folder)
    plan = (
        BlockPlan.load(folder / PLAN_NAME) if flexi else BlockPlan.identity(config.model_type, config.num_hidden_layers)
    )
    dims = layout_for(config.model_type).dims(config)  # per-block numbers are the same before and after the plan
    params = nbytes = 0
    dtypes: set[str] = set()
    for file in _weight_files(folder):
        for meta in read_safetensors_header(file).values():
            count = 1
            for d in meta["shape"]:
                count *= d
            params += count
            nbytes += count * _DTYPE_BYTES.get(meta["dtype"], 4)
            dtypes.add(meta["dtype"])
    extra = sum(shared_reference_parameters(e, dims) for e in plan.entries if e.kind == "shared")
    return ModelInfo(str(folder), flexi, dims, plan, params, nbytes, tuple(sorted(dtypes)), params + extra)


def predicted_parameters(info: ModelInfo) -> int:
    """The stored parameters the plan predicts (a cross-check of the file's contents)."""
    return plan_parameters(info.plan, info.dims)
