"""Benchmark helpers (import as ``benchmarks.support``): smoke mode, ratio tables.

Benchmarks record ``benchmark.extra_info`` with a ``target`` (pacslab or an anchor), a
``case`` (what is compared) and a rate; ``pytest_terminal_summary`` prints each case's
rates and the pacslab/anchor ratios, so one run gives the figures for the closing note.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pytest

_RESULTS: dict[str, dict[str, tuple[float, str]]] = defaultdict(dict)


def benchmarks_enabled(config: pytest.Config) -> bool:
    """--benchmark-enable given (addopts always carries --benchmark-disable)."""
    return bool(config.getoption("benchmark_enable", default=False))


def record(case: str, target: str, value: float, unit: str) -> None:
    _RESULTS[case][target] = (value, unit)


def terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config
                            ) -> None:
    if not _RESULTS:
        return
    tr = terminalreporter
    tr.section("pacslab side by side")
    for case in sorted(_RESULTS):
        rows = _RESULTS[case]
        tr.write_line(f"{case}:")
        ours = rows.get("pacslab")
        for target, (value, unit) in sorted(rows.items()):
            ratio = ""
            if ours and target != "pacslab" and value:
                better = "lower" if unit in {"ms", "s", "MiB"} else "higher"
                ratio = f"   pacslab/{target} = {ours[0] / value:.2f}x ({better} is better)"
            tr.write_line(f"    {target:24s} {value:10.1f} {unit}{ratio}")
