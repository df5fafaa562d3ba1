"""C-FIND SCP (PS3.4 C.4.1) against DCMTK ``findscu`` and pynetdicom as SCU.

Four studies of three patients are stored over C-STORE; every query below matches a
strict subset, so a matching key that is ignored makes the test fail.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from core.settings import Settings
from tests.ingest.dicom.qr_data import VIET_NAME, Study, fill
from tests.support import Receiver, run_dcmtk

pytestmark = pytest.mark.network


@pytest.fixture
def plain_socket(request: pytest.FixtureRequest) -> bool:
    """``qr.plain_socket``; tests parametrised on it also run the pynetdicom path."""
    return bool(getattr(request, "param", True))


@pytest.fixture
def settings(settings: Settings, plain_socket: bool) -> Settings:
    qr = settings.qr.model_copy(update={"plain_socket": plain_socket})
    return settings.model_copy(update={"qr": qr})


@pytest.fixture
def archive(receiver: Receiver) -> list[Study]:
    return fill(receiver.port)


def findscu(receiver: Receiver, out: Path, model: str, *keys: str) -> list[Dataset]:
    """Run findscu with ``-k`` keys, extract every response (-X) and read them back."""
    out.mkdir(parents=True, exist_ok=True)
    args = ["findscu", "-v", model, "-X", "-od", str(out), "-aec", "PACSLAB"]
    for key in keys:
        args += ["-k", key]
    result = run_dcmtk([*args, "127.0.0.1", str(receiver.port)], nodelay=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


@pytest.mark.parametrize("plain_socket", [True, False], indirect=True,
                         ids=["plain", "pynetdicom"])
def test_study_level_by_patient_id(archive: list[Study], receiver: Receiver, tmp_path: Path,
                                   plain_socket: bool) -> None:
    rsp = findscu(receiver, tmp_path, "-S", "QueryRetrieveLevel=STUDY", "PatientID=QR003",
                  "StudyInstanceUID", "StudyDate", "PatientName", "ModalitiesInStudy",
                  "NumberOfStudyRelatedInstances", "AccessionNumber")
    expected = {s.study_uid for s in archive if s.patient_id == "QR003"}
    assert {r.StudyInstanceUID for r in rsp} == expected and len(rsp) == 2
    by_uid = {r.StudyInstanceUID: r for r in rsp}
    for s in archive:
        if s.study_uid in by_uid:
            r = by_uid[s.study_uid]
            assert r.StudyDate == s.study_date
            assert r.AccessionNumber == s.accession
            assert r.ModalitiesInStudy == "CT"
            assert int(r.NumberOfStudyRelatedInstances) == sum(n for *_, n in s.series)
            assert r.RetrieveAETitle == "PACSLAB"
            assert r.QueryRetrieveLevel == "STUDY"


def test_study_level_wildcard_name_is_case_and_accent_insensitive(
    archive: list[Study], receiver: Receiver, tmp_path: Path
) -> None:
    # The service's one PN rule (core/person_name.py, issue 21; the worklist's
    # pn_accent_insensitive default): "nguyen*" finds NGUYEN^VAN BAO and Nguyễn^Văn Ánh,
    # and nobody else (QR002 is another name).
    rsp = findscu(receiver, tmp_path, "-S", "QueryRetrieveLevel=STUDY", "PatientName=nguyen*",
                  "StudyInstanceUID", "PatientID")
    assert sorted(r.PatientID for r in rsp) == ["QR001", "QR003", "QR003"]


def test_study_date_range_and_accession_list(
    archive: list[Study], receiver: Receiver, tmp_path: Path
) -> None:
    rsp = findscu(receiver, tmp_path / "a", "-S", "QueryRetrieveLevel=STUDY",
                  "StudyDate=20240101-20240229", "StudyInstanceUID", "PatientID")
    assert sorted(r.PatientID for r in rsp) == ["QR001", "QR002"]
    rsp = findscu(receiver, tmp_path / "b", "-S", "QueryRetrieveLevel=STUDY",
                  "StudyDate=20240201-", "StudyInstanceUID", "AccessionNumber")
    assert sorted(r.AccessionNumber for r in rsp) == ["A1002", "A1004"]
    uids = "\\".join(s.study_uid for s in archive[1:3])
    rsp = findscu(receiver, tmp_path / "c", "-S", "QueryRetrieveLevel=STUDY",
                  f"StudyInstanceUID={uids}", "AccessionNumber")
    assert sorted(r.AccessionNumber for r in rsp) == ["A1002", "A1003"]


def test_vietnamese_name_round_trips_in_iso_ir_192(
    archive: list[Study], receiver: Receiver, tmp_path: Path
) -> None:
    rsp = findscu(receiver, tmp_path, "-S", "SpecificCharacterSet=ISO_IR 192",
                  "QueryRetrieveLevel=STUDY", "PatientName=Nguyễn^Văn*", "PatientID",
                  "StudyInstanceUID")
    # Accent-insensitive (issue 21's one rule): NGUYEN^VAN BAO's two studies match too;
    # the Vietnamese name itself comes back intact in ISO_IR 192.
    assert sorted(r.PatientID for r in rsp) == ["QR001", "QR003", "QR003"]
    (viet,) = [r for r in rsp if r.PatientID == "QR001"]
    assert viet.SpecificCharacterSet == "ISO_IR 192"
    assert str(viet.PatientName) == VIET_NAME
    # Exact (single value) matching on the full name, too.
    rsp = findscu(receiver, tmp_path / "x", "-S", "SpecificCharacterSet=ISO_IR 192",
                  "QueryRetrieveLevel=STUDY", f"PatientName={VIET_NAME}", "PatientID")
    assert [r.PatientID for r in rsp] == ["QR001"]
    # PN matching is case-insensitive beyond ASCII too ("NGUYỄN" is "Nguyễn").
    rsp = findscu(receiver, tmp_path / "y", "-S", "SpecificCharacterSet=ISO_IR 192",
                  "QueryRetrieveLevel=STUDY", "PatientName=NGUYỄN^VĂN ÁNH", "PatientID")
    assert [r.PatientID for r in rsp] == ["QR001"]


def test_patient_root_each_level(archive: list[Study], receiver: Receiver, tmp_path: Path
                                 ) -> None:
    rsp = findscu(receiver, tmp_path / "p", "-P", "QueryRetrieveLevel=PATIENT", "PatientID",
                  "PatientName", "PatientBirthDate")
    assert sorted(r.PatientID for r in rsp) == ["QR001", "QR002", "QR003"]
    rsp = findscu(receiver, tmp_path / "st", "-P", "QueryRetrieveLevel=STUDY",
                  "PatientID=QR001", "StudyInstanceUID")
    assert [r.StudyInstanceUID for r in rsp] == [archive[0].study_uid]
    rsp = findscu(receiver, tmp_path / "se", "-P", "QueryRetrieveLevel=SERIES",
                  "PatientID=QR001", f"StudyInstanceUID={archive[0].study_uid}",
                  "SeriesInstanceUID", "Modality=MR", "NumberOfSeriesRelatedInstances")
    assert [r.SeriesInstanceUID for r in rsp] == [archive[0].series_uids[1]]
    assert int(rsp[0].NumberOfSeriesRelatedInstances) == 2
    rsp = findscu(receiver, tmp_path / "im", "-P", "QueryRetrieveLevel=IMAGE",
                  "PatientID=QR001", f"StudyInstanceUID={archive[0].study_uid}",
                  f"SeriesInstanceUID={archive[0].series_uids[0]}", "SOPInstanceUID",
                  "InstanceNumber", "SOPClassUID")
    assert [r.SOPInstanceUID for r in rsp] == archive[0].sop_uids[0]
    assert [int(r.InstanceNumber) for r in rsp] == [1, 2, 3]


def test_study_root_each_level(
    archive: list[Study], receiver: Receiver, tmp_path: Path
) -> None:
    # ModalitiesInStudy as a list (PS3.4 C.2.2.2.2) and as wildcards (C.2.2.2.4), read
    # off the per-study modality set's index (issue 21): each study once.
    for n, (key, picked) in enumerate([("CT\\MR", [0, 1, 2, 3]), ("M*", [0, 1]),
                                       ("?T", [0, 2, 3]), ("X*", [])]):
        rsp = findscu(receiver, tmp_path / f"st{n}", "-S", "QueryRetrieveLevel=STUDY",
                      f"ModalitiesInStudy={key}", "StudyInstanceUID")
        assert sorted(r.StudyInstanceUID for r in rsp) == sorted(
            archive[i].study_uid for i in picked), key
    rsp = findscu(receiver, tmp_path / "se", "-S", "QueryRetrieveLevel=SERIES",
                  f"StudyInstanceUID={archive[0].study_uid}", "SeriesInstanceUID",
                  "Modality", "SeriesNumber")
    assert [(r.Modality, int(r.SeriesNumber)) for r in rsp] == [("CT", 1), ("MR", 2)]
    rsp = findscu(receiver, tmp_path / "im", "-S", "QueryRetrieveLevel=IMAGE",
                  f"StudyInstanceUID={archive[3].study_uid}",
                  f"SeriesInstanceUID={archive[3].series_uids[0]}", "SOPInstanceUID",
                  "InstanceNumber=2")
    assert [r.SOPInstanceUID for r in rsp] == [archive[3].sop_uids[0][1]]


# -- pynetdicom as SCU: statuses findscu does not expose ------------------------------


def _find(port: int, identifier: Dataset, model: str = "study"
          ) -> Iterator[tuple[int, Dataset | None]]:
    ae = AE(ae_title="QRTEST")
    sop = (StudyRootQueryRetrieveInformationModelFind if model == "study"
           else PatientRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(sop)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSLAB")
    assert assoc.is_established
    try:
        for status, ds in assoc.send_c_find(identifier, sop):
            yield int(status.Status), ds
    finally:
        assoc.release()


def test_optional_key_index_lacks_is_returned_empty_with_ff01(
    archive: list[Study], receiver: Receiver
) -> None:
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.PatientID = "QR002"
    q.StudyInstanceUID = ""
    q.PatientComments = "anything"  # not indexed: not matched, returned empty
    q.OtherPatientIDs = ""
    results = list(_find(receiver.port, q))
    pending = [(s, ds) for s, ds in results if s in (0xFF00, 0xFF01)]
    assert [s for s, _ in pending] == [0xFF01]
    ds = pending[0][1]
    assert ds is not None and ds.PatientComments == "" and ds.OtherPatientIDs == ""
    assert results[-1][0] == 0x0000


def test_key_below_the_level_and_missing_level_are_refused(
    archive: list[Study], receiver: Receiver
) -> None:
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.Modality = "CT"  # a SERIES-level key (PS3.4 C.4.1.2.2.1)
    assert [s for s, _ in _find(receiver.port, q)] == [0xA900]
    q = Dataset()
    q.PatientID = "QR001"
    assert [s for s, _ in _find(receiver.port, q)] == [0xA900]
    q = Dataset()
    q.QueryRetrieveLevel = "PATIENT"  # no PATIENT level in the Study Root model
    assert [s for s, _ in _find(receiver.port, q)] == [0xA900]
    q.PatientID = ""
    assert [s for s, _ in _find(receiver.port, q, model="patient")][-1] == 0x0000


def test_latin1_request_gets_latin1_or_utf8_answer(archive: list[Study], receiver: Receiver
                                                   ) -> None:
    q = Dataset()
    q.SpecificCharacterSet = "ISO_IR 100"
    q.QueryRetrieveLevel = "STUDY"
    q.PatientID = "QR001"
    q.PatientName = ""
    results = [ds for s, ds in _find(receiver.port, q) if s == 0xFF00]
    assert len(results) == 1 and results[0] is not None
    # "ễ" and "ă" are not in Latin-1: the answer switches to UTF-8 and says so.
    assert results[0].SpecificCharacterSet == "ISO_IR 192"
    assert str(results[0].PatientName) == VIET_NAME


def test_image_level_keys_from_the_indexed_header(
    archive: list[Study], receiver: Receiver, tmp_path: Path
) -> None:
    """Keys beyond the index columns come from the DICOM JSON the instance job keeps in
    the index; an instance whose job has not run yet returns them empty."""
    from core.instance import metadata_json

    study = archive[0]
    store = receiver.service.archive.originals  # type: ignore[attr-defined]
    done = study.sop_uids[0][:2]  # the third one's instance job "has not run"
    for uid in done:
        inst = receiver.index.get_instance(uid)  # type: ignore[attr-defined]
        with store.open(inst.blob_key) as fp:
            header = metadata_json(dcmread(fp, defer_size=1024))
        receiver.index.set_metadata_json(uid, inst.blob_key, header)  # type: ignore[attr-defined]
    rsp = findscu(receiver, tmp_path, "-S", "QueryRetrieveLevel=IMAGE",
                  f"StudyInstanceUID={study.study_uid}",
                  f"SeriesInstanceUID={study.series_uids[0]}", "SOPInstanceUID",
                  "ImageComments")
    got = {r.SOPInstanceUID: r for r in rsp}
    assert set(got) == set(study.sop_uids[0])
    assert [got[u].ImageComments for u in study.sop_uids[0]] == ["image 1", "image 2", ""]


def test_hostile_identifiers_are_refused_not_run(archive: list[Study], receiver: Receiver
                                                 ) -> None:
    # 300 keys (private tags do not count, so use public ones of any level).
    from pydicom.datadict import DicomDictionary

    q = Dataset()
    q.QueryRetrieveLevel = "IMAGE"
    added = 0
    for tag, entry in sorted(DicomDictionary.items()):
        if added >= 300:
            break
        if entry[0] in ("SQ", "OB", "OW", "UN", "OF", "OD", "OL", "OV") or (tag >> 16) < 8:
            continue
        q.add_new(tag, entry[0], None)
        added += 1
    assert [s for s, _ in _find(receiver.port, q)] == [0xA900]
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.PatientName = "A" * 4000 + "*"
    assert [s for s, _ in _find(receiver.port, q)] == [0xA900]
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyDate = "20240101-20241399"  # month 13
    assert [s for s, _ in _find(receiver.port, q)] == [0xA900]
    # The receiver still answers.
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.PatientID = "QR002"
    assert [s for s, _ in _find(receiver.port, q)] == [0xFF00, 0x0000]
