"""Fixtures of the export tests: tiny Flexi models and their bundles, built once per test package."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from flexi_export.export import Bundle, export_onnx
from flexi_export.model import build_flexi
from flexi_export.plan import BlockPlan
from tests.helpers import mixed_plan, randomize_own, tiny_model


@pytest.fixture(scope="package", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread; on a busy 2-core machine two spinning threads are 10-50x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_flexi(family: str, plan: str) -> torch.nn.Module:
    """``identity``: every block original; ``mixed``: original, shared (non-zero adapters, OFN), removed and
    inserted blocks (see ``tests.helpers.mixed_plan``); ``partial``: ``mixed`` with adapters on q, v and down only."""
    source = tiny_model(family)
    if plan == "identity":
        return build_flexi(source, BlockPlan.identity(family, source.config.num_hidden_layers))
    if plan == "mixed":
        return randomize_own(build_flexi(source, mixed_plan(family, ofn="layernorm")))
    if plan == "partial":
        targets = ("q_proj", "v_proj", "down_proj")
        return randomize_own(build_flexi(source, mixed_plan(family, ofn="layernorm", targets=targets)))
    raise ValueError(plan)


@pytest.fixture(scope="package")
def flexi_model() -> Callable[[str, str], torch.nn.Module]:
    """``flexi_model(family, plan)``: a cached tiny Flexi model (do not modify it)."""
    cache: dict[tuple[str, str], torch.nn.Module] = {}

    def get(family: str, plan: str) -> torch.nn.Module:
        if (family, plan) not in cache:
            cache[(family, plan)] = make_flexi(family, plan)
        return cache[(family, plan)]

    return get


@pytest.fixture(scope="package")
def bundle(tmp_path_factory: pytest.TempPathFactory, flexi_model: Callable[[str, str], torch.nn.Module]):
    """``bundle(family, plan, dtype="fp32", dense=False, target="portable")``: the cached export of
    ``flexi_model(family, plan)``."""
    cache: dict[tuple[str, str, str, bool, str], Bundle] = {}
    root: Path = tmp_path_factory.mktemp("bundles")

    def get(family: str, plan: str, dtype: str = "fp32", dense: bool = False, target: str = "portable") -> Bundle:
        key = (family, plan, dtype, dense, target)
        if key not in cache:
            out = root / "_".join([family, plan, dtype, "dense" if dense else "shared", target])
            model = flexi_model(family, plan)
            cache[key] = export_onnx(model, out, dtype=dtype, dense=dense, target=target, progress=False)
        return cache[key]

    return get
