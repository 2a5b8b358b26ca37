"""The PyTorch Flexi model: shared blocks, adapters, OFN, and how to build it from a plan."""

from flexi_export.model.build import (
    build_flexi,
    executed_config,
    get_module,
    get_plan,
    make_skeleton,
    materialize,
)
from flexi_export.model.modules import OutputFeatureNorm, SharedLinear, SharedNorm

__all__ = [
    "OutputFeatureNorm",
    "SharedLinear",
    "SharedNorm",
    "build_flexi",
    "executed_config",
    "get_module",
    "get_plan",
    "make_skeleton",
    "materialize",
]
