"""What leaves over DICOM is bounded, and who may ask (issue 14 §6 worklist side, §9).

An order whose patient name is 10 MB with NUL and ESC in it is written straight into
the order store (as a record system bypassing FHIR validation would leave it), and
DCMTK ``findscu`` queries the worklist of a real ``pacslab dicom``: it must get a valid
answer whose values fit their VRs (PS3.5 6.2). Identifiers that do not fit leave the
entry out rather than being cut. The worklist's own allow-list refuses other AEs.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import ModalityWorklistInformationFind  # type: ignore[attr-defined]

from core.settings import DicomSettings, Settings, WorklistSettings
from tests.worklist.dcmtk import HAVE_DCMTK, findscu, pacslab_dicom, write_query
from worklist._attributes import UnboundedValueError, bound_value
from worklist.memory import InMemoryMppsRepository, InMemoryWorklist
from worklist.model import make_item
from worklist.scp import build_ae, handlers

HUGE_NAME = "D\x00O\x1bE" * (10_000_000 // 5) + "^JANE"


def _query() -> Dataset:
    q = Dataset()
    q.PatientName = ""
    q.PatientID = ""
    q.AccessionNumber = ""
    q.StudyInstanceUID = ""
    sps = Dataset()
    sps.Modality = ""
    sps.ScheduledStationAETitle = ""
    sps.ScheduledProcedureStepDescription = ""
    q.ScheduledProcedureStepSequence = [sps]
    return q


@pytest.mark.network
@pytest.mark.skipif(not HAVE_DCMTK, reason="DCMTK findscu not installed")
def test_findscu_gets_a_bounded_answer_for_a_10_mb_name(tmp_path: Path) -> None:
    items = [
        make_item("A1", patient_name=HUGE_NAME),
        make_item("A2"),
        # An identifier that does not fit its VR (LO: 64): this entry is left out.
        make_item("A3", patient_id="P" * 100),
    ]
    query = write_query(_query(), tmp_path / "q.dcm")
    with pacslab_dicom(items, tmp_path / "work") as port:
        result = findscu(port, query, tmp_path / "out")
        echo = subprocess.run(["echoscu", "-to", "10", "127.0.0.1", str(port)],
                              capture_output=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert echo.returncode == 0
    by_accession = {str(ds.AccessionNumber): ds for ds in result.responses}
    assert sorted(by_accession) == ["A1", "A2"]
    name = str(by_accession["A1"].PatientName)
    assert all(len(group) <= 64 for group in name.split("="))
    assert "\x00" not in name and "\x1b" not in name
    assert name.startswith("DOE") and name.endswith("^JANE")  # given name kept
    assert str(by_accession["A2"].PatientName) == "DOE^JANE"


@pytest.mark.parametrize(
    ("vr", "value", "expected"),
    [
        ("PN", "A" * 100 + "^B", "A" * 62 + "^B"),
        ("PN", "X\x00Y\x1bZ", "XYZ"),
        ("LO", "L" * 70, "L" * 64),
        ("SH", "S\x07" * 10, "S" * 10),
        ("CS", "ct x-ray", "CT XRAY"),
        ("DA", "2026011", "2026011"),
        ("DA", "202601011", ""),  # a cut date is a wrong date: emptied
        ("UI", "1." * 40, ""),
        ("LT", "line\r\nnext\x00", "line\r\nnext"),
    ],
)
def test_bound_value_per_vr(vr: str, value: str, expected: str) -> None:
    assert bound_value(0x00091001, vr, value) == expected


def test_identifiers_are_refused_not_cut() -> None:
    with pytest.raises(UnboundedValueError):
        bound_value(0x00100020, "LO", "P" * 65)  # Patient ID
    with pytest.raises(UnboundedValueError):
        bound_value(0x00080050, "SH", "ACC\x00")  # Accession Number
    assert bound_value(0x00100020, "LO", "P" * 64) == "P" * 64


def test_bounding_logs_no_value(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        bound_value(0x00100010, "PN", "SECRET" * 20)
    assert caplog.records and all("SECRET" not in r.getMessage() for r in caplog.records)


def _find(port: int, calling: str) -> list[int]:
    ae = AE(ae_title=calling)
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate("127.0.0.1", port)
    assert assoc.is_established
    try:
        return [int(status.Status) for status, _ in
                assoc.send_c_find(_query(), ModalityWorklistInformationFind) if status]
    finally:
        assoc.release()


def test_worklist_allow_list_refuses_other_calling_aes() -> None:
    source = InMemoryWorklist([make_item("A1")])
    settings = WorklistSettings(allowed_calling_aes=["MODALITY1"])
    ae = build_ae(ae_title="PACSLAB")
    server = ae.start_server(("127.0.0.1", 0), block=False,
                             evt_handlers=handlers(source, InMemoryMppsRepository(), settings))
    assert server is not None
    try:
        port = int(server.server_address[1])
        assert _find(port, "MODALITY1") == [0xFF00, 0x0000]
        assert _find(port, "INTRUDER") == [0x0124]
    finally:
        server.shutdown()


def test_require_ae_allow_list_refuses_an_open_configuration() -> None:
    with pytest.raises(ValueError, match="allowed_calling_aes"):
        DicomSettings(require_ae_allow_list=True)
    assert DicomSettings(require_ae_allow_list=True, allowed_calling_aes=["CT1"])


def test_open_access_is_warned_at_start(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                        ) -> None:
    from pacslab.dicom_process import warn_open_access

    with caplog.at_level(logging.WARNING):
        warn_open_access(Settings(data_dir=tmp_path))
    assert len([r for r in caplog.records if "any calling AE" in r.getMessage()]) == 2
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        warn_open_access(Settings(data_dir=tmp_path, dicom={"allowed_calling_aes": ["CT1"]}))
    assert not [r for r in caplog.records if "any calling AE" in r.getMessage()]
