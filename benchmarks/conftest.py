"""Benchmark fixtures and hooks: the side-by-side table at the end of the run, and the
figures file ``./run bench`` turns into its report (``$PACSLAB_BENCH_FIGURES``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from benchmarks.support import (
    add_outcome,
    benchmarks_enabled,
    set_source,
    terminal_summary,
    write_figures,
)
from pacslab.runtime import close_reactor_race

# pynetdicom SCUs in the benchmarks: see pacslab.runtime.close_reactor_race.
close_reactor_race()


@pytest.fixture
def measuring(request: pytest.FixtureRequest) -> bool:
    """True with --benchmark-enable; False for the quick smoke run of the normal suite."""
    return benchmarks_enabled(request.config)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    # Cases are stamped with the file that recorded them: the report groups them by area.
    set_source(item.nodeid.split("::", 1)[0])
    yield


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" or report.outcome != "passed":
        reason = ""
        if report.skipped and isinstance(report.longrepr, tuple):
            reason = str(report.longrepr[2])
        elif report.failed:
            crash = getattr(report.longrepr, "reprcrash", None)
            reason = str(getattr(crash, "message", "") or report.longreprtext[-300:])
        add_outcome(report.nodeid, report.outcome, reason)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    write_figures()


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config
                            ) -> None:
    terminal_summary(terminalreporter, exitstatus, config)
