"""Options and the one-screen summary of the on-device test suite (onnxruntime + numpy + pytest only)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flexi_device

_SUMMARY: list[tuple[str, str]] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("flexi-export device tests")
    group.addoption("--bundle", action="store", default=None, help="the exported bundle folder to test")
    group.addoption(
        "--memory-budget-mb",
        action="store",
        type=float,
        default=None,
        help="fail when the process's peak memory (VmHWM) exceeds this many MiB",
    )
    group.addoption("--threads", action="store", type=int, default=2, help="onnxruntime intra-op threads")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "memory: memory checks (need Linux /proc)")


@pytest.fixture(scope="session")
def bundle(request: pytest.FixtureRequest) -> flexi_device.Bundle:
    path = request.config.getoption("--bundle")
    if not path:
        pytest.exit("pass --bundle PATH (a folder written by `flexi-export export`)", returncode=4)
    return flexi_device.Bundle(path)


@pytest.fixture(scope="session")
def threads(request: pytest.FixtureRequest) -> int:
    return int(request.config.getoption("--threads"))


@pytest.fixture(scope="session")
def budget_mb(request: pytest.FixtureRequest) -> float | None:
    return request.config.getoption("--memory-budget-mb")


@pytest.fixture(scope="session")
def summary() -> list[tuple[str, str]]:
    """Tests append (label, value) lines; printed at the end as one screen."""
    return _SUMMARY


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if not _SUMMARY:
        return
    terminalreporter.section("flexi-export device summary")
    width = max(len(label) for label, _ in _SUMMARY)
    for label, value in _SUMMARY:
        terminalreporter.write_line(f"{label.ljust(width)}  {value}")
