"""``prepack_bundle``: onnxruntime's prepacked weights saved next to a bundle (``flexi-export prepack``).

The work is done by ``device_tests/flexi_prepack.py`` (standalone: numpy + onnxruntime), in a fresh process, so
the same code runs on a device without flexi-export; this wrapper checks the bundle first and turns failures into
one-line errors.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from flexi_export.errors import BundleError, ExportError
from flexi_export.verify.integrity import check_integrity
from flexi_export.verify.runtime import DEVICE_MODULE

PREPACK_SCRIPT = DEVICE_MODULE.with_name("flexi_prepack.py")


def prepack_bundle(bundle: str | Path, threads: int = 2, check: bool = True) -> dict[str, Any]:
    """Write ``onnx/model.prepacked.onnx`` + ``.onnx_data`` into ``bundle`` and return the manifest's new
    ``prepacked`` section. ``check``: verify the bundle's files against its manifest first."""
    if check:
        check_integrity(bundle)
    command = [sys.executable, str(PREPACK_SCRIPT), "--bundle", str(bundle), "--threads", str(threads)]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise (BundleError if proc.returncode == 2 else ExportError)(f"onnxruntime could not prepack {bundle}: {last}")
    return json.loads(proc.stdout)
