"""What the index keeps of one DICOM instance, read from its header (pure).

The attributes are those QIDO-RS must match and return (PS3.18 Tables 10.6.1-5/6/7,
study/series/instance levels) and those FHIR R4 ImagingStudy needs (started,
modality, bodySite, numberOfInstances…). Values are decoded with the dataset's
Specific Character Set (PS3.5 6.1.2.3), so Vietnamese names in ISO_IR 192 arrive
as text. Nothing here is logged: names and birth dates are patient data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Protocol

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag

from core.errors import InvalidDatasetError, SOPClassMismatchError

__all__ = [
    "INT_KEYWORDS",
    "TEXT_KEYWORDS",
    "DatasetValues",
    "HeaderSource",
    "InstanceRecord",
    "metadata_json",
    "record_from",
]

# Group-level keys a required attribute must have to be indexed at all (PS3.3 C.7.2.1,
# C.7.3.1, C.12.1 Type 1 UIDs).
_REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")

# Bulk data is not metadata: WADO-RS /metadata replaces these by BulkDataURIs
# (PS3.18 10.4.1.2, F.2.6). Anything larger than this is treated as bulk too.
BULK_THRESHOLD = 1024
_SEQUENCE_VRS = frozenset({"SQ"})
_BULK_TAGS = frozenset(
    {
        Tag("PixelData"),
        Tag("FloatPixelData"),
        Tag("DoubleFloatPixelData"),
        Tag("EncapsulatedDocument"),
        Tag("WaveformData"),
        Tag("SpectroscopyData"),
    }
)


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """Index attributes of one instance (snake_case names for DICOM keywords)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    # patient (PS3.3 C.7.1.1)
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    # study (PS3.3 C.7.2.1)
    study_date: str = ""
    study_time: str = ""
    accession_number: str = ""
    study_id: str = ""
    study_description: str = ""
    referring_physician_name: str = ""
    institution_name: str = ""
    # series (PS3.3 C.7.3.1)
    modality: str = ""
    series_number: int | None = None
    series_description: str = ""
    series_date: str = ""
    series_time: str = ""
    body_part_examined: str = ""
    laterality: str = ""
    station_name: str = ""
    performed_procedure_step_start_date: str = ""
    performed_procedure_step_start_time: str = ""
    # instance (PS3.3 C.12.1, C.7.6.3)
    instance_number: int | None = None
    rows: int | None = None
    columns: int | None = None
    number_of_frames: int | None = None
    bits_allocated: int | None = None
    photometric_interpretation: str = ""
    specific_character_set: str = ""


def _text(ds: Dataset, keyword: str) -> str:
    if keyword not in ds:
        return ""
    value = ds[keyword].value
    if value is None:
        return ""
    if isinstance(value, MultiValue | list):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _int(ds: Dataset, keyword: str) -> int | None:
    if keyword not in ds:
        return None
    value = ds[keyword].value
    if value in (None, ""):
        return None
    if isinstance(value, MultiValue | list):
        value = value[0] if value else None
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


class HeaderSource(Protocol):
    """Where an :class:`InstanceRecord` reads its values from: a pydicom Dataset
    (:class:`DatasetValues`) or the raw header walk (:class:`core.header.HeaderValues`)."""

    def get_text(self, keyword: str) -> str: ...

    def get_int(self, keyword: str) -> int | None: ...


class DatasetValues:
    """:class:`HeaderSource` over a pydicom Dataset (the reference conversion)."""

    __slots__ = ("ds",)

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def get_text(self, keyword: str) -> str:
        return _text(self.ds, keyword)

    def get_int(self, keyword: str) -> int | None:
        return _int(self.ds, keyword)


#: Every text and integer keyword :func:`record_from` reads (for the raw header walk).
TEXT_KEYWORDS = (
    *_REQUIRED,
    "PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyDescription",
    "ReferringPhysicianName", "InstitutionName", "Modality", "SeriesDescription",
    "SeriesDate", "SeriesTime", "BodyPartExamined", "Laterality", "ImageLaterality",
    "StationName", "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
    "PhotometricInterpretation", "SpecificCharacterSet",
)  # fmt: skip
INT_KEYWORDS = (
    "SeriesNumber", "InstanceNumber", "Rows", "Columns", "NumberOfFrames", "BitsAllocated",
    "SamplesPerPixel",
)  # fmt: skip


def record_from(
    src: HeaderSource,
    *,
    transfer_syntax_uid: str,
    expected_sop_class_uid: str | None = None,
    expected_sop_instance_uid: str | None = None,
) -> InstanceRecord:
    """Read an :class:`InstanceRecord` from a dataset header.

    Parameters
    ----------
    src
        The header's values, typically of a dataset read with ``defer_size``.
    transfer_syntax_uid
        The transfer syntax it was received in (from the presentation context).
    expected_sop_class_uid, expected_sop_instance_uid
        Affected SOP Class/Instance UID of the C-STORE request (PS3.7 9.3.1.1): the
        dataset must agree with them (PS3.4 B.2.3, status 0xA900).

    Raises
    ------
    InvalidDatasetError
        A Type 1 UID is missing or empty (PS3.4 B.2.3 status 0xC000).
    SOPClassMismatchError
        The dataset's SOP Class/Instance UID differs from the request's.
    """
    try:
        values = {k: src.get_text(k) for k in _REQUIRED}
    except Exception as exc:  # pydicom raises many kinds on a corrupt header
        raise InvalidDatasetError(f"unreadable header: {type(exc).__name__}") from exc
    missing = [k for k in _REQUIRED if not values[k]]
    if missing:
        raise InvalidDatasetError(f"missing {', '.join(missing)}")
    if expected_sop_class_uid and values["SOPClassUID"] != expected_sop_class_uid:
        raise SOPClassMismatchError("SOP Class UID differs from the request")
    if expected_sop_instance_uid and values["SOPInstanceUID"] != expected_sop_instance_uid:
        raise SOPClassMismatchError("SOP Instance UID differs from the request")
    text, number = src.get_text, src.get_int
    try:
        return InstanceRecord(
            sop_class_uid=values["SOPClassUID"],
            sop_instance_uid=values["SOPInstanceUID"],
            study_instance_uid=values["StudyInstanceUID"],
            series_instance_uid=values["SeriesInstanceUID"],
            transfer_syntax_uid=transfer_syntax_uid,
            patient_id=text("PatientID"),
            issuer_of_patient_id=text("IssuerOfPatientID"),
            patient_name=text("PatientName"),
            patient_birth_date=text("PatientBirthDate"),
            patient_sex=text("PatientSex"),
            study_date=text("StudyDate"),
            study_time=text("StudyTime"),
            accession_number=text("AccessionNumber"),
            study_id=text("StudyID"),
            study_description=text("StudyDescription"),
            referring_physician_name=text("ReferringPhysicianName"),
            institution_name=text("InstitutionName"),
            modality=text("Modality"),
            series_number=number("SeriesNumber"),
            series_description=text("SeriesDescription"),
            series_date=text("SeriesDate"),
            series_time=text("SeriesTime"),
            body_part_examined=text("BodyPartExamined"),
            laterality=text("Laterality") or text("ImageLaterality"),
            station_name=text("StationName"),
            performed_procedure_step_start_date=text("PerformedProcedureStepStartDate"),
            performed_procedure_step_start_time=text("PerformedProcedureStepStartTime"),
            instance_number=number("InstanceNumber"),
            rows=number("Rows"),
            columns=number("Columns"),
            number_of_frames=number("NumberOfFrames"),
            bits_allocated=number("BitsAllocated"),
            photometric_interpretation=text("PhotometricInterpretation"),
            specific_character_set=text("SpecificCharacterSet"),
        )
    except Exception as exc:
        raise InvalidDatasetError(f"unreadable attribute: {type(exc).__name__}") from exc


def metadata_json(ds: Dataset) -> str:
    """DICOM JSON (PS3.18 F.2) of the header, bulk data left out.

    Bulk elements (pixel data, and any value over ``BULK_THRESHOLD`` bytes) get an
    empty ``BulkDataURI`` that the API fills in with the instance's URL, so
    ``/metadata`` needs no file access. They are skipped *before* conversion: with
    ``dcmread(defer_size=…)`` their values are never read from disk here.
    """
    header = Dataset()
    bulk: dict[str, str] = {}
    for tag, raw in ds._dict.items():  # raw elements: no value conversion yet
        length = getattr(raw, "length", None)
        if tag in _BULK_TAGS or (
            length is not None
            and length > BULK_THRESHOLD
            and length != 0xFFFFFFFF
            and raw.VR not in _SEQUENCE_VRS
        ):
            bulk[f"{int(tag):08X}"] = str(raw.VR or "UN")
            continue
        header._dict[tag] = raw
    header.set_original_encoding(ds.is_implicit_VR, ds.is_little_endian, ds.original_character_set)
    out = header.to_json_dict(
        bulk_data_threshold=BULK_THRESHOLD, bulk_data_element_handler=lambda _elem: ""
    )
    for key, vr in bulk.items():
        out[key] = {"vr": vr, "BulkDataURI": ""}
    return json.dumps(out, separators=(",", ":"), sort_keys=True)
