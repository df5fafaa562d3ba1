"""Orthanc as a Query/Retrieve SCU of pacslab (issue 16): its REST API drives C-FIND and C-MOVE.

``/modalities/pacslab/query`` sends our C-FIND; ``/queries/{id}/retrieve`` sends a
C-MOVE whose destination is Orthanc itself, which pacslab reaches through
``qr.destinations``. Orthanc speaks UTF-8 here (``DefaultEncoding``), so the
Vietnamese name travels in ISO_IR 192 both ways.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ingest.dicom.qr_data import VIET_NAME, Study, fill
from tests.orthanc_peer import OrthancPeer
from tests.support import Receiver

pytestmark = pytest.mark.network


@pytest.fixture
def orthanc(tmp_path: Path, receiver: Receiver) -> Iterator[OrthancPeer]:
    peer = OrthancPeer(tmp_path / "orthanc", aet="ORTHANC",
                       modalities={"pacslab": ["PACSLAB", "127.0.0.1", receiver.port]},
                       extra={"DefaultEncoding": "Utf8"})
    peer.start()
    yield peer
    peer.stop()


@pytest.fixture
def archive(receiver: Receiver, orthanc: OrthancPeer) -> list[Study]:
    from services.destinations import DestinationDirectory

    # Orthanc's port is picked after the receiver started: added as the admin API
    # would, to the index, not the settings.
    DestinationDirectory(receiver.index, {}).put(  # type: ignore[arg-type]
        "ORTHANC", "127.0.0.1", orthanc.dicom_port, by="test")
    return fill(receiver.port)


def _query(orthanc: OrthancPeer, level: str, query: dict[str, str]) -> tuple[str, list[dict]]:
    rsp = orthanc.post("/modalities/pacslab/query", {"Level": level, "Query": query})
    qid = rsp["ID"]
    answers = [orthanc.get(f"/queries/{qid}/answers/{i}/content?simplify")
               for i in orthanc.get(f"/queries/{qid}/answers")]
    return qid, answers


def test_orthanc_queries_each_level(archive: list[Study], orthanc: OrthancPeer) -> None:
    _, answers = _query(orthanc, "Patient", {"PatientID": "QR00*", "PatientName": ""})
    assert sorted(a["PatientID"] for a in answers) == ["QR001", "QR002", "QR003"]
    _, answers = _query(orthanc, "Study", {"PatientID": "QR003", "StudyDate": "20240101-"})
    assert [a["StudyInstanceUID"] for a in answers] == [archive[3].study_uid]
    _, answers = _query(orthanc, "Series", {"StudyInstanceUID": archive[0].study_uid,
                                             "Modality": "MR"})
    assert [a["SeriesInstanceUID"] for a in answers] == [archive[0].series_uids[1]]
    _, answers = _query(orthanc, "Instance", {"StudyInstanceUID": archive[0].study_uid,
                                               "SeriesInstanceUID": archive[0].series_uids[0]})
    assert sorted(a["SOPInstanceUID"] for a in answers) == sorted(archive[0].sop_uids[0])


def test_orthanc_finds_vietnamese_name(archive: list[Study], orthanc: OrthancPeer) -> None:
    _, answers = _query(orthanc, "Study", {"PatientName": "Nguyễn*"})
    # Accent-insensitive PN matching (issue 21): NGUYEN^VAN BAO (QR003) matches too.
    assert sorted(a["PatientID"] for a in answers) == ["QR001", "QR003", "QR003"]
    (viet,) = [a for a in answers if a["PatientID"] == "QR001"]
    assert viet["PatientName"] == VIET_NAME


def test_orthanc_retrieves_to_itself(archive: list[Study], orthanc: OrthancPeer) -> None:
    qid, answers = _query(orthanc, "Study", {"PatientID": "QR002"})
    assert len(answers) == 1
    orthanc.post(f"/queries/{qid}/retrieve", {"TargetAet": "ORTHANC", "Synchronous": True})
    assert orthanc.sop_instance_uids() == set(archive[1].sop_uids[0])
