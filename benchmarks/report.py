"""The benchmark report: rows beside their anchors, targets, and run-to-run comparison.

Pure functions over the ``pacslab`` section of ``results.json`` (written by
``benchmarks/support.py``, assembled by ``benchmarks/bench.py``); no I/O here.

A *row* is one pacslab figure beside one anchor measured in the same run: the
ratio pacslab/anchor is the figure to compare between runs, because this shared
machine's speed drifts by ±25 % from minute to minute and both sides of a ratio
drift together. Absolute figures are compared only between runs on the same machine.

The regression rule (:func:`judge`): each run's *spread* is half the range of its
per-round figures relative to their median (the ± the rounds themselves show). A
change is flagged only when it is larger than the two runs' spreads added, i.e. when
the two runs' bands of rounds no longer overlap.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "CEILINGS",
    "Change",
    "Row",
    "build_rows",
    "compare",
    "judge",
    "markdown_compare",
    "markdown_table",
    "same_machine",
    "spread",
]

Verdict = Literal["worse", "better", "within spread", "not judged"]

# Anchors that bound what is possible (no index, no fsync; no pipeline around the
# codec) rather than compete: a ratio below 1 against them is expected.
CEILINGS = frozenset({"storescp", "codec-only limit"})


@dataclass(frozen=True, slots=True)
class Row:
    """One pacslab figure beside one anchor (or alone, when the case has no anchor)."""

    area: str
    case: str
    variant: str  # "pacslab" or a variant such as "pacslab (response LRU hit)"
    unit: str
    better: str  # "higher" or "lower"
    value: float
    rounds: tuple[float, ...]
    anchor: str | None
    anchor_value: float | None
    anchor_rounds: tuple[float, ...]
    goal: str  # "" when no target applies to this row
    met: bool | None
    interleaved: bool = False  # round i of both sides ran in the same stretch of time

    @property
    def key(self) -> str:
        """What identifies this row across runs."""
        return f"{self.case} | {self.variant} | {self.anchor or '-'}"

    @property
    def ratio(self) -> float | None:
        if self.anchor_value is None or not self.anchor_value:
            return None
        return self.value / self.anchor_value

    @property
    def ratio_rounds(self) -> tuple[float, ...]:
        """Per-round ratios when both sides ran the same rounds, interleaved."""
        if (self.interleaved and len(self.rounds) > 1
                and len(self.rounds) == len(self.anchor_rounds)):
            return tuple(p / a for p, a in zip(self.rounds, self.anchor_rounds, strict=True)
                         if a)
        return ()


def _is_pacslab(target: str) -> bool:
    return target == "pacslab" or target.startswith(("pacslab ", "pacslab-"))


def _goal_text(goal: Mapping[str, Any], unit: str) -> str:
    if goal["on"] == "ratio":
        return f"{goal['op']} {goal['bound']:,g}× {goal['anchor']}"
    return f"{goal['op']} {goal['bound']:,g} {unit}"


def _spread_text(s: float | None) -> str:
    if s is None:
        return "—"
    # beyond ±300 % the rounds disagree so much that the exact figure says nothing more
    return f"±{s:.0%}" if s <= 3 else ">±300%"


def _meets(op: str, value: float, bound: float) -> bool:
    return {">=": value >= bound, "<=": value <= bound, "<": value < bound,
            ">": value > bound}[op]


def build_rows(metrics: Sequence[Mapping[str, Any]], area_of: Mapping[str, str]
               ) -> list[Row]:
    """Rows for every (pacslab variant, anchor) pair of every case, in area order.

    Within an area, cases keep the order they were measured in.

    ``area_of`` maps a benchmark file (``benchmarks/test_x.py``) to its area; the
    order of its values is the report's order.
    """
    order = {area: i for i, area in enumerate(dict.fromkeys(area_of.values()))}
    rows: list[Row] = []
    for m in metrics:
        figures: Mapping[str, Mapping[str, Any]] = m["figures"]
        area = area_of.get(m["source"], "other")
        anchors = [t for t in figures if not _is_pacslab(t)]
        for variant in (t for t in figures if _is_pacslab(t)):
            fig = figures[variant]
            goal = fig.get("goal")
            for i, anchor in enumerate(anchors or [None]):
                other = figures[anchor] if anchor is not None else None
                text, met = "", None
                if goal is not None:
                    if goal["on"] == "ratio" and goal["anchor"] == anchor and other:
                        text = _goal_text(goal, m["unit"])
                        met = bool(other["value"]) and _meets(
                            goal["op"], fig["value"] / other["value"], goal["bound"])
                    elif goal["on"] == "value" and i == 0:
                        text = _goal_text(goal, m["unit"])
                        met = _meets(goal["op"], fig["value"], goal["bound"])
                rows.append(Row(
                    area=area, case=m["case"], variant=variant, unit=m["unit"],
                    better=m["better"], value=float(fig["value"]),
                    rounds=tuple(fig.get("rounds") or ()),
                    anchor=anchor, anchor_value=float(other["value"]) if other else None,
                    anchor_rounds=tuple(other.get("rounds") or ()) if other else (),
                    goal=text, met=met, interleaved=bool(m.get("interleaved")),
                ))
    rows.sort(key=lambda r: order.get(r.area, len(order)))  # stable: run order in an area
    return rows


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def spread(rounds: Sequence[float]) -> float | None:
    """Half the range of the rounds relative to their median; None under two rounds."""
    if len(rounds) < 2:
        return None
    mid = statistics.median(rounds)
    if not mid:
        return None
    return (max(rounds) - min(rounds)) / 2 / abs(mid)


def _ratio_spread(row: Row) -> float | None:
    paired = spread(row.ratio_rounds)
    if paired is not None:
        return paired
    # not paired round by round: the spreads of both sides add up
    ours, theirs = spread(row.rounds), spread(row.anchor_rounds)
    if ours is None and theirs is None:
        return None
    return (ours or 0.0) + (theirs or 0.0)


def markdown_table(rows: Sequence[Row]) -> str:
    """The report's one table: metric, pacslab, anchor, ratio, target, met."""
    lines = [
        "| area | metric | pacslab | anchor | ratio | ± rounds | target | met |",
        "| --- | --- | ---: | --- | ---: | ---: | --- | --- |",
    ]
    for r in rows:
        metric = r.case if r.variant == "pacslab" else f"{r.case} — {r.variant}"
        ceiling = " (ceiling)" if r.anchor in CEILINGS else ""
        anchor = f"{r.anchor}{ceiling} {_fmt(r.anchor_value)}" if r.anchor else "—"
        ratio = f"{r.ratio:.2f}× ({r.better} is better)" if r.ratio is not None else "—"
        s = _ratio_spread(r) if r.anchor else spread(r.rounds)
        met = {None: "", True: "met", False: "**not met**"}[r.met]
        lines.append(
            f"| {r.area} | {metric} | {_fmt(r.value)} {r.unit} | {anchor} | {ratio} | "
            f"{_spread_text(s)} | {r.goal} | {met} |"
        )
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class Change:
    """How one figure moved between two runs."""

    key: str
    measure: str  # "ratio to <anchor>" or "absolute"
    previous: float | None
    current: float | None
    change: float | None  # current / previous - 1
    spread: float | None  # the threshold: both runs' spreads added
    verdict: Verdict
    why: str = ""


def judge(previous: float, previous_rounds: Sequence[float], current: float,
          current_rounds: Sequence[float], better: str, *,
          previous_spread: float | None = None, current_spread: float | None = None,
          ) -> tuple[float, float | None, Verdict]:
    """The regression rule: (relative change, threshold, verdict).

    The threshold is the two runs' spreads added (each half the range of its rounds
    over their median): a change beyond it means the runs' bands of rounds do not
    overlap. With a single round in both runs nothing is flagged ("not judged").
    """
    change = current / previous - 1 if previous else 0.0
    spreads = [s for s in (
        previous_spread if previous_spread is not None else spread(previous_rounds),
        current_spread if current_spread is not None else spread(current_rounds),
    ) if s is not None]
    if not spreads:
        return change, None, "not judged"
    # a run without rounds is assumed as noisy as the one with them
    threshold = sum(spreads) if len(spreads) == 2 else 2 * spreads[0]
    if abs(change) <= threshold:
        return change, threshold, "within spread"
    worse = change < 0 if better == "higher" else change > 0
    return change, threshold, "worse" if worse else "better"


def same_machine(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Same host, CPU model, core count and memory: absolute figures may be compared."""
    def ident(m: Mapping[str, Any]) -> tuple[Any, ...]:
        cpu = m.get("cpu") or {}
        return (m.get("node"), cpu.get("brand_raw") if isinstance(cpu, dict) else cpu,
                m.get("cores"), m.get("memory_gib"))

    return ident(a) == ident(b)


def compare(previous: Sequence[Row], current: Sequence[Row], *, same_host: bool
            ) -> list[Change]:
    """Every row of ``current`` against the same row of ``previous``.

    Ratios to an anchor are compared on any machine; absolute figures only when
    ``same_host`` (another machine's speed says nothing about the change).
    """
    before = {r.key: r for r in previous}
    out: list[Change] = []
    for row in current:
        old = before.get(row.key)
        if old is None:
            out.append(Change(row.key, "", None, None, None, None, "not judged",
                              "not in the previous run"))
            continue
        if row.ratio is not None and old.ratio is not None:
            change, threshold, verdict = judge(
                old.ratio, old.ratio_rounds, row.ratio, row.ratio_rounds, row.better,
                previous_spread=_ratio_spread(old), current_spread=_ratio_spread(row))
            out.append(Change(row.key, f"ratio to {row.anchor}", old.ratio, row.ratio,
                              change, threshold, verdict))
        elif same_host:
            change, threshold, verdict = judge(old.value, old.rounds, row.value, row.rounds,
                                               row.better)
            out.append(Change(row.key, f"absolute ({row.unit})", old.value, row.value,
                              change, threshold, verdict))
        else:
            out.append(Change(row.key, f"absolute ({row.unit})", old.value, row.value,
                              row.value / old.value - 1 if old.value else None, None,
                              "not judged", "no anchor and another machine"))
    return out


def markdown_compare(changes: Sequence[Change]) -> str:
    lines = [
        "| metric | compared | previous | now | change | threshold | verdict |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for c in changes:
        verdict = f"**{c.verdict}**" if c.verdict == "worse" else c.verdict
        if c.why:
            verdict += f" ({c.why})"
        change = f"{c.change:+.1%}" if c.change is not None else "—"
        threshold = _spread_text(c.spread)
        lines.append(f"| {c.key} | {c.measure} | {_fmt(c.previous)} | {_fmt(c.current)} | "
                     f"{change} | {threshold} | {verdict} |")
    return "\n".join(lines) + "\n"
