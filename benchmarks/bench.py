"""``./run bench``: run the benchmarks of some areas, write results.json, report.md, charts.

    ./run bench [--quick] [--compare PREVIOUS.json] [--out DIR] [AREA ...] [-- PYTEST ARGS]
    ./run bench --from bench-results/<run>/results.json --compare PREVIOUS.json
    ./run bench --list

One pytest session runs every selected benchmark file with ``--benchmark-enable``; each
file runs pacslab and its anchors (Orthanc, DCMTK ``storescp``/``wlmscpfs``, the
codec-only limit, Orthanc + DICOMweb) in the same session, interleaved where the file
does so. ``--quick`` (``PACSLAB_BENCH_QUICK=1``) shrinks sizes and rounds to seconds.

The run's directory (default ``bench-results/<UTC time>/``, printed at the end) holds:

* ``results.json``: pytest-benchmark's JSON (per-round timings, commit) with the machine
  (cores, memory, kernel, disk, Python, packages, anchor versions) in ``machine_info``
  and pacslab's figures, per round, in ``pacslab``;
* ``report.md``: one table (metric, pacslab, anchor, ratio, spread, target, met), the
  charts, and with ``--compare`` the change of every figure, flagged only beyond the
  spread of the rounds (``benchmarks/report.py``);
* ``*.png``: the charts (``benchmarks/charts.py``).

Exit status: 0; 1 when a benchmark failed (some assert their target); 2 on bad
arguments; 3 when ``--compare`` flagged a figure as worse.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.areas import AREAS, area_of, files_for
from benchmarks.machine import machine_info
from benchmarks.report import (
    build_rows,
    compare,
    markdown_compare,
    markdown_table,
    same_machine,
)
from benchmarks.support import FIGURES_ENV, QUICK_ENV

ROOT = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="./run bench", description="Benchmark pacslab beside its anchors; write a report.",
        epilog="areas: " + ", ".join(AREAS))
    p.add_argument("areas", nargs="*", metavar="AREA", help="areas to run (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="smoke sizes and a few rounds: seconds, not representative figures")
    p.add_argument("--compare", type=Path, metavar="PREVIOUS.json",
                   help="a previous results.json: the change of every figure")
    p.add_argument("--out", type=Path, help="the run's directory (default bench-results/<time>)")
    p.add_argument("--from", dest="from_json", type=Path, metavar="RESULTS.json",
                   help="do not run: rebuild the report (and charts) of an earlier run")
    p.add_argument("--list", action="store_true", help="list the areas and their files")
    return p


def _run_pytest(files: Sequence[Path], out: Path, quick: bool, extra: Sequence[str]
                ) -> tuple[int, dict[str, Any], dict[str, Any] | None]:
    """One pytest session over ``files``; its exit code, figures and pytest-benchmark JSON."""
    figures, bj = out / ".figures.json", out / ".pytest-benchmark.json"
    cmd = [sys.executable, "-m", "pytest", *map(str, files), "--benchmark-enable",
           f"--benchmark-json={bj}", "-p", "no:cacheprovider", "-q", "-rsf",
           "--benchmark-columns=min,median,max,rounds", *extra]
    if quick:  # auto-calibrated benchmarks (benchmark(fn)): a few rounds, not a second each
        cmd += ["--benchmark-min-rounds=3", "--benchmark-max-time=0.2"]
    env = {**os.environ, FIGURES_ENV: str(figures), QUICK_ENV: "1" if quick else "0"}
    print("+", shlex.join(cmd), flush=True)
    code = subprocess.run(cmd, cwd=ROOT, env=env, check=False).returncode
    data = json.loads(figures.read_text()) if figures.exists() else {"metrics": [], "tests": []}
    bench_json = json.loads(bj.read_text()) if bj.exists() else None
    for path in (figures, bj):
        path.unlink(missing_ok=True)
    return code, data, bench_json


def _machine_lines(m: Mapping[str, Any]) -> list[str]:
    disk = m.get("disk", {})
    kind = {True: "rotational", False: "SSD"}.get(disk.get("rotational"), "")
    cpu = m.get("cpu", {})
    brand = cpu.get("brand_raw", "") if isinstance(cpu, dict) else ""
    lines = [
        "| host | CPU | cores | memory | kernel | disk | Python | load average at start |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {m.get('node', '')} | {brand} | {m.get('cores')} ({m.get('cores_usable')} usable) "
        f"| {m.get('memory_gib')} GiB | {m.get('kernel', '')} "
        f"| {disk.get('fstype', '')} on {disk.get('device', '')} {kind}, "
        f"{disk.get('free_gib')} GiB free | {m.get('python', '')} "
        f"| {' '.join(map(str, m.get('load_average', [])))} |",
        "",
        "Packages: " + ", ".join(f"{k} {v}" for k, v in m.get("packages", {}).items() if v)
        + ".",
        "",
        "Anchors: " + ", ".join(f"{k}: {v or 'not installed'}"
                                for k, v in m.get("anchors", {}).items()) + ".",
    ]
    return lines


def render_report(results: Mapping[str, Any], out: Path,
                  previous: Mapping[str, Any] | None = None,
                  previous_name: str = "") -> tuple[str, int]:
    """Write report.md and the charts of ``results`` into ``out``; (text, regressions)."""
    section = results["pacslab"]
    areas = area_of()
    rows = build_rows(section["metrics"], areas)
    lines = [
        "# pacslab benchmark report",
        "",
        f"Run {section.get('started', '')} · `{section.get('command', '')}` · "
        + ("**quick run** (smoke sizes, a few rounds: checks the machinery, the figures "
           "are not capacity)" if section.get("quick") else "full sizes")
        + f" · commit {results.get('commit_info', {}).get('id', '?')[:12]}"
        + (" (uncommitted changes)" if results.get("commit_info", {}).get("dirty") else ""),
        "",
        "## Machine",
        "",
        *_machine_lines(results.get("machine_info", {})),
        "",
        "## Results",
        "",
        "pacslab and each anchor were measured in the same run. *ratio* is pacslab's figure "
        "over the anchor's; *± rounds* is half the range of the per-round ratios (of the "
        "figure itself when there is no anchor) relative to their median: how much the "
        "rounds themselves disagree on this machine.",
        "",
        markdown_table(rows) if rows else "No figures were recorded.\n",
    ]
    status = section.get("areas", {})
    empty = [a for a, s in status.items() if s.get("status") == "no benchmark yet"]
    if empty:
        lines += ["## Areas without a benchmark yet", ""]
        lines += [f"- **{a}** ({status[a]['description']}): no benchmark in this area yet"
                  for a in empty]
        lines.append("")
    not_passed = [t for t in section.get("tests", []) if t["outcome"] != "passed"]
    if not_passed:
        lines += ["## Benchmarks skipped or failed", "", "| benchmark | outcome | why |",
                  "| --- | --- | --- |"]
        lines += [f"| `{t['test']}` | {t['outcome']} | "
                  f"{t['reason'].replace('|', '/').replace(chr(10), ' ')} |" for t in not_passed]
        lines.append("")
    regressions = 0
    if previous is not None:
        before = build_rows(previous["pacslab"]["metrics"], areas)
        same = same_machine(previous.get("machine_info", {}), results.get("machine_info", {}))
        changes = compare(before, rows, same_host=same)
        regressions = sum(c.verdict == "worse" for c in changes)
        lines += [
            f"## Compared with {previous_name}",
            "",
            f"Previous run {previous['pacslab'].get('started', '?')}, "
            + ("same machine: absolute figures compared where there is no anchor."
               if same else "another machine: only ratios to an anchor are compared."),
            "A change is flagged only when it exceeds the threshold: the two runs' "
            "spreads (± rounds) added, i.e. their bands of rounds no longer overlap. "
            f"**{regressions} figure(s) worse.**",
            "",
            markdown_compare(changes),
        ]
    try:
        from benchmarks.charts import write_charts

        charts = write_charts(section["metrics"], rows, out)
    except ImportError as exc:  # matplotlib is in the test extra that ./run bench installs
        charts = []
        lines += [f"No charts: {exc} (`pip install -e '.[test]'` installs matplotlib).", ""]
    if charts:
        lines += ["## Charts", ""]
        for title, name in charts:
            lines += [f"### {title}", "", f"![{title}]({name})", ""]
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    return text, regressions


def _new_run_dir() -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = ROOT / "bench-results" / stamp
    n = 1
    while out.exists():
        n += 1
        out = ROOT / "bench-results" / f"{stamp}-{n}"
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in args_list:
        cut = args_list.index("--")
        args_list, extra = args_list[:cut], args_list[cut + 1:]
    parser = build_parser()
    args = parser.parse_args(args_list)
    if args.list:
        for area, (description, _names) in AREAS.items():
            present = [p.name for p in files_for(area)]
            print(f"{area:15s} {description}\n{'':15s} "
                  f"{', '.join(present) if present else 'no benchmark in this area yet'}")
        return 0
    unknown = [a for a in args.areas if a not in AREAS]
    if unknown:
        parser.error(f"unknown area(s) {', '.join(unknown)}; known: {', '.join(AREAS)}")
    previous = None
    if args.compare is not None:
        previous = json.loads(args.compare.read_text())
        if "pacslab" not in previous:
            parser.error(f"{args.compare} is not a ./run bench results.json")
    out = args.out or (args.from_json.parent if args.from_json else _new_run_dir())
    out.mkdir(parents=True, exist_ok=True)

    code = 0
    if args.from_json is not None:
        results = json.loads(args.from_json.read_text())
    else:
        areas = args.areas or list(AREAS)
        files = list(dict.fromkeys(f for a in areas for f in files_for(a)))
        started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        machine = machine_info(Path(tempfile.gettempdir()))
        began = time.monotonic()
        data: dict[str, Any] = {"metrics": [], "tests": []}
        bench_json = None
        if files:
            code, data, bench_json = _run_pytest(files, out, args.quick, extra)
        results = bench_json or {"machine_info": {}, "commit_info": {}, "benchmarks": []}
        results["machine_info"] = {**results.get("machine_info", {}), **machine}
        results["pacslab"] = {
            **data,
            "quick": args.quick,
            "started": started,
            "seconds": round(time.monotonic() - began, 1),
            "command": shlex.join(["./run", "bench", *(sys.argv[1:] if argv is None
                                                        else argv)]),
            "pytest_exit": code,
            "areas": {a: {"description": AREAS[a][0],
                          "files": [p.name for p in files_for(a)],
                          "status": "run" if files_for(a) else "no benchmark yet"}
                      for a in areas},
        }
        (out / "results.json").write_text(json.dumps(results, indent=1))
    _, regressions = render_report(results, out, previous,
                                   str(args.compare) if args.compare else "")
    for area, s in results["pacslab"].get("areas", {}).items():
        if s["status"] == "no benchmark yet":
            print(f"{area}: no benchmark in this area yet")
    print(f"\nbenchmark report: {out / 'report.md'}\nresults: {out / 'results.json'}")
    if regressions:
        print(f"{regressions} figure(s) worse than in {args.compare}")
    if code not in (0, 5):  # 5: nothing collected (every file skipped at import)
        return 1
    return 3 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
