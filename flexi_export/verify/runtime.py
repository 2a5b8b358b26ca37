"""onnxruntime side of verification: the standalone ``device_tests/flexi_device.py``, loaded by path.

``device_tests/`` must stay a self-contained folder that runs on a device with only numpy and onnxruntime, so the
code that drives a bundle (prefill, decode with a past, greedy, reference replay, memory probe) lives there, once;
the library imports that same file instead of keeping a second copy that could drift from it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from flexi_export.errors import FlexiError

DEVICE_MODULE = Path(__file__).resolve().parents[2] / "device_tests" / "flexi_device.py"


def _load() -> ModuleType:
    if "flexi_device" in sys.modules:
        return sys.modules["flexi_device"]
    if not DEVICE_MODULE.is_file():
        raise FlexiError(f"{DEVICE_MODULE} is missing: run flexi-export from its source checkout (pip install -e .)")
    spec = importlib.util.spec_from_file_location("flexi_device", DEVICE_MODULE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["flexi_device"] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


device = _load()
OrtDecoder = device.OrtDecoder
ReferenceCase = device.ReferenceCase
REFERENCE_NAME = device.REFERENCE_NAME
compare_prefill = device.compare_prefill
load_reference = device.load_reference
position_ids_from_mask = device.position_ids_from_mask
run_fresh = device.run_fresh
session_options = device.session_options

__all__ = [
    "REFERENCE_NAME",
    "OrtDecoder",
    "ReferenceCase",
    "compare_prefill",
    "device",
    "load_reference",
    "position_ids_from_mask",
    "run_fresh",
    "session_options",
]
