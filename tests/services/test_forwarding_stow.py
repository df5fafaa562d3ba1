"""Forwarding to a DICOMweb STOW-RS endpoint (PS3.18 10.5): Orthanc with its DICOMweb plugin.

The endpoint asks for HTTP Basic credentials; the destination's ``authorization``
carries them. A wrong password is a refused send that stays in the queue with its
error, never a silent loss.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from core.settings import ForwardingRule, ForwardingSettings, Settings
from tests.ingest.dicom.qr_data import CT, MR, Study, build, store
from tests.orthanc_peer import OrthancPeer
from tests.support import Receiver, wait_until

#: Forwarding converges over retries and backoff: poll less often, wait longer.
_wait = partial(wait_until, timeout=60, interval=0.2)

pytestmark = pytest.mark.network


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancPeer]:
    peer = OrthancPeer(tmp_path / "orthanc", dicomweb=True,
                       extra={"AuthenticationEnabled": True,
                              "RegisteredUsers": {"pacslab": "s3cret"}},
                       authorization=_basic("pacslab", "s3cret"))
    yield peer
    peer.stop()


@pytest.fixture
def settings(settings: Settings, orthanc: OrthancPeer) -> Settings:
    url = orthanc.base + "/dicom-web"
    forwarding = ForwardingSettings(
        destinations={
            "TELE": {"kind": "stow", "url": url, "authorization": _basic("pacslab", "s3cret")},
            "BADAUTH": {"kind": "stow", "url": url, "authorization": _basic("pacslab", "no")},
        },
        rules=[ForwardingRule(name="mr", destinations=["TELE", "BADAUTH"], modalities=["MR"])],
        max_attempts=100, retry_base_s=0.2, retry_max_s=0.5, timeout_s=10,
    )
    processing = settings.processing.model_copy(
        update={"series_quiet_s": 3600.0, "poll_interval_s": 0.1}
    )
    return settings.model_copy(update={"forwarding": forwarding, "processing": processing})


def test_stow_forwarding_with_authorization(receiver: Receiver, orthanc: OrthancPeer,
                                            settings: Settings) -> None:
    from pacslab.worker_process import build_worker

    mr = Study("ST001", "HO^VAN F", "20240701", "A7001", [("MR", MR, 2)])
    ct = Study("ST002", "HO^VAN G", "20240702", "A7002", [("CT", CT, 1)])
    orthanc.start()
    store(receiver.port, build(mr) + build(ct))
    worker = build_worker(settings, name="stow-test")
    worker.start()

    def in_orthanc() -> set[str]:
        return {i["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.get("/instances?expand")}

    try:
        _wait(lambda: in_orthanc() == set(mr.sop_uids[0]))
        _wait(lambda: all(j.attempts >= 2 for j in [
            j for j in receiver.index.get_jobs() if j.kind == "fwd:BADAUTH"]))  # type: ignore[attr-defined]
        bad = [j for j in receiver.index.get_jobs() if j.kind == "fwd:BADAUTH"]  # type: ignore[attr-defined]
        assert len(bad) == 2 and all("HTTP 401" in j.error for j in bad)
        assert all(j.status in ("pending", "running") for j in bad)
    finally:
        worker.stop()
