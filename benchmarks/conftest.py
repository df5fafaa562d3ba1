"""Benchmark fixtures; the side-by-side ratio table is printed at the end of the run."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.support import benchmarks_enabled, terminal_summary


@pytest.fixture
def measuring(request: pytest.FixtureRequest) -> bool:
    """True with --benchmark-enable; False for the quick smoke run of the normal suite."""
    return benchmarks_enabled(request.config)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config
                            ) -> None:
    terminal_summary(terminalreporter, exitstatus, config)
