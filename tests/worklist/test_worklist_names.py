"""MWL C-FIND with Vietnamese names over loopback (pynetdicom SCU → our SCP), using the
one PN folding the index also uses (``core.person_name``, issue 21)."""

from __future__ import annotations

from datetime import datetime

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import ModalityWorklistInformationFind  # type: ignore[attr-defined]

import worklist.query
from core.person_name import fold_person_name, person_name_key
from tests.worklist.dcmtk import pacslab_server
from worklist.model import make_item

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR")

ITEMS = [
    make_item("A1", patient_name="TRẦN^THỊ LAN", start=datetime(2026, 12, 2, 9, 0)),
    make_item("A2", patient_name="Đỗ^VĂN HÙNG", start=datetime(2026, 12, 2, 9, 30)),
    make_item("A3", patient_name="NGUYỄN^ÁNH", start=datetime(2026, 12, 2, 10, 0)),
    make_item("A4", patient_name="NGUYEN^BINH", start=datetime(2026, 12, 2, 10, 30)),
]


def test_the_worklist_uses_the_shared_folding() -> None:
    assert worklist.query.fold_person_name is fold_person_name
    assert person_name_key("TRẦN^THỊ LAN") == "tran^thi lan"
    assert person_name_key("Đỗ") == person_name_key("ĐỖ") == person_name_key("do") == "do"
    assert person_name_key("NGUYỄN*") == "nguyen*"


@pytest.mark.parametrize(("pattern", "expected"), [
    ("TRẦN*", ["A1"]), ("trần*", ["A1"]), ("TRAN*", ["A1"]), ("tran^thi lan", ["A1"]),
    ("Đỗ*", ["A2"]), ("đỗ^văn hùng", ["A2"]), ("DO*", ["A2"]),
    ("NGUYỄN*", ["A3", "A4"]), ("nguyen^anh", ["A3"]), ("Z*", []),
])
def test_mwl_c_find_vietnamese_names(pattern: str, expected: list[str]) -> None:
    with pacslab_server(ITEMS) as (port, _source):
        ae = AE(ae_title="SCU")
        ae.add_requested_context(ModalityWorklistInformationFind)
        assoc = ae.associate("127.0.0.1", port, ae_title="PACSLAB")
        assert assoc.is_established
        try:
            ds = Dataset()
            ds.SpecificCharacterSet = "ISO_IR 192"
            ds.PatientName = pattern
            ds.AccessionNumber = ""
            item = Dataset()
            item.ScheduledProcedureStepStartDate = ""
            ds.ScheduledProcedureStepSequence = [item]
            found = []
            for status, identifier in assoc.send_c_find(ds, ModalityWorklistInformationFind):
                assert status is not None
                if status.Status in (0xFF00, 0xFF01) and identifier is not None:
                    found.append(str(identifier.AccessionNumber))
                else:
                    assert status.Status == 0x0000
        finally:
            assoc.release()
    assert sorted(found) == expected
