"""core.rejection: which KOS is an IHE IOCM rejection note, and what it rejects."""

from __future__ import annotations

import pytest
from pydicom.sequence import Sequence as DicomSequence

from core.errors import InvalidDatasetError
from core.rejection import parse_rejection_code, parse_rejection_note
from tests.services.iocm_data import rejection_note

REFS = [
    ("1.2.3.4", "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.1"),
    ("1.2.3.4", "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.2"),
    ("1.2.3.5", "1.2.840.10008.5.1.4.1.1.4", "1.2.3.5.1"),
]


def test_rejection_note_lists_its_evidence() -> None:
    ds = rejection_note(
        patient_id="P",
        patient_name="A^B",
        study_uid="1.2.3",
        rejected=REFS,
        code="113037",
        meaning="Rejected for Patient Safety Reasons",
    )
    note = parse_rejection_note(ds)
    assert note is not None and note.code == "113037"
    assert note.sop_instance_uid == ds.SOPInstanceUID
    assert [(r.series_instance_uid, r.sop_class_uid, r.sop_instance_uid) for r in note.refs] == REFS
    assert {r.study_instance_uid for r in note.refs} == {"1.2.3"}


def test_other_kos_and_other_classes_are_no_rejection() -> None:
    ds = rejection_note(
        patient_id="P",
        patient_name="A^B",
        study_uid="1.2.3",
        rejected=REFS,
        code="113000",
        meaning="Of Interest",
    )
    assert parse_rejection_note(ds) is None  # a key-image note (CID 7010)
    ds = rejection_note(patient_id="P", patient_name="A^B", study_uid="1.2.3", rejected=REFS)
    ds.ConceptNameCodeSequence[0].CodingSchemeDesignator = "99LOCAL"
    assert parse_rejection_note(ds) is None
    ds = rejection_note(patient_id="P", patient_name="A^B", study_uid="1.2.3", rejected=REFS)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR
    assert parse_rejection_note(ds) is None


@pytest.mark.parametrize(
    "damage", ["no evidence", "no sop uid", "itself", "long uid", "other study"]
)
def test_unusable_rejection_note_is_refused(damage: str) -> None:
    ds = rejection_note(patient_id="P", patient_name="A^B", study_uid="1.2.3", rejected=REFS)
    evidence = ds.CurrentRequestedProcedureEvidenceSequence
    if damage == "no evidence":
        ds.CurrentRequestedProcedureEvidenceSequence = DicomSequence()
    elif damage == "no sop uid":
        del (
            evidence[0]
            .ReferencedSeriesSequence[0]
            .ReferencedSOPSequence[0]
            .ReferencedSOPInstanceUID
        )
    elif damage == "itself":
        evidence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[
            0
        ].ReferencedSOPInstanceUID = ds.SOPInstanceUID
    elif damage == "long uid":
        evidence[0].StudyInstanceUID = "1." * 40
    else:  # the note is filed in one study and rejects another's instances
        evidence[0].StudyInstanceUID = "1.2.99"
    with pytest.raises(InvalidDatasetError):
        parse_rejection_note(ds)


def test_rejection_codes_are_cid_7011() -> None:
    assert parse_rejection_code(" 113039 ") == "113039"
    with pytest.raises(InvalidDatasetError, match="113001, 113037, 113038, 113039"):
        parse_rejection_code("113000")
