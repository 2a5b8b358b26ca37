"""``verify``: structure, parity and memory checks of a bundle, gathered into one :class:`VerificationReport`.

Order: the bundle's files are checked against its manifest first (a mismatch is refused before anything runs),
then structure, parity (against the PyTorch model when given, else ``reference.npz``), then memory in fresh
processes for the bundle and for the dense export of the same source (given, or exported on the fly from
``against``). Failed checks are collected and reported, never raised.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexi_export.verify import memory, parity
from flexi_export.verify.integrity import check_integrity
from flexi_export.verify.structure import CheckResult, check_structure


@dataclass
class VerificationReport:
    """Everything ``verify`` measured: check results and the raw memory probes."""

    bundle: str
    manifest: dict[str, Any]
    checks: list[CheckResult] = field(default_factory=list)
    #: label ("flexi" or "dense") -> mode ("recommended", "default") -> probe figures
    memory: dict[str, dict[str, Any]] = field(default_factory=dict)
    dense_manifest: dict[str, Any] | None = None
    against: str | None = None
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        """True when every check passed (skipped checks do not fail)."""
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[CheckResult]:
        """The checks that failed."""
        return [c for c in self.checks if not c.passed]

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (no arrays)."""
        m = self.manifest
        return {
            "bundle": self.bundle,
            "passed": self.passed,
            "against": self.against,
            "dtype": m["dtype"],
            "dense": m.get("dense", False),
            "plan_fingerprint": m.get("plan_fingerprint"),
            "totals": m["totals"],
            "dense_totals": None if self.dense_manifest is None else self.dense_manifest["totals"],
            "checks": [c.to_json() for c in self.checks],
            "memory": self.memory,
            "seconds": self.seconds,
        }


def verify(
    bundle: str | Path,
    against: str | Path | None = None,
    dense_bundle: str | Path | None = None,
    budget_mb: float | None = None,
    threads: int = 2,
    check_memory: bool = True,
    progress: bool = True,
) -> VerificationReport:
    """Verify ``bundle``; see the module docstring. ``against``: the Flexi checkpoint or HF folder it was
    exported from; ``dense_bundle``: the ``--dense`` export of the same source (exported on the fly when only
    ``against`` is given)."""
    start = time.perf_counter()
    manifest = check_integrity(bundle)
    dense_manifest = check_integrity(dense_bundle) if dense_bundle is not None else None
    report = VerificationReport(str(bundle), manifest, against=None if against is None else str(against))
    model = _load(against) if against is not None else None
    _stage(progress, "structure checks")
    report.checks += check_structure(bundle, model=model)
    _stage(progress, "parity against PyTorch" if model is not None else "parity against reference.npz")
    report.checks += (
        parity.check_against(bundle, model, manifest, threads)
        if model is not None
        else [parity.check_replay(bundle, threads)]
    )
    if check_memory:
        with tempfile.TemporaryDirectory(prefix="flexi-verify-dense-") as tmp:
            if dense_bundle is None and model is not None and not manifest.get("dense"):
                _stage(progress, "exporting the dense model for comparison")
                dense_bundle, dense_manifest = _export_dense(model, Path(tmp) / "dense", manifest)
            report.dense_manifest = dense_manifest
            _measure(report, bundle, dense_bundle, threads, progress)
        report.checks += _memory_checks(report, budget_mb)
    report.seconds = time.perf_counter() - start
    return report


def _load(against: str | Path) -> Any:
    from flexi_export.source import load_source

    return load_source(against).model


def _export_dense(model: Any, out: Path, manifest: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """The ``--dense`` export of ``model`` in the bundle's own dtype and quantization (a like-for-like baseline)."""
    from flexi_export.export.exporter import export_onnx

    options: dict[str, Any] = {}
    quant = manifest.get("quantization")
    if quant:
        options["quantize_embedding"] = bool(quant.get("quantize_embedding"))
        if quant["dtype"] == "int4":
            options.update(block_size=quant["block_size"], symmetric=quant["symmetric"])
            options["accuracy_level"] = quant["accuracy_level"]
    export_onnx(model, out, dtype=manifest["dtype"], dense=True, check=False, progress=False, **options)
    return out, check_integrity(out)


def _measure(
    report: VerificationReport, bundle: str | Path, dense: str | Path | None, threads: int, progress: bool
) -> None:
    targets = [("flexi" if not report.manifest.get("dense") else "dense", bundle)]
    if dense is not None and not report.manifest.get("dense"):
        targets.append(("dense", dense))
    for label, path in targets:
        report.memory[label] = {}
        for mode in ("recommended", "default"):
            _stage(progress, f"memory: {label} bundle, {mode} session options (fresh process)")
            report.memory[label][mode] = memory.probe(path, mode, threads)


def _memory_checks(report: VerificationReport, budget_mb: float | None) -> list[CheckResult]:
    own = "dense" if report.manifest.get("dense") else "flexi"
    probed = report.memory[own]["recommended"]
    checks = [
        memory.check_heap(report.manifest, probed),
        memory.check_residency(report.manifest, probed),
    ]
    ratio = CheckResult("memory: sharing is real in RAM (Flexi / dense)")
    if own == "dense":
        ratio.skipped = "this bundle is itself the dense export"
    elif "dense" not in report.memory or report.dense_manifest is None:
        ratio.skipped = "no dense bundle to compare with (pass --dense BUNDLE or --against MODEL)"
    else:
        ratio = memory.check_sharing_ratio(
            report.manifest, probed, report.dense_manifest, report.memory["dense"]["recommended"]
        )
    checks += [ratio, memory.check_budget(probed, budget_mb)]
    return checks


def _stage(progress: bool, text: str) -> None:
    if progress:
        import click

        click.echo(f"verify: {text}", err=True)
