"""A diffable summary of a bundle's graph: op histogram, initializer table (owner, users), totals.

It depends only on the architecture, the plan and the exporter, never on weight values (no hashes), so a
committed summary (``graphs/golden/``) pins the exported structure: any change to what is stored, shared or
computed shows up as a diff in review.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx

from flexi_export.export.manifest import load_manifest
from flexi_export.table import markdown_table


def graph_summary(bundle: str | Path, title: str = "") -> str:
    """Markdown summary of ``bundle`` (see the module docstring)."""
    folder = Path(bundle)
    manifest = load_manifest(folder)
    proto = onnx.load(str(folder / manifest["files"]["model"]), load_external_data=False)
    ops = Counter(node.op_type if not node.domain else f"{node.domain}.{node.op_type}" for node in proto.graph.node)
    totals = manifest["totals"]
    rows = [
        [r["name"], r["role"], _block(r["owner_block"]), _blocks(r["consuming_blocks"]), "x".join(map(str, r["shape"])),
         r["dtype"], f"{r['bytes']:,}", len(r["consumers"])]
        for r in manifest["initializers"]
    ]  # fmt: skip
    lines = [
        f"# Graph summary{': ' + title if title else ''}",
        "",
        f"dtype {manifest['dtype']}, opset {manifest['opset']}, IR {manifest['ir_version']}, "
        f"{'dense' if manifest.get('dense') else 'shared'} export, plan {manifest['plan_fingerprint']}, "
        f"{manifest['io']['num_layers']} executed blocks, {len(proto.graph.node)} nodes.",
        "",
        "## Totals",
        "",
        markdown_table(["total", "value"], [[k, f"{v:,}"] for k, v in totals.items()]),
        "",
        "## Operators",
        "",
        markdown_table(["op", "count"], sorted(ops.items())),
        "",
        "## Initializers",
        "",
        markdown_table(["name", "role", "owner", "read by blocks", "shape", "dtype", "bytes", "nodes"], rows),
    ]
    return "\n".join(lines) + "\n"


def _block(index: int | None) -> str:
    return "-" if index is None else str(index)


def _blocks(indices: list[int]) -> str:
    return ",".join(str(i) for i in indices) if indices else "-"


GOLDEN = Path(__file__).resolve().parents[2] / "graphs" / "golden"
GOLDEN_NAME = "reference-flexi-30"


def reference_summary(plan_path: Path | None = None, workdir: Path | None = None) -> str:
    """The summary of the reference model's 30% Flexi export, from its architecture and the committed plan
    (``graphs/golden/reference-flexi-30.plan.json``) with seeded random weights: structure, not values."""
    import tempfile

    import torch
    from transformers import LlamaForCausalLM

    from flexi_export.export.exporter import export_onnx
    from flexi_export.model import build_flexi
    from flexi_export.plan import BlockPlan
    from flexi_export.reference.train import SPECS, reference_config

    plan = BlockPlan.load(plan_path or GOLDEN / f"{GOLDEN_NAME}.plan.json")
    torch.manual_seed(0)
    source = LlamaForCausalLM(reference_config(SPECS["default"])).eval()
    flexi = build_flexi(source, plan)
    with tempfile.TemporaryDirectory(prefix="flexi-golden-", dir=workdir) as tmp:
        export_onnx(flexi, Path(tmp) / "bundle", check=False, progress=False)
        return graph_summary(Path(tmp) / "bundle", "reference model, 30% Flexi plan")
