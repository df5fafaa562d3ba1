"""C-FIND identifiers → index queries and rows → responses (services/query_retrieve.py), pure."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from core.errors import InvalidQueryError
from services.query_retrieve import find_response, parse_find, parse_retrieve

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR")


def _q(level: str, **keys: object) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def test_matching_and_return_keys() -> None:
    req = parse_find(_q("STUDY", PatientName="NGUY*", StudyDate="20240101-",
                        StudyInstanceUID="", ModalitiesInStudy="CT\\MR",
                        NumberOfStudyRelatedInstances=""), "study")
    assert {(m.keyword, m.value) for m in req.query.matches} == {
        ("PatientName", "NGUY*"), ("StudyDate", "20240101-"), ("ModalitiesInStudy", "CT\\MR")}
    assert "NumberOfStudyRelatedInstances" in req.query.fields
    assert req.unsupported == ()


def test_unindexed_keys_and_sequences_are_unsupported_not_matched() -> None:
    item = Dataset()
    item.CodeValue = "XYZ"
    q = _q("STUDY", PatientComments="x", ProcedureCodeSequence=[item], OtherPatientIDs="")
    req = parse_find(q, "study")
    assert req.query.matches == ()
    assert set(req.unsupported) == {"PatientComments", "ProcedureCodeSequence"}


@pytest.mark.parametrize("identifier", [
    _q("STUDY", SOPInstanceUID="1.2.3"),  # below the level
    _q("SERIES", StudyDate="2024"),  # not a date
    _q("PATIENT", PatientID="X"),  # no PATIENT level in Study Root
    _q("FRAME"),
    _q("STUDY", PatientName=["A", "B"]),  # several values: only UIDs/CS have lists
])
def test_refused(identifier: Dataset) -> None:
    with pytest.raises(InvalidQueryError):
        parse_find(identifier, "study")


def test_response_character_set() -> None:
    row = {"PatientName": "Nguyễn^Văn Ánh", "PatientID": "P1", "StudyInstanceUID": "1.2"}
    q = _q("STUDY", PatientName="", PatientID="")
    q.SpecificCharacterSet = "ISO_IR 100"
    ds = find_response(parse_find(q, "study"), row, retrieve_ae="PACSLAB")
    assert ds.SpecificCharacterSet == "ISO_IR 192"  # does not fit Latin-1
    ds = find_response(parse_find(q, "study"), {**row, "PatientName": "Müller^Jörg"},
                       retrieve_ae="PACSLAB")
    assert ds.SpecificCharacterSet == "ISO_IR 100"  # fits: the request's own
    q2 = _q("STUDY", PatientName="", PatientID="", PatientComments="")
    ds = find_response(parse_find(q2, "study"), {**row, "PatientName": "DOE^J"},
                       retrieve_ae="PACSLAB")
    assert "SpecificCharacterSet" not in ds
    assert ds["PatientComments"].is_empty and ds.StudyInstanceUID == "1.2"  # unique key added
    assert ds.RetrieveAETitle == "PACSLAB" and ds.QueryRetrieveLevel == "STUDY"


def test_retrieve_needs_the_unique_key_of_its_level() -> None:
    with pytest.raises(InvalidQueryError):
        parse_retrieve(_q("SERIES", StudyInstanceUID="1.2"), "study")
    with pytest.raises(InvalidQueryError):
        parse_retrieve(_q("STUDY", StudyInstanceUID="1.2*"), "study")
    q = parse_retrieve(_q("IMAGE", StudyInstanceUID="1.2", SeriesInstanceUID="1.2.3",
                          SOPInstanceUID=["1.2.3.4", "1.2.3.5"]), "study")
    assert [(m.keyword, m.value) for m in q.matches] == [
        ("StudyInstanceUID", "1.2"), ("SeriesInstanceUID", "1.2.3"),
        ("SOPInstanceUID", "1.2.3.4\\1.2.3.5")]
    q = parse_retrieve(_q("PATIENT", PatientID="P1"), "patient")
    assert [(m.keyword, m.value) for m in q.matches] == [("PatientID", "P1")]


def test_image_keys_from_the_indexed_dicom_json_but_never_bulk_data() -> None:
    import json

    from pynetdicom.dsutils import encode

    q = _q("IMAGE", StudyInstanceUID="1.2", SOPInstanceUID="", ImageComments="",
           SliceThickness="")
    q.add_new(0x7FE00010, "OW", b"")
    req = parse_find(q, "study")
    assert "metadata_json" in req.query.fields
    stored = {"00204000": {"vr": "LT", "Value": ["image 1"]},
              "7FE00010": {"vr": "OW", "BulkDataURI": ""}}
    row = {"StudyInstanceUID": "1.2", "SeriesInstanceUID": "1.2.3",
           "SOPInstanceUID": "1.2.3.4", "metadata_json": json.dumps(stored)}
    ds = find_response(req, row, retrieve_ae="PACSLAB")
    assert ds.ImageComments == "image 1"
    assert ds["PixelData"].is_empty and ds["PixelData"].VR == "OW"
    assert ds["SliceThickness"].is_empty  # not in this header: empty, not guessed
    assert encode(ds, True, True) is not None  # writable as sent
