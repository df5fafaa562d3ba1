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
def study(measuring: bool, tmp_path: Path) -> Iterator[h.Study]:
    slices, size = (120, 512) if measuring else (10, 128)
    yield h.demo_ct(tmp_path / "ct", slices=slices, size=size)


def _round(browser: Any, server: h.Server, study: h.Study) -> tuple[float, float]:
    opened = h.open_viewer(browser, server, study, timeout_s=180)
    assert opened.all_slices_s is not None, "not every slice was loaded"
    failures = [f for f in opened.failed if "/frames/" in f or "/metadata" in f]
    assert failures == [], failures
    opened.page.context.close()
    return opened.first_image_s, opened.all_slices_s


def test_ohif_time_to_image_pacslab_vs_orthanc(
    benchmark: Any, settings: Settings, study: h.Study, measuring: bool
) -> None:
    api = h.need_ohif(settings.ohif.dist_dir)
    h.need_orthanc()
    rounds = 5 if measuring else 1
    pacslab: list[tuple[float, float]] = []
    orthanc: list[tuple[float, float]] = []
    pw, browser = h.launch(api)
    try:
        with (h.pacslab_server(settings, study) as ours,
              h.orthanc_server(study, settings.ohif.dist_dir) as anchor):
            for server in (ours, anchor):  # warm-up: first start of each side
                h.open_viewer(browser, server, study, wait_all=False).page.context.close()
            # Interleaved, so the shared machine's load falls on both sides alike.
            for _ in range(rounds):
                pacslab.append(_round(browser, ours, study))
                orthanc.append(_round(browser, anchor, study))
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
        "rounds_s": {"pacslab": [[round(a, 3), round(b, 3)] for a, b in pacslab],
                     "orthanc": [[round(a, 3), round(b, 3)] for a, b in orthanc]},
    })
    record("OHIF deep link: first image", "pacslab", first * 1000, "ms")
    record("OHIF deep link: first image", "orthanc", a_first * 1000, "ms")
    record("OHIF deep link: all slices", "pacslab", every * 1000, "ms")
    record("OHIF deep link: all slices", "orthanc", a_every * 1000, "ms")
    # The figures are the result; pytest-benchmark needs one timed call to keep them.
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
