"""Tiles of a series with IHE IOCM rejected instances (issue 17.2).

The pyramid was rendered from every instance, rejected ones included: it is retired at
once (newest-version URLs) and for explicit-version URLs on the tile service's next
look-up of the version; the series is due for a new roll-up without them.
"""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient
from pydicom import dcmread

from api.app import create_app
from pacslab.wiring import build_index
from tests.support import wait_until

from .tiles_data import convert_synthetic_ct


def test_rejection_retires_the_pyramid(tmp_path: Path) -> None:
    conv = convert_synthetic_ct(tmp_path, slices=4, rows=32, columns=32)
    pinned = f"/iiif/{conv.series_uid}@{conv.version}:0:axial:1/info.json"
    newest = f"/iiif/{conv.series_uid}:0:axial:1/info.json"
    first = dcmread(sorted(conv.dicom_dir.iterdir())[0], stop_before_pixels=True)
    with TestClient(create_app(conv.settings)) as client:
        assert client.get(pinned).status_code == 200
        assert client.get(newest).status_code == 200
        r = client.post(
            "/admin/rejections",
            json={
                "study_instance_uid": conv.study_uid,
                "series_instance_uid": conv.series_uid,
                "sop_instance_uids": [str(first.SOPInstanceUID)],
                "code": "113001",
            },
        )
        assert r.status_code == 201, r.text
        assert client.get(newest).status_code == 404
        wait_until(
            lambda: client.get(pinned).status_code == 404,
            timeout=10,
            message="the cached pyramid version is still served",
        )
        series = client.get("/viewer/api/studies/" + conv.study_uid + "/series").json()
        assert [s["instances"] for s in series] == [3]
    index = build_index(conv.settings)
    try:
        job = next(j for j in index.get_jobs(target=conv.series_uid) if j.id == conv.version)
        assert job.status == "rejected"
        assert index.series_due(0.0) == [conv.series_uid]  # rolled up again without it
    finally:
        index.close()
