"""Patient module coercion on the way out (core/coercion.py; PS3.3 C.12.1.1.9), pure."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from core.coercion import (
    PatientAttributes,
    coerce_patient_json,
    coerce_patient_module,
    json_differences,
    patient_attributes_from_row,
)
from core.instance import metadata_json

WHEN = datetime(2026, 12, 2, 19, 30, tzinfo=UTC)


def _dataset(**values: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = uid = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = uid
    ds.PatientName = "ONE^TESTCASE"
    ds.PatientID = "P1"
    ds.PatientBirthDate = "19800101"
    ds.PatientSex = "F"
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def _part10(ds: Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


SAME = PatientAttributes("ONE^TESTCASE", "P1", "", "19800101", "F")


def test_unchanged_patient_leaves_the_dataset_byte_for_byte() -> None:
    ds = _dataset()
    before = _part10(ds)
    assert coerce_patient_module(ds, SAME) is False
    assert "OriginalAttributesSequence" not in ds
    assert _part10(ds) == before
    # Trailing empty PN components are not a difference.
    assert (
        coerce_patient_module(ds, PatientAttributes("ONE^TESTCASE^^", "P1", "", "19800101", "F"))
        is False
    )


def test_coerced_values_and_original_attributes_sequence() -> None:
    ds = _dataset()
    now = PatientAttributes("TWO^CASE", "P2", "HOSP", "19800101", "F")
    assert coerce_patient_module(ds, now, now=WHEN) is True
    back = dcmread(io.BytesIO(_part10(ds)))
    assert (str(back.PatientName), back.PatientID, back.IssuerOfPatientID) == (
        "TWO^CASE",
        "P2",
        "HOSP",
    )
    [item] = back.OriginalAttributesSequence
    assert item.ReasonForTheAttributeModification == "COERCE"
    assert item.ModifyingSystem == "pacslab"
    assert item.AttributeModificationDateTime.startswith("20261202193000")
    [previous] = item.ModifiedAttributesSequence
    # Only what changed; an attribute that was absent is recorded with zero length.
    assert sorted(e.keyword for e in previous) == ["IssuerOfPatientID", "PatientID", "PatientName"]
    assert (str(previous.PatientName), previous.PatientID) == ("ONE^TESTCASE", "P1")
    assert previous["IssuerOfPatientID"].is_empty
    # A second coercion appends an item, keeping the first.
    assert coerce_patient_module(back, SAME, now=WHEN) is True
    assert len(back.OriginalAttributesSequence) == 2
    assert back.OriginalAttributesSequence[1].ModifiedAttributesSequence[0].PatientID == "P2"
    assert "IssuerOfPatientID" not in back


def test_a_name_outside_the_character_set_switches_to_utf8_keeping_other_text() -> None:
    ds = _dataset(SpecificCharacterSet="ISO_IR 100", StudyDescription="Müller Thorax")
    raw = _part10(ds)
    stored = dcmread(io.BytesIO(raw))  # values still raw, decoded on access
    now = PatientAttributes("TRẦN^THỊ LAN", "P1", "", "19800101", "F")
    assert coerce_patient_module(stored, now) is True
    back = dcmread(io.BytesIO(_part10(stored)))
    assert back.SpecificCharacterSet == "ISO_IR 192"
    assert str(back.PatientName) == "TRẦN^THỊ LAN"
    assert back.StudyDescription == "Müller Thorax"
    assert str(back.OriginalAttributesSequence[0].ModifiedAttributesSequence[0].PatientName) == (
        "ONE^TESTCASE"
    )


def test_json_coercion_matches_the_dataset_coercion() -> None:
    ds = _dataset()
    meta = metadata_json(ds)
    assert json_differences(meta, SAME) == []
    assert coerce_patient_json(meta, SAME) is meta
    now = PatientAttributes("TRẦN^THỊ=陳^氏", "P2", "", "19800102", "F")
    assert json_differences(meta, now) == ["PatientName", "PatientID", "PatientBirthDate"]
    out = json.loads(coerce_patient_json(meta, now, now=WHEN))
    assert out["00100010"]["Value"] == [{"Alphabetic": "TRẦN^THỊ", "Ideographic": "陳^氏"}]
    assert out["00100020"]["Value"] == ["P2"]
    assert out["00080005"]["Value"] == ["ISO_IR 192"]
    item = out["04000561"]["Value"][0]
    assert item["04000565"]["Value"] == ["COERCE"]
    previous = item["04000550"]["Value"][0]
    assert previous["00100020"]["Value"] == ["P1"]
    assert previous["00100030"]["Value"] == ["19800101"]
    assert "00100040" not in previous
    # The JSON result reads back as DICOM and agrees with the dataset path.
    coerced = Dataset.from_json(out)
    assert str(coerced.PatientName) == "TRẦN^THỊ=陳^氏" and coerced.PatientBirthDate == "19800102"
    assert json_differences("not json", SAME) is None
    assert coerce_patient_json("[]", SAME) == "[]"


def test_index_row_without_patient_id_has_no_issuer() -> None:
    row = {"PatientName": "A", "PatientID": "", "IssuerOfPatientID": "study:1.2.3"}
    assert patient_attributes_from_row(row) == PatientAttributes("A", "", "", "", "")
