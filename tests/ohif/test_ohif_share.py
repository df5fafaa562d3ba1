"""A share link opens OHIF too (issue 17 item 4): the share token follows in the tab.

The built-in viewer, opened from a share link (``/viewer/shared#token=pls_…``), links
to OHIF for its study; OHIF reads the same per-tab token and renders the study from
``/dicomweb``, which the share allows for that study only. The same patient's other
study is refused to the same tab, and so is OHIF's search for the patient's studies.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from core.settings import Settings
from tests.ohif import harness as h
from tests.support import page_sleep, wait_until


@pytest.mark.network
def test_share_link_opens_ohif_for_its_study_only(settings: Settings, tmp_path: Path) -> None:
    from api.keys import issue_token

    api = h.need_ohif(settings.ohif.dist_dir)
    study = h.demo_ct(tmp_path / "ct", slices=3, size=128)
    other = h.demo_ct(tmp_path / "other", slices=1, size=64)
    with h.pacslab_server(
        settings, h.Study(study.study, study.series, 4, study.paths + other.paths)
    ) as srv:
        auth = settings.auth.model_copy(update={"enabled": True})
        sharer = issue_token(auth, subject="dr-share", scopes=["imaging.share"], ttl_s=600)
        request = urllib.request.Request(
            f"{srv.base}/admin/shares",
            method="POST",
            data=json.dumps({"study_uid": study.study, "expires_in": 600}).encode(),
            headers={"Authorization": f"Bearer {sharer}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request) as r:
            url = json.loads(r.read())["url"]
        pw, browser = h.launch(api)
        failed: list[str] = []
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on(
                "response",
                lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None,
            )
            page.goto(url)
            link = page.get_by_text("Open in OHIF")
            link.wait_for(timeout=20000)
            link.click()
            page.wait_for_url("**/ohif/viewer?StudyInstanceUIDs=*")
            stats = wait_until(
                lambda: st if (st := page.evaluate(h.CANVAS_STATS)) and st["std"] > 5 else None,
                timeout=60, interval=0.2, sleep=page_sleep(page),
                message=lambda: f"OHIF showed no image: {failed}")
            assert stats and stats["std"] > 5, (stats, failed)
            refused = page.evaluate(
                "async (u) => (await fetch(u, {headers: {Authorization: 'Bearer ' + "
                "sessionStorage.getItem('pacslab.token')}})).status",
                f"/dicomweb/studies/{other.study}/metadata",
            )
            assert refused == 403
        finally:
            browser.close()
            pw.stop()
    # Refused, and nothing else failed: the fetch above, and OHIF's search for the
    # patient's other studies (its study browser asks by Patient ID; both CTs belong
    # to the demo patient), which a share for one study must not answer.
    unexpected = [
        f
        for f in failed
        if not (
            f.startswith("403 ")
            and (
                "/dicomweb/studies?00100020=" in f or f.endswith(f"/studies/{other.study}/metadata")
            )
        )
    ]
    assert unexpected == [], failed
    assert any("/dicomweb/studies?00100020=" in f for f in failed), failed
