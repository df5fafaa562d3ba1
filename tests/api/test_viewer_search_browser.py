"""The viewer's study search in headless Debian Chromium (playwright), under the page's
strict CSP: typing a Vietnamese name with or without accents, picking a modality, and
the list following (issue 21). Paging is covered over HTTP (test_viewer_search.py)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

from tests.api.test_viewer_search import listed  # noqa: F401  (fixture)
from tests.support import free_port, wait_until

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture
def server(app: FastAPI) -> Iterator[str]:
    import uvicorn

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                        access_log=False))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    wait_until(lambda: srv.started, timeout=20, message="uvicorn did not start")
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


def _names(page: Any) -> list[str]:
    return [t.strip() for t in page.locator("#studies button strong").all_inner_texts()]


@pytest.mark.network
def test_study_search_in_chromium(server: str, listed: dict[str, str],  # noqa: F811
                                  tmp_path: Path) -> None:
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian chromium is not installed (/usr/bin/chromium)")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="the playwright Python package is not installed")
    errors: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{server}/viewer")
            page.wait_for_function("() => document.querySelectorAll('#studies button')"
                                   ".length === 4")
            assert _names(page)[0] == "NGUYEN^BINH"  # newest first

            def search(**fields: str) -> list[str]:
                for field_id in ("q-name", "q-id", "q-accession"):
                    page.fill(f"#{field_id}", fields.get(field_id, ""))
                page.select_option("#q-modality", fields.get("q-modality", ""))
                loads = int(page.locator("#studies").get_attribute("data-loads") or 0)
                page.click("#q-go")
                page.wait_for_function(
                    "n => Number(document.getElementById('studies').dataset.loads) > n",
                    arg=loads)
                return _names(page)

            assert search(**{"q-name": "trần"}) == ["TRẦN^THỊ LAN"]
            assert search(**{"q-name": "tran thi"}) == ["TRẦN^THỊ LAN"]
            assert search(**{"q-name": "ĐỖ"}) == ["Đỗ^VĂN HÙNG"]
            assert search(**{"q-name": "nguyen"}) == ["NGUYEN^BINH", "NGUYỄN^ÁNH"]
            assert search(**{"q-name": "nguyen", "q-modality": "CT"}) == ["NGUYỄN^ÁNH"]
            assert search(**{"q-accession": "ACC2"}) == ["Đỗ^VĂN HÙNG"]
            assert search(**{"q-name": "nobody"}) == []
            assert page.locator("#status").inner_text() == "No studies"
            assert page.locator("#next").is_disabled() and page.locator("#prev").is_disabled()
        finally:
            browser.close()
    assert not errors, errors
