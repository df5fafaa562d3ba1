"""IHE IOCM rejection (issue 17.2) against real peers: DCMTK storescu, findscu, getscu.

A KOS rejection note sent by ``storescu`` hides what it rejects from C-FIND (study,
series and image levels), QIDO-RS, WADO-RS and C-GET at once, with the counts and
ModalitiesInStudy following; the admin API does the same without a note; a re-send of
a rejected instance is refused (0xA771), unless it was rejected because its retention
ended; the purge deletes versions and originals and is in the action log.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydicom import dcmread
from pydicom.dataset import Dataset

from core.retention import RetentionDecision
from core.settings import Settings
from storage.audit import AuditStore
from storage.retention import RetentionStore
from tests.api._support import running_app
from tests.ingest.dicom.qr_data import Study, fill, write
from tests.services.iocm_data import rejection_note
from tests.support import Receiver, run_dcmtk, storescu_responses

pytestmark = pytest.mark.network


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def settings(request: pytest.FixtureRequest, settings: Settings) -> Settings:
    """Both index backends: the rejection's UPDATEs and the receiver's refusal are SQL
    of their own (storage/index/rejection.py, sql.py ``_add``)."""
    if request.param == "sqlite":
        return settings
    url = request.getfixturevalue("pg_url")
    return settings.model_copy(update={"index": settings.index.model_copy(update={"url": url})})


@pytest.fixture
def archive(receiver: Receiver) -> list[Study]:
    return fill(receiver.port)


@pytest.fixture
def client(receiver: Receiver) -> Iterator[TestClient]:
    """The HTTP API over the receiver's index and stores (another process would do
    the same: the rejection lives in the shared index)."""
    with running_app(receiver.settings) as app, TestClient(app) as http:
        yield http


def storescu(receiver: Receiver, paths: list[Path]) -> list[str]:
    """Send with DCMTK storescu; the status text of each response."""
    result = run_dcmtk(
        ["storescu", "-v", "-aec", "PACSLAB", "127.0.0.1", str(receiver.port), *map(str, paths)],
        nodelay=True,
        timeout=60,
    )
    return [status for _, status in storescu_responses(result.stderr.splitlines())]


def findscu(receiver: Receiver, out: Path, *keys: str) -> list[Dataset]:
    out.mkdir(parents=True, exist_ok=True)
    args = ["findscu", "-v", "-S", "-X", "-od", str(out), "-aec", "PACSLAB"]
    for key in keys:
        args += ["-k", key]
    result = run_dcmtk([*args, "127.0.0.1", str(receiver.port)], nodelay=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def qido(client: TestClient, path: str) -> list[dict[str, Any]]:
    r = client.get(f"/dicomweb/{path}")
    assert r.status_code in (200, 204), r.text
    return r.json() if r.status_code == 200 else []


def values(item: dict[str, Any], tag: str) -> list[Any]:
    return list(item.get(tag, {}).get("Value", []))


def test_kos_rejection_note_over_storescu_hides_at_once(
    archive: list[Study], receiver: Receiver, client: TestClient, tmp_path: Path
) -> None:
    study = archive[0]  # QR001: CT series of 3, MR series of 2
    ct_series, mr_series = study.series_uids
    ct = study.sop_uids[0]
    gone = ct[:2]
    note = rejection_note(
        patient_id=study.patient_id,
        patient_name=study.patient_name,
        study_uid=study.study_uid,
        rejected=[(ct_series, "1.2.840.10008.5.1.4.1.1.2", uid) for uid in gone],
    )
    (note_path,) = write(tmp_path / "kos", [note])
    assert storescu(receiver, [note_path]) == ["Success"]

    # C-FIND, image level: the CT series has its third instance only.
    images = findscu(
        receiver,
        tmp_path / "img",
        "QueryRetrieveLevel=IMAGE",
        f"StudyInstanceUID={study.study_uid}",
        f"SeriesInstanceUID={ct_series}",
        "SOPInstanceUID",
    )
    assert [r.SOPInstanceUID for r in images] == [ct[2]]
    # Series level: the counts follow; the note is a series of its own (KO).
    series = findscu(
        receiver,
        tmp_path / "se",
        "QueryRetrieveLevel=SERIES",
        f"StudyInstanceUID={study.study_uid}",
        "SeriesInstanceUID",
        "Modality",
        "NumberOfSeriesRelatedInstances",
    )
    counts = {r.SeriesInstanceUID: int(r.NumberOfSeriesRelatedInstances) for r in series}
    assert counts == {ct_series: 1, mr_series: 2, note.SeriesInstanceUID: 1}
    # Study level.
    (st,) = findscu(
        receiver,
        tmp_path / "st",
        "QueryRetrieveLevel=STUDY",
        f"StudyInstanceUID={study.study_uid}",
        "NumberOfStudyRelatedInstances",
        "NumberOfStudyRelatedSeries",
        "ModalitiesInStudy",
    )
    assert int(st.NumberOfStudyRelatedInstances) == 1 + 2 + 1
    assert int(st.NumberOfStudyRelatedSeries) == 3

    # QIDO-RS and WADO-RS (404: PS3.18 gives 410 for a resource "no longer available",
    # but IOCM wants rejected objects to be as if never stored: hidden, not announced).
    listed = {
        values(i, "00080018")[0] for i in qido(client, f"studies/{study.study_uid}/instances")
    }
    assert not listed & set(gone) and ct[2] in listed and note.SOPInstanceUID in listed
    for uid in gone:
        path = f"/dicomweb/studies/{study.study_uid}/series/{ct_series}/instances/{uid}"
        assert (
            client.get(
                path, headers={"Accept": "multipart/related; type=application/dicom"}
            ).status_code
            == 404
        )
        assert client.get(path + "/metadata").status_code == 404
    # A C-GET of the study brings what is left, and nothing rejected.
    out = tmp_path / "get"
    out.mkdir()
    result = run_dcmtk(
        [
            "getscu",
            "-v",
            "-S",
            "-aec",
            "PACSLAB",
            "-od",
            str(out),
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={study.study_uid}",
            "127.0.0.1",
            str(receiver.port),
        ],
        nodelay=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    got = {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in out.iterdir()}
    assert got == {ct[2], *study.sop_uids[1], note.SOPInstanceUID} - set()  # KOS is kept
    # The rejection is listed, with its note.
    rows = client.get("/admin/rejections", params={"study": study.study_uid}).json()
    assert {(r["sop_instance_uid"], r["code"], r["source"], r["note_uid"]) for r in rows} == {
        (uid, "113001", "kos", note.SOPInstanceUID) for uid in gone
    }

    # Sent again (by the modality that made them): refused, 0xA771.
    originals = write(tmp_path / "again", [d for d in _datasets(study) if d.SOPInstanceUID in gone])
    # -nh: go on after a refusal; -d: show the response's Error Comment. DCMTK names
    # 0xA7xx after PS3.4 Table B.2-1's range ("Refused: Out of Resources"); the code
    # and the comment say which refusal it is.
    result = run_dcmtk(
        [
            "storescu",
            "-d",
            "-nh",
            "-aec",
            "PACSLAB",
            "127.0.0.1",
            str(receiver.port),
            *map(str, originals),
        ],
        nodelay=True,
        timeout=60,
    )
    out = result.stdout + result.stderr
    assert out.lower().count("0xa771") >= 2, out
    assert out.count("rejected before (code 113001)") == 2, out
    # The note itself again: idempotent.
    assert storescu(receiver, [note_path]) == ["Success"]
    assert len(qido(client, f"studies/{study.study_uid}/series/{ct_series}/instances")) == 1


def test_rejection_note_that_misnames_instances_is_refused(
    archive: list[Study], receiver: Receiver, client: TestClient, tmp_path: Path
) -> None:
    """A note naming stored instances under another series (or SOP Class) is refused
    before it is stored: it must not hide what it does not describe."""
    study = archive[0]
    mr_series = study.series_uids[1]
    note = rejection_note(
        patient_id=study.patient_id,
        patient_name=study.patient_name,
        study_uid=study.study_uid,
        rejected=[(mr_series, "1.2.840.10008.5.1.4.1.1.2", study.sop_uids[0][0])],
    )
    (path,) = write(tmp_path / "kos", [note])
    result = run_dcmtk(
        ["storescu", "-d", "-aec", "PACSLAB", "127.0.0.1", str(receiver.port), str(path)],
        nodelay=True,
        timeout=60,
    )
    assert "instances under other UIDs than stored" in result.stdout + result.stderr
    listed = {
        values(i, "00080018")[0] for i in qido(client, f"studies/{study.study_uid}/instances")
    }
    assert study.sop_uids[0][0] in listed and note.SOPInstanceUID not in listed
    assert client.get("/admin/rejections").json() == []


def _datasets(study: Study) -> list[Dataset]:
    """``study``'s instances as first sent (qr_data.build made them; rebuilt here with
    the same UIDs)."""
    from tests.ingest.dicom.qr_data import build

    copy = Study(
        study.patient_id,
        study.patient_name,
        study.study_date,
        study.accession,
        study.series,
        study_uid=study.study_uid,
    )
    rebuilt = build(copy)
    mapping = {
        new: old
        for news, olds in zip(copy.sop_uids, study.sop_uids, strict=True)
        for new, old in zip(news, olds, strict=True)
    }
    series_map = dict(zip(copy.series_uids, study.series_uids, strict=True))
    for ds in rebuilt:
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = mapping[ds.SOPInstanceUID]
        ds.SeriesInstanceUID = series_map[ds.SeriesInstanceUID]
    return rebuilt


def test_api_rejection_of_a_series_and_purge(
    archive: list[Study], receiver: Receiver, client: TestClient, tmp_path: Path
) -> None:
    study = archive[0]
    ct_series, mr_series = study.series_uids
    index: Any = receiver.index
    keys = [index.get_instance(uid).blob_key for uid in study.sop_uids[0]]
    r = client.post(
        "/admin/rejections",
        json={
            "study_instance_uid": study.study_uid,
            "series_instance_uid": ct_series,
            "code": "113037",
        },
    )
    assert r.status_code == 201, r.text
    assert r.json()["hidden"] == 3
    # The series is gone everywhere; the study keeps the MR series and loses CT.
    (st,) = qido(
        client, f"studies?StudyInstanceUID={study.study_uid}&includefield=ModalitiesInStudy"
    )
    assert values(st, "00080061") == ["MR"]
    assert values(st, "00201208") == [2] and values(st, "00201206") == [1]
    assert [
        values(s, "0020000E")[0] for s in qido(client, f"studies/{study.study_uid}/series")
    ] == [mr_series]
    series = findscu(
        receiver,
        tmp_path / "se",
        "QueryRetrieveLevel=SERIES",
        f"StudyInstanceUID={study.study_uid}",
        "SeriesInstanceUID",
    )
    assert [r.SeriesInstanceUID for r in series] == [mr_series]
    # FHIR ImagingStudy counts and the viewer's series list follow.
    fhir = client.get(f"/fhir/ImagingStudy/{study.study_uid}").json()
    assert fhir["numberOfSeries"] == 1 and fhir["numberOfInstances"] == 2
    assert [
        s["series_instance_uid"]
        for s in client.get(f"/viewer/api/studies/{study.study_uid}/series").json()
    ] == [mr_series]
    # Bad requests: unknown code, nothing current to reject (already rejected).
    assert (
        client.post(
            "/admin/rejections", json={"study_instance_uid": study.study_uid, "code": "999999"}
        ).status_code
        == 400
    )
    assert (
        client.post(
            "/admin/rejections",
            json={
                "study_instance_uid": study.study_uid,
                "series_instance_uid": ct_series,
                "code": "113001",
            },
        ).status_code
        == 404
    )
    # The originals are kept until the purge, then deleted (and the purge audited).
    originals = client.app.state.archive.originals  # type: ignore[attr-defined]
    assert all(originals.exists(k) for k in keys)
    r = client.post("/admin/rejections/purge", json={"codes": ["113037"]})
    assert r.status_code == 200, r.text
    assert r.json() == {"instances": 3, "versions": 3, "originals": 3, "kept_for_retention": 0}
    assert not any(originals.exists(k) for k in keys)
    assert all(index.instance_versions(uid) == [] for uid in study.sop_uids[0])
    purged = client.get("/admin/rejections", params={"purged": True}).json()
    assert len(purged) == 3 and all(p["purged_at"] for p in purged)
    client.app.state.audit.flush()  # type: ignore[attr-defined]
    events = [
        e
        for e in AuditStore(index.engine).entries()
        if e.event_type in ("iocm.reject", "iocm.purge")
    ]
    assert [e.event_type for e in events] == ["iocm.reject", "iocm.purge"]
    assert all(e.agent for e in events)
    # Still refused after the purge: the rejection outlives the files.
    paths = write(
        tmp_path / "again",
        [d for d in _datasets(study) if d.SOPInstanceUID == study.sop_uids[0][0]],
    )
    result = run_dcmtk(
        ["storescu", "-d", "-aec", "PACSLAB", "127.0.0.1", str(receiver.port), *map(str, paths)],
        nodelay=True,
        timeout=60,
    )
    assert "rejected before (code 113037)" in result.stdout + result.stderr


def test_retention_expired_rejection_allows_deletion_and_restore(
    archive: list[Study], receiver: Receiver, client: TestClient, tmp_path: Path
) -> None:
    study = archive[1]  # QR002: one MR series of 2
    index: Any = receiver.index
    body = {"study_instance_uid": study.study_uid, "code": "113039"}
    # 113039 says retention ended: refused while the study has no expired class.
    assert client.post("/admin/rejections", json=body).status_code == 409
    store = RetentionStore(index.engine, receiver.settings.retention)
    store.set(
        "study",
        study.study_uid,
        RetentionDecision(10, "test", date(2020, 1, 1)),
        date(2010, 1, 1),
        lengthen_only=False,
    )
    r = client.post("/admin/rejections", json=body)
    assert r.status_code == 201 and r.json()["hidden"] == 2
    assert qido(client, f"studies?StudyInstanceUID={study.study_uid}") == []
    # Only that study: the others are still found, with all their instances.
    left = {values(s, "0020000D")[0] for s in qido(client, "studies")}
    assert left == {s.study_uid for s in archive if s is not study}
    for other in archive:
        if other is not study:
            n = sum(len(uids) for uids in other.sop_uids)
            assert len(qido(client, f"studies/{other.study_uid}/instances")) == n
    # Sent again: accepted and current again (the one reason that allows it).
    first = study.sop_uids[0][0]
    paths = write(tmp_path / "again", [d for d in _datasets(study) if d.SOPInstanceUID == first])
    assert storescu(receiver, paths) == ["Success"]
    listed = qido(client, f"studies/{study.study_uid}/instances")
    assert [values(i, "00080018")[0] for i in listed] == [first]
    # The rest is purged: retention ended, so deletion is allowed.
    r = client.post("/admin/rejections/purge", json={"codes": ["113039"]})
    assert r.json()["instances"] == 1 and r.json()["kept_for_retention"] == 0
    assert index.instance_versions(study.sop_uids[0][1]) == []
    assert index.get_instance(first).sop_instance_uid == first


def test_stow_rs_rejection_note(archive: list[Study], client: TestClient, tmp_path: Path) -> None:
    study = archive[2]  # QR003, one CT
    (uid,) = study.sop_uids[0]
    note = rejection_note(
        patient_id=study.patient_id,
        patient_name=study.patient_name,
        study_uid=study.study_uid,
        code="113038",
        meaning="Incorrect Modality Worklist Entry",
        rejected=[(study.series_uids[0], "1.2.840.10008.5.1.4.1.1.2", uid)],
    )
    (path,) = write(tmp_path / "kos", [note])
    boundary = "iocm-boundary"
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + path.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    r = client.post(
        "/dicomweb/studies",
        content=body,
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'
        },
    )
    assert r.status_code == 200, r.text
    listed = [
        values(i, "00080018")[0] for i in qido(client, f"studies/{study.study_uid}/instances")
    ]
    assert listed == [note.SOPInstanceUID]


def test_purge_rejected_command(
    archive: list[Study], receiver: Receiver, client: TestClient, tmp_path: Path
) -> None:
    if not receiver.settings.index.url.startswith("sqlite"):
        pytest.skip("the command is run on the default (SQLite) index of its data dir")
    import subprocess
    import sys

    from tests.support import env_for

    study = archive[3]  # QR003's second study: one CT series of 2
    index: Any = receiver.index
    keys = [index.get_instance(uid).blob_key for uid in study.sop_uids[0]]
    assert (
        client.post(
            "/admin/rejections",
            json={
                "study_instance_uid": study.study_uid,
                "sop_instance_uids": study.sop_uids[0][:1],
                "code": "113038",
            },
        ).status_code
        == 201
    )
    env = env_for(receiver.settings.data_dir)
    env["PACSLAB_AUTH__ENABLED"] = "false"
    result = subprocess.run(
        [sys.executable, "-m", "pacslab", "purge-rejected", "--code", "113001"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "purged 0 rejected instances" in result.stdout  # another code: nothing
    result = subprocess.run(
        [sys.executable, "-m", "pacslab", "purge-rejected"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "purged 1 rejected instances (1 versions, 1 originals)" in result.stdout
    originals = client.app.state.archive.originals  # type: ignore[attr-defined]
    assert not originals.exists(keys[0]) and originals.exists(keys[1])
    events = [e for e in AuditStore(index.engine).entries() if e.event_type == "iocm.purge"]
    assert len(events) == 2 and events[-1].agent.startswith("cli:")


def test_correction_by_resend_is_a_new_version(
    archive: list[Study], receiver: Receiver, client: TestClient, tmp_path: Path
) -> None:
    """A re-sent instance with corrected attributes: a new version is current (WADO-RS,
    QIDO-RS, C-FIND answer with it), the earlier one stays retrievable for audit, and
    the study's previous attribute values are recorded (issue 17.2)."""
    study = archive[1]  # QR002: MR series of 2
    first = study.sop_uids[0][0]
    index: Any = receiver.index
    old_key = index.get_instance(first).blob_key
    (ds,) = [d for d in _datasets(study) if d.SOPInstanceUID == first]
    ds.StudyDescription = "MR brain (corrected)"
    ds.AccessionNumber = "A2002"
    paths = write(tmp_path / "fix", [ds])
    assert storescu(receiver, paths) == ["Success"]

    versions = index.instance_versions(first)
    assert [(v.version, v.is_current) for v in versions] == [(1, False), (2, True)]
    assert versions[0].blob_key == old_key
    originals = client.app.state.archive.originals  # type: ignore[attr-defined]
    assert originals.exists(old_key)  # the superseded version is kept
    with originals.open(old_key) as fp:  # and is still the bytes first received
        assert dcmread(fp).StudyDescription == "MR study"
    # Every answer is the current version's.
    (st,) = findscu(
        receiver,
        tmp_path / "st",
        "QueryRetrieveLevel=STUDY",
        f"StudyInstanceUID={study.study_uid}",
        "StudyDescription",
        "AccessionNumber",
        "NumberOfStudyRelatedInstances",
    )
    assert (st.StudyDescription, st.AccessionNumber) == ("MR brain (corrected)", "A2002")
    assert int(st.NumberOfStudyRelatedInstances) == 2  # a version is no new instance
    meta = client.get(
        f"/dicomweb/studies/{study.study_uid}/series/{study.series_uids[0]}"
        f"/instances/{first}/metadata"
    ).json()
    assert values(meta[0], "00081030") == ["MR brain (corrected)"]
    (qido_st,) = qido(client, f"studies?StudyInstanceUID={study.study_uid}")
    assert values(qido_st, "00080050") == ["A2002"]
    # The values the correction replaced, for audit.
    recorded = client.get(f"/admin/studies/{study.study_uid}/versions").json()
    assert len(recorded) == 1 and recorded[0]["cause_uid"] == first
    assert recorded[0]["previous"]["description"] == "MR study"
    assert recorded[0]["previous"]["accession_number"] == "A1002"
    # The same correction again changes nothing more.
    assert storescu(receiver, paths) == ["Success"]
    assert len(client.get(f"/admin/studies/{study.study_uid}/versions").json()) == 1
