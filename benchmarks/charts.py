"""The report's charts (PNG, matplotlib with the Agg backend: no display needed).

* ``ratios.png``: every pacslab/anchor ratio of the run, 1 marked;
* ``rounds-<case>.png``: throughput per server per round (interleaved rounds show
  whether one server had a slow minute or all of them did);
* ``latency-<case>.png``: each server's latency distribution (box: quartiles,
  whiskers: 1st and 99th percentiles).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.report import CEILINGS, Row

__all__ = ["write_charts"]


def _without_statistic(case: str) -> str:
    """"MWL C-FIND 200 items, p50_ms" -> "MWL C-FIND 200 items": the chart shows them all."""
    return re.sub(r",?\s*(p\d+|median)([ _]ms)?$", "", case)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:80]


def write_charts(metrics: Sequence[Mapping[str, Any]], rows: Sequence[Row], out: Path
                 ) -> list[tuple[str, str]]:
    """Write the charts into ``out``; return (title, file name) pairs, in report order."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers and CI
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    written: list[tuple[str, str]] = []
    # A zero on either side (e.g. 0.0 ms of CPU in a process that did nothing) has no
    # place on a log scale, and 1/0 ended the whole report (seen on `./run bench ingest`).
    ratios = [r for r in rows if r.ratio is not None and r.ratio > 0]
    if ratios:
        fig, ax = plt.subplots(figsize=(11, 0.35 * len(ratios) + 1.5))
        labels = [f"{r.case} — {r.variant} / {r.anchor}" for r in ratios]
        # drawn so that right of 1 is always pacslab ahead, whichever way is better
        values = [v if r.better == "higher" else 1 / v
                  for r in ratios if (v := r.ratio) is not None]
        ax.barh(range(len(ratios)), [v - 1 for v in values], left=1,
                color=["tab:gray" if r.anchor in CEILINGS else
                       "tab:green" if v >= 1 else "tab:red"
                       for r, v in zip(ratios, values, strict=True)])
        ax.axvline(1.0, color="black", linewidth=1)
        ax.set_yticks(range(len(ratios)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("× ahead of the anchor (log scale; right of 1: pacslab ahead)")
        ax.set_title("pacslab against its anchors, same run (grey: a ceiling, not a peer)")
        fig.tight_layout()
        fig.savefig(out / "ratios.png", dpi=100)
        plt.close(fig)
        written.append(("pacslab against its anchors", "ratios.png"))
    for m in metrics:
        figures: Mapping[str, Mapping[str, Any]] = m["figures"]
        with_rounds = {t: f["rounds"] for t, f in figures.items()
                       if f.get("rounds") and len(f["rounds"]) > 1}
        if m["better"] == "higher" and with_rounds:
            fig, ax = plt.subplots(figsize=(7, 3.5))
            for target, values in with_rounds.items():
                ax.plot(range(1, len(values) + 1), values, marker="o", label=target)
            ax.set_xlabel("round")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel(m["unit"])
            ax.set_ylim(bottom=0)
            ax.set_title(m["case"], fontsize=9)
            ax.legend(fontsize=7)
            fig.tight_layout()
            name = f"rounds-{_slug(m['case'])}.png"
            fig.savefig(out / name, dpi=100)
            plt.close(fig)
            written.append((f"{m['case']}: per server, per round", name))
        with_samples = {t: f["samples"] for t, f in figures.items() if f.get("samples")}
        if with_samples:
            fig, ax = plt.subplots(figsize=(7, 0.6 * len(with_samples) + 1.5))
            ax.boxplot(list(with_samples.values()), vert=False, whis=(1, 99),
                       showfliers=False, tick_labels=list(with_samples))
            ax.set_xscale("log")
            ax.set_xlabel(f"{m['unit']} (log scale; whiskers: p1 and p99)")
            base = _without_statistic(m["case"])
            ax.set_title(f"{base}: latency distribution", fontsize=9)
            fig.tight_layout()
            name = f"latency-{_slug(base)}.png"
            fig.savefig(out / name, dpi=100)
            plt.close(fig)
            written.append((f"{base}: latency distribution per server", name))
    return written
