"""A KOS rejection note (IHE RAD TF-3 4.66 / PS3.3 A.35.4) built with pydicom.

Modules of the Key Object Selection Document IOD (PS3.3 Table A.35.4-1): Patient,
General Study, Key Object Document Series (Modality KO), General Equipment, Key Object
Document (C.17.6.1, with the Current Requested Procedure Evidence Sequence), SR Document
Content (TID 2010 "Key Object Selection", an IMAGE item per rejected instance) and SOP
Common.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

KOS = "1.2.840.10008.5.1.4.1.1.88.59"


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def rejection_note(
    *,
    patient_id: str,
    patient_name: str,
    study_uid: str,
    rejected: Sequence[tuple[str, str, str]],  # (series UID, SOP Class UID, SOP UID)
    code: str = "113001",
    meaning: str = "Rejected for Quality Reasons",
) -> Dataset:
    """A rejection note titled ``code`` (CID 7011) listing ``rejected`` of ``study_uid``."""
    ds = Dataset()
    uid = str(generate_uid())
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = KOS
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = KOS
    ds.SOPInstanceUID = uid
    # Patient and General Study: the study the rejected instances belong to.
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = "20240105"
    ds.StudyTime = "101500"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    # Key Object Document Series (C.17.6.1): its own series, Modality KO.
    ds.Modality = "KO"
    ds.SeriesInstanceUID = str(generate_uid())
    ds.SeriesNumber = 99
    ds.ReferencedPerformedProcedureStepSequence = DicomSequence()
    ds.Manufacturer = "pacslab tests"
    # Key Object Document (C.17.6.2).
    ds.InstanceNumber = 1
    ds.ContentDate = "20240106"
    ds.ContentTime = "120000"
    by_series: dict[str, list[tuple[str, str]]] = {}
    for series_uid, sop_class, sop_uid in rejected:
        by_series.setdefault(series_uid, []).append((sop_class, sop_uid))
    study_item = Dataset()
    study_item.StudyInstanceUID = study_uid
    study_item.ReferencedSeriesSequence = DicomSequence()
    content = DicomSequence()
    for series_uid, sops in by_series.items():
        series_item = Dataset()
        series_item.SeriesInstanceUID = series_uid
        series_item.ReferencedSOPSequence = DicomSequence()
        for sop_class, sop_uid in sops:
            ref = Dataset()
            ref.ReferencedSOPClassUID = sop_class
            ref.ReferencedSOPInstanceUID = sop_uid
            series_item.ReferencedSOPSequence.append(ref)
            image = Dataset()
            image.RelationshipType = "CONTAINS"
            image.ValueType = "IMAGE"
            image_ref = Dataset()
            image_ref.ReferencedSOPClassUID = sop_class
            image_ref.ReferencedSOPInstanceUID = sop_uid
            image.ReferencedSOPSequence = DicomSequence([image_ref])
            content.append(image)
        study_item.ReferencedSeriesSequence.append(series_item)
    ds.CurrentRequestedProcedureEvidenceSequence = DicomSequence([study_item])
    # SR Document Content (C.17.3): the root CONTAINER titled with the CID 7011 code.
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = DicomSequence([_code(code, "DCM", meaning)])
    ds.ContinuityOfContent = "SEPARATE"
    template = Dataset()
    template.MappingResource = "DCMR"
    template.TemplateIdentifier = "2010"
    ds.ContentTemplateSequence = DicomSequence([template])
    ds.ContentSequence = content
    return ds
