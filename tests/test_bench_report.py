"""``./run bench`` (issue 22): the report beside its anchors, and the regression rule.

The end-to-end test runs the real command, ``./run bench --quick worklist``: pacslab's
worklist SCP and DCMTK ``wlmscpfs`` measured in one session. ``PACSLAB_PYTHON`` makes
``./run`` use the interpreter running this suite instead of setting up ``.venv``
(the rest of the path, ``benchmarks/bench.py`` → pytest → report, is the real one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.areas import AREAS, files_for
from benchmarks.report import build_rows, compare, judge, markdown_table, spread
from tests.worklist.dcmtk import HAVE_DCMTK

ROOT = Path(__file__).resolve().parents[1]
AREA_OF = {"benchmarks/test_x.py": "ingest"}


def _metric(pacslab_rounds: list[float], anchor_rounds: list[float], *, unit: str = "inst/s",
            better: str = "higher", goal: dict[str, Any] | None = None) -> dict[str, Any]:
    """One case as ``results.json`` records it: pacslab beside orthanc, round by round."""
    def fig(rounds: list[float]) -> dict[str, Any]:
        return {"value": sorted(rounds)[len(rounds) // 2], "rounds": rounds, "samples": None,
                "goal": None}

    ours = fig(pacslab_rounds)
    ours["goal"] = goal
    return {"case": "C-STORE 1 association(s), inst/s", "unit": unit, "better": better,
            "source": "benchmarks/test_x.py", "interleaved": True,
            "figures": {"pacslab": ours, "orthanc": fig(anchor_rounds)}}


def _scaled(rounds: list[float], factor: float) -> list[float]:
    return [r * factor for r in rounds]


ANCHOR = [400.0, 400.0, 400.0]
TIGHT = [380.0, 400.0, 420.0]  # ±5 % (half the range over the median)
LOOSE = [320.0, 400.0, 480.0]  # ±20 %


def test_spread_is_half_the_range_over_the_median() -> None:
    assert spread(TIGHT) == pytest.approx(0.05)
    assert spread(LOOSE) == pytest.approx(0.20)
    assert spread([400.0]) is None


def test_30pc_drop_with_5pc_spread_is_flagged() -> None:
    change, threshold, verdict = judge(400, TIGHT, 280, _scaled(TIGHT, 0.7), "higher")
    assert change == pytest.approx(-0.30)
    assert threshold == pytest.approx(0.10)
    assert verdict == "worse"


def test_10pc_drop_with_20pc_spread_is_not_flagged() -> None:
    change, _, verdict = judge(400, LOOSE, 360, _scaled(LOOSE, 0.9), "higher")
    assert change == pytest.approx(-0.10)
    assert verdict == "within spread"


def test_rule_on_recorded_results_compares_ratios_to_the_anchor() -> None:
    # The machine is 40 % slower in the new run (the anchor too): the ratio did not move.
    before = build_rows([_metric(TIGHT, ANCHOR)], AREA_OF)
    slow = build_rows([_metric(_scaled(TIGHT, 0.6), _scaled(ANCHOR, 0.6))], AREA_OF)
    [c] = compare(before, slow, same_host=False)
    assert c.measure == "ratio to orthanc" and c.verdict == "within spread"
    # pacslab 30 % slower against an anchor that held, rounds ±5 %: flagged.
    worse = build_rows([_metric(_scaled(TIGHT, 0.7), ANCHOR)], AREA_OF)
    [c] = compare(before, worse, same_host=False)
    assert c.verdict == "worse" and c.change == pytest.approx(-0.30)
    # 10 % slower with rounds ±20 %: not flagged.
    loose = build_rows([_metric(LOOSE, ANCHOR)], AREA_OF)
    [c] = compare(loose, build_rows([_metric(_scaled(LOOSE, 0.9), ANCHOR)], AREA_OF),
                  same_host=False)
    assert c.verdict == "within spread"


def test_latency_up_is_worse_and_down_is_better() -> None:
    def ms(rounds: list[float]) -> list[Any]:
        return build_rows([_metric(rounds, [20.0] * 3, unit="ms", better="lower")], AREA_OF)

    before, slower, faster = ms([9.5, 10.0, 10.5]), ms([13.3, 14.0, 14.7]), ms([6.65, 7.0, 7.35])
    assert compare(before, slower, same_host=True)[0].verdict == "worse"
    assert compare(before, faster, same_host=True)[0].verdict == "better"


def test_absolute_figures_only_on_the_same_machine() -> None:
    def alone(rounds: list[float]) -> list[Any]:
        m = _metric(rounds, ANCHOR)
        del m["figures"]["orthanc"]
        return build_rows([m], AREA_OF)

    before, after = alone(TIGHT), alone(_scaled(TIGHT, 0.7))
    assert compare(before, after, same_host=True)[0].verdict == "worse"
    other = compare(before, after, same_host=False)[0]
    assert other.verdict == "not judged" and "another machine" in other.why


def test_single_round_is_not_judged() -> None:
    assert judge(400, [400], 200, [200], "higher")[2] == "not judged"


def test_targets_met_or_not() -> None:
    ratio_goal = {"op": ">=", "bound": 1.0, "on": "ratio", "anchor": "orthanc"}
    [met] = build_rows([_metric([500.0, 500.0], [400.0, 400.0], goal=ratio_goal)], AREA_OF)
    [missed] = build_rows([_metric([300.0, 300.0], [400.0, 400.0], goal=ratio_goal)], AREA_OF)
    assert met.met is True and missed.met is False
    assert met.goal == ">= 1× orthanc"
    table = markdown_table([met, missed])
    assert "| met |" in table and "**not met**" in table


def test_area_without_benchmark_is_named_not_failed(tmp_path: Path) -> None:
    assert "archive-scale" in AREAS and "query-retrieve" in AREAS
    # files that are not there yet are ignored: the area is empty, not an error
    assert files_for("archive-scale", root=tmp_path) == []
    with pytest.raises(KeyError):
        files_for("no-such-area")


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    # Nor pytest-xdist's worker name: pytest-benchmark reads it and then records nothing.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PACSLAB_", "PYTEST_XDIST_"))}
    env["PACSLAB_PYTHON"] = sys.executable
    return subprocess.run([str(ROOT / "run"), "bench", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not HAVE_DCMTK:
        pytest.skip("DCMTK not installed (wlmscpfs is the worklist anchor)")
    out = tmp_path_factory.mktemp("bench")
    done = _run("--quick", "worklist", "--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert str(out / "report.md") in done.stdout  # the path is printed at the end
    return out


@pytest.mark.network
def test_quick_run_writes_results_beside_anchors(quick_run: Path) -> None:
    results = json.loads((quick_run / "results.json").read_text())
    machine = results["machine_info"]
    for key in ("cores", "memory_gib", "kernel", "disk", "python", "packages", "anchors"):
        assert machine[key], key
    assert machine["anchors"]["dcmtk wlmscpfs"]
    # pytest-benchmark's own JSON, with every round's timing
    assert results["benchmarks"] and all(b["stats"]["data"] for b in results["benchmarks"])
    section = results["pacslab"]
    assert section["quick"] is True
    assert section["areas"]["worklist"]["status"] == "run"
    metrics = [m for m in section["metrics"] if m["source"].endswith("test_worklist_find.py")]
    assert metrics
    for m in metrics:
        ours, anchor = m["figures"]["pacslab"], m["figures"]["wlmscpfs"]
        assert ours["value"] > 0 and anchor["value"] > 0, m["case"]
    qps = next(m for m in metrics if m["case"].endswith("qps"))
    assert len(qps["figures"]["pacslab"]["rounds"]) > 1  # per-round figures

    report = (quick_run / "report.md").read_text()
    assert "| area | metric | pacslab | anchor | ratio |" in report
    rows = [line for line in report.splitlines() if line.startswith("| worklist |")]
    assert len(rows) >= len(metrics)
    for line in rows:  # each pacslab figure has the anchor's figure and the ratio beside it
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[3].startswith("wlmscpfs ") and cells[3].split()[1][0].isdigit(), line
        assert cells[4].endswith("is better)"), line

    charts = sorted(quick_run.glob("*.png"))
    names = {p.name for p in charts}
    assert "ratios.png" in names
    assert any(n.startswith("rounds-") for n in names)  # throughput per server per round
    assert any(n.startswith("latency-") for n in names)  # latency distributions
    for png in charts:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png.name})" in report


@pytest.mark.network
def test_compare_flags_a_drop_beyond_the_spread(quick_run: Path, tmp_path: Path) -> None:
    # The recorded run with its queries/s rounds made ±5 % (a quiet machine), and a
    # previous run in which pacslab answered twice as many (the anchor the same).
    current = json.loads((quick_run / "results.json").read_text())
    for m in current["pacslab"]["metrics"]:
        if m["case"].endswith("qps"):
            for fig in m["figures"].values():
                fig["rounds"] = [fig["value"] * f for f in (0.95, 1.0, 1.05)]
    previous = json.loads(json.dumps(current))
    for m in previous["pacslab"]["metrics"]:
        if m["case"].endswith("qps"):
            for target, fig in m["figures"].items():
                if target.startswith("pacslab"):
                    fig["value"] *= 2
                    fig["rounds"] = [r * 2 for r in fig["rounds"]]
    (tmp_path / "current.json").write_text(json.dumps(current))
    (tmp_path / "previous.json").write_text(json.dumps(previous))
    done = _run("--from", str(tmp_path / "current.json"), "--compare",
                str(tmp_path / "previous.json"), "--out", str(tmp_path), timeout=120)
    assert done.returncode == 3, done.stdout[-3000:] + done.stderr[-3000:]
    report = (tmp_path / "report.md").read_text()
    assert "## Compared with" in report
    worse = [line for line in report.splitlines() if "**worse**" in line]
    assert worse and all("qps" in line and "ratio to wlmscpfs" in line for line in worse)


def test_charts_leave_out_a_zero_figure(tmp_path: Path) -> None:
    """A process that used no CPU gives a 0 ratio; the chart (log scale, and 1/ratio
    when lower is better) skips it instead of ending the report."""
    pytest.importorskip("matplotlib")
    from benchmarks.charts import write_charts

    zero = _metric([0.0, 0.0], [5.0, 5.0], unit="ms", better="lower")
    zero["case"] = "C-STORE 1 association(s), CPU ms/instance, main process"
    rows = build_rows([zero, _metric([500.0, 500.0], [400.0, 400.0])], AREA_OF)
    assert [r.ratio for r in rows] == [0.0, 1.25]
    written = write_charts([], rows, tmp_path)
    assert (tmp_path / "ratios.png").is_file() and written
