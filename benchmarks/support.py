"""Benchmark helpers (import as ``benchmarks.support``): smoke mode, quick mode, figures.

Benchmarks call :func:`record` with a ``case`` (what is compared), a ``target``
(``pacslab``, a pacslab variant such as ``pacslab (response LRU hit)``, or an anchor
such as ``orthanc``), the headline figure and, where the benchmark has them, the
per-round figures (``rounds``), the raw latencies (``samples``) and a :class:`Goal`.
``pytest_terminal_summary`` prints each case's figures and the pacslab/anchor ratios;
``./run bench`` (``benchmarks/bench.py``) reads the same figures, written at the end of
the session as JSON (:func:`write_figures`), and turns them into its report.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import pytest

__all__ = [
    "FIGURES_ENV",
    "QUICK_ENV",
    "Goal",
    "add_outcome",
    "benchmarks_enabled",
    "figures_json",
    "per_round",
    "quick",
    "record",
    "set_source",
    "terminal_summary",
    "write_figures",
]

QUICK_ENV = "PACSLAB_BENCH_QUICK"  # "1": smoke sizes, a few rounds (``./run bench --quick``)
FIGURES_ENV = "PACSLAB_BENCH_FIGURES"  # where the session writes its figures as JSON
_MAX_SAMPLES = 2000  # raw latencies kept per figure (evenly spaced quantiles beyond)


@dataclass(frozen=True, slots=True)
class Goal:
    """A target for one pacslab figure: ``value op bound``, or ``ratio op bound``.

    ``on="ratio"`` compares pacslab's figure divided by ``anchor``'s, measured in the
    same run (the figure that survives this machine's drift).
    """

    op: Literal[">=", "<=", "<", ">"]
    bound: float
    on: Literal["value", "ratio"] = "value"
    anchor: str | None = None


@dataclass(slots=True)
class _Figure:
    value: float
    rounds: list[float] | None = None
    samples: list[float] | None = None
    goal: Goal | None = None


@dataclass(slots=True)
class _Case:
    unit: str
    better: str
    source: str
    figures: dict[str, _Figure]
    interleaved: bool = False


_CASES: dict[str, _Case] = {}
_OUTCOMES: list[dict[str, str]] = []
_current_source = ""


def benchmarks_enabled(config: pytest.Config) -> bool:
    """--benchmark-enable given (addopts always carries --benchmark-disable)."""
    return bool(config.getoption("benchmark_enable", default=False))


# Read once, at import: several benchmarks clear every PACSLAB_* variable (monkeypatch)
# so that the servers they start see only their own settings.
_QUICK = os.environ.get(QUICK_ENV, "") == "1"
_FIGURES_PATH = os.environ.get(FIGURES_ENV, "")


def quick() -> bool:
    """``./run bench --quick``: measure, but at smoke sizes with a few rounds."""
    return _QUICK


def _better(unit: str) -> str:
    return "lower" if unit in {"ms", "s", "MiB"} else "higher"


def _thin(samples: Sequence[float]) -> list[float]:
    values = sorted(float(v) for v in samples)
    if len(values) <= _MAX_SAMPLES:
        return values
    # evenly spaced order statistics keep the distribution's shape (and both tails)
    last = len(values) - 1
    return [values[round(i * last / (_MAX_SAMPLES - 1))] for i in range(_MAX_SAMPLES)]


def per_round(values: Sequence[float], rounds: int,
              figure: Callable[[list[float]], float]) -> list[float]:
    """``figure`` of each of ``rounds`` consecutive slices of ``values`` (in order).

    For benchmarks that time many requests in one pass: the figure per slice shows how
    much the pass itself varied, which is what ``--compare`` weighs a change against.
    """
    n = max(1, min(rounds, len(values)))
    size = len(values) / n
    return [figure(list(values[round(i * size):round((i + 1) * size)])) for i in range(n)]


def record(case: str, target: str, value: float, unit: str, *,
           rounds: Sequence[float] | None = None, samples: Sequence[float] | None = None,
           goal: Goal | None = None, better: str | None = None,
           interleaved: bool = False) -> None:
    """Keep one figure of ``case`` for ``target`` (pacslab, a variant, or an anchor).

    ``rounds``: the figure per round (interleaved rounds pair up across targets);
    ``samples``: raw latencies in ``unit`` for the distribution chart; ``goal``: the
    target this figure must meet (shown as met or not in the report);
    ``interleaved``: round *i* of every target ran in the same stretch of time, so
    the ratio per round is meaningful (``benchmarks/test_dicom_ingest.py``).
    """
    entry = _CASES.get(case)
    if entry is None:
        entry = _CASES[case] = _Case(unit, better or _better(unit), _current_source, {})
    entry.interleaved = entry.interleaved or interleaved
    entry.figures[target] = _Figure(
        float(value),
        [float(r) for r in rounds] if rounds else None,
        _thin(samples) if samples else None,
        goal,
    )


def set_source(path: str) -> None:
    """The benchmark file now running (stamped on the cases it records)."""
    global _current_source
    _current_source = path


def add_outcome(nodeid: str, outcome: str, reason: str) -> None:
    _OUTCOMES.append({"test": nodeid, "outcome": outcome, "reason": reason[:300]})


def figures_json() -> dict[str, Any]:
    """The session's figures, as ``./run bench`` reads them."""
    metrics = []
    for case, entry in _CASES.items():
        metrics.append({
            "case": case,
            "unit": entry.unit,
            "better": entry.better,
            "source": entry.source,
            "interleaved": entry.interleaved,
            "figures": {
                target: {
                    "value": f.value,
                    "rounds": f.rounds,
                    "samples": f.samples,
                    "goal": asdict(f.goal) if f.goal else None,
                }
                for target, f in entry.figures.items()
            },
        })
    return {"schema": 1, "quick": quick(), "metrics": metrics, "tests": list(_OUTCOMES)}


def write_figures() -> None:
    """Write :func:`figures_json` where ``$PACSLAB_BENCH_FIGURES`` says, if it is set."""
    if _FIGURES_PATH:
        Path(_FIGURES_PATH).write_text(json.dumps(figures_json(), indent=1))


def terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config
                     ) -> None:
    if not _CASES:
        return
    tr = terminalreporter
    tr.section("pacslab side by side")
    for case in sorted(_CASES):
        entry = _CASES[case]
        tr.write_line(f"{case}:")
        ours = entry.figures.get("pacslab")
        for target, fig in sorted(entry.figures.items()):
            ratio = ""
            anchor = not target.startswith("pacslab")  # variants are not anchors
            if ours and anchor and fig.value:
                ratio = (f"   pacslab/{target} = {ours.value / fig.value:.2f}x "
                         f"({entry.better} is better)")
            spread = ""
            if fig.rounds and len(fig.rounds) > 1:
                spread = f"  rounds {min(fig.rounds):.1f}-{max(fig.rounds):.1f}"
            tr.write_line(f"    {target:24s} {fig.value:10.1f} {entry.unit}{ratio}{spread}")
