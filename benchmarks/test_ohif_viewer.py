"""OHIF Viewer v3 on pacslab vs. the same OHIF build on Orthanc (issue 20).

The same study (the demo CT of ``pacslab demo``: 120 slices of 512 × 512 when
measuring, 10 of 128 × 128 in the smoke run), the same OHIF dist and app-config, the
same headless chromium (SwiftShader WebGL): pacslab serves OHIF itself under /ohif
with authentication on; the anchor is Debian Orthanc with its DICOMweb plugin behind a
small local server that serves the same OHIF build and proxies ``/dicom-web`` to it
(same origin; the proxy hop is counted against Orthanc, a few ms per request on
loopback). Each round opens the deep link in a fresh browser context (cold HTTP
cache) and times, from ``goto``: the first rendered image (the viewport canvas is not
blank) and all slices loaded (every ``/frames`` request completed). Target: pacslab
≤ Orthanc on both.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.support import record
from core.settings import Settings
from tests.ohif import harness as h

pytestmark = pytest.mark.network


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key in [k for k in os.environ if k.startswith("PACSLAB_")]:
        monkeypatch.delenv(key)
    return Settings(data_dir=tmp_path / "data", storage={"fsync": False})


@pytest.fixture
def study(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[h.Study]:
    measuring = not request.config.getoption("benchmark_disable", default=True)
    slices, size = (120, 512) if measuring else (10, 128)
    yield h.demo_ct(tmp_path / "ct", slices=slices, size=size)


def _timings(browser: Any, server: h.Server, study: h.Study, rounds: int
             ) -> list[tuple[float, float]]:
    out = []
    for _ in range(rounds):
        opened = h.open_viewer(browser, server, study, timeout_s=180)
        assert opened.all_slices_s is not None, "not every slice was loaded"
        frame_failures = [f for f in opened.failed if "/frames/" in f or "/metadata" in f]
        assert frame_failures == [], frame_failures
        out.append((opened.first_image_s, opened.all_slices_s))
        opened.page.context.close()
    return out


def test_ohif_time_to_image_pacslab_vs_orthanc(
    benchmark: Any, settings: Settings, study: h.Study, measuring: bool
) -> None:
    api = h.need_ohif(settings.ohif.dist_dir)
    h.need_orthanc()
    rounds = 3 if measuring else 1
    pw, browser = h.launch(api)
    try:
        with h.pacslab_server(settings, study) as ours:
            h.open_viewer(browser, ours, study, wait_all=False).page.context.close()  # warm-up
            pacslab = _timings(browser, ours, study, rounds)
        with h.orthanc_server(study, settings.ohif.dist_dir) as anchor:
            h.open_viewer(browser, anchor, study, wait_all=False).page.context.close()
            orthanc = _timings(browser, anchor, study, rounds)
    finally:
        browser.close()
        pw.stop()

    first = statistics.median(t[0] for t in pacslab)
    every = statistics.median(t[1] for t in pacslab)
    a_first = statistics.median(t[0] for t in orthanc)
    a_every = statistics.median(t[1] for t in orthanc)
    benchmark.extra_info.update({
        "slices": study.slices, "rounds": rounds,
        "pacslab": {"first_image_s": round(first, 3), "all_slices_s": round(every, 3)},
        "anchor": {"name": "Orthanc + orthanc-dicomweb (Debian)",
                   "first_image_s": round(a_first, 3), "all_slices_s": round(a_every, 3)},
        "ratio": {"first_image": round(first / a_first, 3),
                  "all_slices": round(every / a_every, 3)},
        "target": "pacslab <= Orthanc (ratio <= 1.0) for first image and all slices",
    })
    record("OHIF deep link: first image", "pacslab", first * 1000, "ms")
    record("OHIF deep link: first image", "orthanc", a_first * 1000, "ms")
    record("OHIF deep link: all slices", "pacslab", every * 1000, "ms")
    record("OHIF deep link: all slices", "orthanc", a_every * 1000, "ms")
    # The figures are the result; pytest-benchmark needs one timed call to keep them.
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
