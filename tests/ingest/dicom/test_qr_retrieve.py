"""C-MOVE and C-GET SCP (PS3.4 C.4.2, C.4.3) against DCMTK movescu + storescp and getscu.

The receiver moves to a real DCMTK ``storescp`` configured as a destination AE; what
arrives there is compared, instance by instance, with what was stored.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    MRImageStorage,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from core.settings import QueryRetrieveSettings, RemoteAE, Settings
from tests.ingest.dicom.qr_data import US_RETIRED, Study, build, fill, store
from tests.support import Receiver, dcmtk, free_port, run_dcmtk, wait_until

pytestmark = pytest.mark.network

DEST_AE = "STORESCP"


@pytest.fixture
def dest_port() -> int:
    return free_port()


@pytest.fixture
def plain_socket(request: pytest.FixtureRequest) -> bool:
    """``qr.plain_socket``; tests parametrised on it also run the pynetdicom path."""
    return bool(getattr(request, "param", True))


@pytest.fixture
def settings(settings: Settings, dest_port: int, plain_socket: bool) -> Settings:
    qr = QueryRetrieveSettings(destinations={DEST_AE: RemoteAE(host="127.0.0.1", port=dest_port)},
                               plain_socket=plain_socket)
    return settings.model_copy(update={"qr": qr})


@pytest.fixture
def storescp(tmp_path: Path, dest_port: int) -> Iterator[Path]:
    """DCMTK storescp as the move destination, writing what it receives to a folder."""
    out = tmp_path / "storescp"
    out.mkdir()
    proc = subprocess.Popen(
        [dcmtk("storescp"), "-aet", DEST_AE, "+xa", "-od", str(out), str(dest_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    wait_until(lambda: run_dcmtk(["echoscu", "-aec", DEST_AE, "127.0.0.1", str(dest_port)],
                                 timeout=10).returncode == 0,
               interval=0.1, message="storescp did not start")
    yield out
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def archive(receiver: Receiver) -> list[Study]:
    return fill(receiver.port)


def received(folder: Path) -> dict[str, Dataset]:
    return {str(ds.SOPInstanceUID): ds for ds in (dcmread(p) for p in folder.iterdir())}


def same_pixels(receiver: Receiver, got: dict[str, Dataset]) -> None:
    store = receiver.service.archive.originals  # type: ignore[attr-defined]
    for uid, ds in got.items():
        inst = receiver.index.get_instance(uid)  # type: ignore[attr-defined]
        with store.open(inst.blob_key) as fp:
            original = dcmread(fp)
        assert ds.SOPClassUID == original.SOPClassUID
        assert np.array_equal(ds.pixel_array, original.pixel_array)
        assert str(ds.PatientName) == str(original.PatientName)


@pytest.mark.parametrize("plain_socket", [True, False], indirect=True,
                         ids=["plain", "pynetdicom"])
def test_movescu_study_to_storescp(archive: list[Study], receiver: Receiver, storescp: Path,
                                   plain_socket: bool, caplog: pytest.LogCaptureFixture
                                   ) -> None:
    caplog.set_level("INFO", logger="ingest.dicom")
    study = archive[0]
    result = run_dcmtk(["movescu", "-v", "-S", "-aec", "PACSLAB", "-aem", DEST_AE,
                        "-k", "QueryRetrieveLevel=STUDY",
                        "-k", f"StudyInstanceUID={study.study_uid}",
                        "127.0.0.1", str(receiver.port)], nodelay=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Received Final Move Response (Success)" in result.stderr, result.stderr
    got = received(storescp)
    assert set(got) == {uid for series in study.sop_uids for uid in series}
    same_pixels(receiver, got)
    # The action log says who moved what where, with no patient data in clear.
    audit = receiver.service.audit  # type: ignore[attr-defined]
    assert audit.flush()
    sent = [e for e in audit.entries() if e.event_type == "dicom.move-send"]
    assert len(sent) == 1
    entry = sent[0]
    assert entry.agent == "MOVESCU" and entry.resource == f"Study/{study.study_uid}"
    assert json.loads(entry.detail) == {"destination": DEST_AE, "instances": 5}
    assert entry.patient_key and study.patient_id not in json.dumps(entry.as_dict())
    # Served by the transport the setting chose.
    served = {r.name for r in caplog.records if "C-MOVE from" in r.getMessage()}
    assert served == {"ingest.dicom.qr_association" if plain_socket else "ingest.dicom.qr"}
    moves = [e for e in audit.entries() if e.event_type == "dicom.c-move"]
    assert len(moves) == 1 and moves[0].outcome == "0"


def test_movescu_series_and_image_levels(archive: list[Study], receiver: Receiver,
                                         storescp: Path) -> None:
    study = archive[3]
    result = run_dcmtk(["movescu", "-v", "-S", "-aec", "PACSLAB", "-aem", DEST_AE,
                        "-k", "QueryRetrieveLevel=IMAGE",
                        "-k", f"StudyInstanceUID={study.study_uid}",
                        "-k", f"SeriesInstanceUID={study.series_uids[0]}",
                        "-k", f"SOPInstanceUID={study.sop_uids[0][1]}",
                        "127.0.0.1", str(receiver.port)], nodelay=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert set(received(storescp)) == {study.sop_uids[0][1]}


def _move(port: int, identifier: Dataset, destination: str) -> list[Dataset]:
    """Every C-MOVE response status, with the Failed SOP Instance UID List copied in."""
    ae = AE(ae_title="QRTEST")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSLAB")
    assert assoc.is_established
    try:
        out = []
        for status, ds in assoc.send_c_move(
            identifier, destination, StudyRootQueryRetrieveInformationModelMove
        ):
            if ds is not None and "FailedSOPInstanceUIDList" in ds:
                status.FailedSOPInstanceUIDList = ds.FailedSOPInstanceUIDList
            out.append(status)
        return out
    finally:
        assoc.release()


@pytest.mark.parametrize("plain_socket", [True, False], indirect=True,
                         ids=["plain", "pynetdicom"])
def test_move_counts_pending_and_lists_failed_sops(
    archive: list[Study], receiver: Receiver, storescp: Path, plain_socket: bool
) -> None:
    study = archive[0]
    # One original is gone (a disk fault): its sub-operation fails and is listed.
    # (Deleted through the store: it may still be in the original journal too.)
    lost = study.sop_uids[0][1]
    inst = receiver.index.get_instance(lost)  # type: ignore[attr-defined]
    receiver.service.archive.originals.delete(inst.blob_key)  # type: ignore[attr-defined]
    q = Dataset()
    q.QueryRetrieveLevel = "SERIES"
    q.StudyInstanceUID = study.study_uid
    q.SeriesInstanceUID = study.series_uids[0]
    responses = _move(receiver.port, q, DEST_AE)
    pending = [r for r in responses if r.Status == 0xFF00]
    assert [int(r.NumberOfRemainingSuboperations) for r in pending] == [2, 1, 0]
    final = responses[-1]
    assert final.Status == 0xB000  # sub-operations complete, one or more failures
    assert int(final.NumberOfCompletedSuboperations) == 2
    assert int(final.NumberOfFailedSuboperations) == 1
    assert final.FailedSOPInstanceUIDList == lost
    assert set(received(storescp)) == {study.sop_uids[0][0], study.sop_uids[0][2]}


def test_move_refusals(archive: list[Study], receiver: Receiver, storescp: Path) -> None:
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = archive[0].study_uid
    assert [r.Status for r in _move(receiver.port, q, "NOBODY")] == [0xA801]
    # The level's unique key is required: never widened to the whole archive.
    q = Dataset()
    q.QueryRetrieveLevel = "SERIES"
    q.StudyInstanceUID = archive[0].study_uid
    assert [r.Status for r in _move(receiver.port, q, DEST_AE)][-1] == 0xA900
    assert list(storescp.iterdir()) == []


@pytest.mark.parametrize("plain_socket", [True, False], indirect=True,
                         ids=["plain", "pynetdicom"])
def test_getscu_series(archive: list[Study], receiver: Receiver, tmp_path: Path,
                       plain_socket: bool) -> None:
    study = archive[0]
    out = tmp_path / "get"
    out.mkdir()
    result = run_dcmtk(["getscu", "-v", "-S", "-aec", "PACSLAB", "-od", str(out),
                        "-k", "QueryRetrieveLevel=SERIES",
                        "-k", f"StudyInstanceUID={study.study_uid}",
                        "-k", f"SeriesInstanceUID={study.series_uids[1]}",
                        "127.0.0.1", str(receiver.port)], nodelay=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Final Get Response (Success)" in result.stderr or "Success" in result.stderr
    got = received(out)
    assert set(got) == set(study.sop_uids[1])
    same_pixels(receiver, got)


def test_get_with_pynetdicom_role_selection(archive: list[Study], receiver: Receiver) -> None:
    study = archive[1]
    ae = AE(ae_title="NATWS")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(MRImageStorage)
    ae.add_requested_context(CTImageStorage)
    got: list[str] = []

    def on_store(event: object) -> int:
        got.append(str(event.dataset.SOPInstanceUID))  # type: ignore[attr-defined]
        return 0x0000

    from pynetdicom import evt

    assoc = ae.associate(
        "127.0.0.1", receiver.port, ae_title="PACSLAB",
        ext_neg=[build_role(MRImageStorage, scp_role=True),
                 build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = study.study_uid
    statuses = [s for s, _ in assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet)]
    assoc.release()
    assert statuses[-1].Status == 0x0000
    assert int(statuses[-1].NumberOfCompletedSuboperations) == 2
    assert sorted(got) == sorted(study.sop_uids[0])


def test_retired_ultrasound_class_is_stored_and_served(
    receiver: Receiver, tmp_path: Path
) -> None:
    """Ultrasound Image Storage (retired, 1.2.840.10008.5.1.4.1.1.6) from an old machine."""
    study = Study("QR009", "LE^THI HOA", "20240404", "A1009", [("US", US_RETIRED, 2)])
    datasets = build(study)
    store(receiver.port, datasets, calling="OLDUS")
    # Served back like any other: C-GET over the same association.
    out = tmp_path / "get"
    out.mkdir()
    result = run_dcmtk(["getscu", "-v", "-S", "-aec", "PACSLAB", "-od", str(out),
                        "-k", "QueryRetrieveLevel=STUDY",
                        "-k", f"StudyInstanceUID={study.study_uid}",
                        "127.0.0.1", str(receiver.port)], nodelay=True, timeout=60)
    got = received(out)
    if set(got) != set(study.sop_uids[0]):
        # getscu proposes only the storage classes it knows (not retired ones): use
        # pynetdicom, which proposes what we ask for.
        ae = AE(ae_title="WS")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        ae.add_requested_context(US_RETIRED)
        seen: list[str] = []
        from pynetdicom import evt

        def on_store(event: object) -> int:
            seen.append(str(event.dataset.SOPInstanceUID))  # type: ignore[attr-defined]
            return 0x0000

        assoc = ae.associate("127.0.0.1", receiver.port, ae_title="PACSLAB",
                             ext_neg=[build_role(US_RETIRED, scp_role=True)],
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = study.study_uid
        last = [s for s, _ in assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet)]
        assoc.release()
        assert last[-1].Status == 0x0000, result.stderr
        assert sorted(seen) == sorted(study.sop_uids[0])


def test_retired_class_refused_when_turned_off(settings: Settings, tmp_path: Path) -> None:
    from services.storage_classes import extra_storage_classes

    assert US_RETIRED in extra_storage_classes(accept_retired=True, private=[])
    assert extra_storage_classes(accept_retired=False, private=["1.3.6.1.4.1.9590.100.1"]) == [
        "1.3.6.1.4.1.9590.100.1"
    ]


def test_move_to_a_destination_added_through_the_admin_api(
    archive: list[Study], receiver: Receiver, storescp: Path, dest_port: int
) -> None:
    from services.destinations import DestinationDirectory

    directory = DestinationDirectory(receiver.index, {})  # type: ignore[arg-type]
    directory.put("APIDEST", "127.0.0.1", dest_port, by="test")
    study = archive[1]
    result = run_dcmtk(["movescu", "-v", "-S", "-aec", "PACSLAB", "-aem", "APIDEST",
                        "-k", "QueryRetrieveLevel=STUDY",
                        "-k", f"StudyInstanceUID={study.study_uid}",
                        "127.0.0.1", str(receiver.port)], nodelay=True, timeout=60)
    assert "Received Final Move Response (Success)" in result.stderr, result.stderr
    assert set(received(storescp)) == set(study.sop_uids[0])
