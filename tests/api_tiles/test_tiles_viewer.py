"""The /viewer page: its JSON endpoints, and a real browser session (issue 6 §4).

The page is served with a strict CSP (no eval), so every ``wait_for_function`` is
given a function (``() => …``): Playwright evaluates a bare expression with eval.

The browser test runs uvicorn in a thread on a free loopback port over a data dir
holding a converted synthetic CT, and drives Debian's headless Chromium with
Playwright: open /viewer, open the study and the series, zoom, switch the window
preset, switch the plane, move the slice slider. Tiles must load with no console
errors and no failed request, and the screenshot must show the phantom.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from core.settings import Settings
from tests.support import serving

from .tiles_data import COLUMNS, ROWS, SLICES, Converted

CHROMIUM = "/usr/bin/chromium"


def test_viewer_page_and_assets(client: TestClient) -> None:
    page = client.get("/viewer")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/static/vendor/openseadragon/openseadragon.min.js" in page.text
    assert "cdn" not in page.text.lower()
    osd = client.get("/static/vendor/openseadragon/openseadragon.min.js")
    assert osd.status_code == 200 and b"OpenSeadragon" in osd.content[:2000]
    assert client.get("/static/vendor/openseadragon/LICENSE.txt").status_code == 200
    assert client.get("/static/viewer/viewer.js").status_code == 200


def test_viewer_json(client: TestClient, converted: Converted) -> None:
    studies = client.get("/viewer/api/studies").json()
    (study,) = [s for s in studies if s["study_instance_uid"] == converted.study_uid]
    assert study["modalities"] == ["CT"] and study["series"] == 1
    (series,) = client.get(f"/viewer/api/studies/{converted.study_uid}/series").json()
    assert series["version"] == converted.version and series["instances"] == SLICES
    (stack,) = series["stacks"]
    assert stack["id"] == f"{converted.series_uid}@{converted.version}:0"
    assert stack["planes"]["axial"] == {"width": COLUMNS, "height": ROWS, "depth": SLICES,
                                        "pixel_mm": 0.7}
    assert stack["planes"]["coronal"]["depth"] == ROWS
    assert {w["window"] for w in stack["windows"]} >= {"40,400", "lung", "bone", "brain"}
    thumb = client.get(stack["thumbnail"])
    assert thumb.status_code == 200
    assert max(Image.open(io.BytesIO(thumb.content)).size) == 128
    missing = client.get("/viewer/api/studies/1.2.3/series")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"


# ------------------------------------------------------------------ the browser


@pytest.fixture
def secured(converted: Converted) -> tuple[Settings, str]:
    """The converted data behind real authentication, and a token a clinician would hold."""
    from api.keys import ensure_private_key, issue_token

    auth = converted.settings.auth.model_copy(update={"enabled": True})
    settings = converted.settings.model_copy(update={"auth": auth})
    assert auth.local_key is not None
    ensure_private_key(auth.local_key)
    return settings, issue_token(auth, subject="dr-viewer", scopes=["imaging.read"], ttl_s=600)


@pytest.fixture
def server(secured: tuple[Settings, str]) -> Iterator[str]:
    from api.app import create_app

    with serving(create_app(secured[0]), lifespan="on") as base:
        yield base


def _full_resolution(url: str) -> bool:
    """An IIIF tile URL whose region is returned at scale factor 1 (pyramid level 0)."""
    parts = url.split("?")[0].split("/")
    region, size = parts[-4], parts[-3]
    if region.count(",") != 3 or size.count(",") != 1:
        return False
    return region.split(",")[2:] == size.split(",")


def _wait_loaded(page: Any, min_tiles: int) -> None:
    page.wait_for_function(
        f"() => window.pacslab && window.pacslab.isLoaded() "
        f"&& window.pacslab.state.tilesLoaded >= {min_tiles}", timeout=20000)


def _osd_pixels(page: Any, path: Path) -> np.ndarray:
    page.locator("#osd").screenshot(path=str(path))
    # below OpenSeadragon's zoom/home buttons in the top-left corner
    return np.asarray(Image.open(path).convert("L")).astype(np.int32)[40:]


@pytest.mark.network
def test_viewer_in_headless_chromium(server: str, converted: Converted, tmp_path: Path,
                                     secured: tuple[Settings, str]) -> None:
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian chromium is not installed (/usr/bin/chromium); "
                    "./run test installs it")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the playwright Python package is not installed")
    console: list[str] = []
    failed: list[str] = []
    tiles: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"])
        try:
            # A small window first, so the whole slice shows below full resolution and
            # zooming in has to fetch the finer level.
            page = browser.new_page(viewport={"width": 1000, "height": 330})
            page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: console.append(str(e)))
            page.on("requestfailed", lambda r: failed.append(r.url))
            page.on("response", lambda r: failed.append(f"{r.status} {r.url}")
                    if r.status >= 400 else None)
            page.on("request", lambda r: tiles.append(r.url) if "/iiif/" in r.url else None)

            page.goto(f"{server}/viewer#token={secured[1]}")
            page.locator(f"#studies button[data-uid='{converted.study_uid}']").click()
            thumb = page.locator(f".thumb[data-series='{converted.series_uid}']")
            thumb.locator("img").wait_for()
            page.wait_for_function(
                "() => [...document.querySelectorAll('.thumb img')]"
                ".every(i => i.naturalWidth > 0)")
            thumb.click()
            _wait_loaded(page, 1)
            assert any(":axial:12/" in u for u in tiles), tiles
            assert not any(_full_resolution(u) for u in tiles), "level 0 before zooming"

            # zoom in 4x around the centre: level-0 tiles (256 px regions at 256 px)
            before = len(tiles)
            page.evaluate("() => { const v = window.pacslab.viewer.viewport; "
                          "v.zoomBy(4); v.applyConstraints(true); }")
            page.wait_for_function(f"() => window.pacslab.state.tilesLoaded > {before}",
                                   timeout=20000)
            _wait_loaded(page, 2)
            zoomed_urls = tiles[before:]
            assert any(_full_resolution(u) for u in zoomed_urls), zoomed_urls
            zoomed = _osd_pixels(page, tmp_path / "2-axial-zoomed.png")

            page.set_viewport_size({"width": 1200, "height": 800})
            # OpenSeadragon notices the new container size on its next frames.
            page.wait_for_function(
                "() => Math.round(window.pacslab.viewer.viewport.getContainerSize().y) > 600")
            page.evaluate("() => window.pacslab.viewer.viewport.goHome(true)")
            page.wait_for_timeout(300)
            _wait_loaded(page, 2)
            first = _osd_pixels(page, tmp_path / "1-axial.png")

            # window preset: lung
            before = len(tiles)
            page.select_option("#window", "lung")
            page.wait_for_function(
                "() => window.pacslab.viewer.world.getItemCount() === 1"
                " && window.pacslab.isLoaded()"
                " && window.pacslab.viewer.world.getItemAt(0).source.id.endsWith(':lung')",
                timeout=20000)
            assert any(":lung/" in u for u in tiles[before:])
            lung = _osd_pixels(page, tmp_path / "3-axial-lung.png")

            # plane: coronal, then a few slices further
            page.locator("#planes button[data-plane='coronal']").click()
            page.wait_for_function(
                "() => window.pacslab.state.plane === 'coronal' && window.pacslab.isLoaded()",
                timeout=20000)
            assert any(":coronal:300:lung/" in u for u in tiles)
            page.eval_on_selector("#slice", "s => { s.value = '320'; "
                                  "s.dispatchEvent(new Event('input')); }")
            page.wait_for_function(
                "() => window.pacslab.viewer.world.getItemCount() === 1"
                " && window.pacslab.isLoaded()"
                " && window.pacslab.viewer.world.getItemAt(0).source.id.includes(':320:')",
                timeout=20000)
            coronal = _osd_pixels(page, tmp_path / "4-coronal-lung.png")
            status = page.locator("#status").inner_text()
        finally:
            browser.close()

    assert console == [], console
    assert failed == [], failed
    assert "coronal" in status and "321/600" in status
    for name, img in (("axial", first), ("zoomed", zoomed), ("lung", lung),
                      ("coronal", coronal)):
        assert img.std() > 20, f"{name}: blank screenshot"
        lit = (img > 40).mean()
        assert 0.03 < lit < 0.97, f"{name}: {lit:.2%} lit"
    # abdomen window: the phantom's soft tissue is mid-grey, the air around it black
    assert (np.abs(first - 128) < 60).mean() > 0.05
    assert (first < 10).mean() > 0.2
    # the lung window shows lung parenchyma (-600 HU ± 750) as grey, where the abdomen
    # window showed it black: fewer black pixels inside the body
    assert (lung < 10).mean() < (first < 10).mean()
    # coronal: 43 rows at 0.7 mm fitted to the 1200-px-wide viewer → a wide, short band
    rows_lit = np.flatnonzero((coronal > 40).mean(axis=1) > 0.05)
    cols_lit = np.flatnonzero((coronal > 40).mean(axis=0) > 0.02)
    assert rows_lit.size and cols_lit.size
    height, width = np.ptp(rows_lit) + 1, np.ptp(cols_lit) + 1
    assert width > 3 * height, (width, height)
