"""A small archive for the Query/Retrieve tests: three patients, four studies, tiny images.

Stored over C-STORE (pynetdicom as SCU) into the ``receiver`` fixture, so the index is
filled by the same path a modality uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
US_RETIRED = "1.2.840.10008.5.1.4.1.1.6"  # Ultrasound Image Storage (retired)

#: The Vietnamese name must survive ISO_IR 192 both ways (issue 16 §1).
VIET_NAME = "Nguyễn^Văn Ánh"


@dataclass
class Study:
    patient_id: str
    patient_name: str
    study_date: str
    accession: str
    series: list[tuple[str, str, int]]  # (modality, sop class, instances)
    study_uid: str = field(default_factory=lambda: str(generate_uid()))
    series_uids: list[str] = field(default_factory=list)
    sop_uids: list[list[str]] = field(default_factory=list)


def archive() -> list[Study]:
    return [
        Study("QR001", VIET_NAME, "20240105", "A1001", [("CT", CT, 3), ("MR", MR, 2)]),
        Study("QR002", "TRAN^THI BINH", "20240210", "A1002", [("MR", MR, 2)]),
        Study("QR003", "NGUYEN^VAN BAO", "20231120", "A1003", [("CT", CT, 1)]),
        Study("QR003", "NGUYEN^VAN BAO", "20240301", "A1004", [("CT", CT, 2)]),
    ]


def build(study: Study) -> list[Dataset]:
    """Part-10 datasets of ``study`` (8 x 8 pixels, ISO_IR 192)."""
    out = []
    study.series_uids = []
    study.sop_uids = []
    for number, (modality, sop_class, count) in enumerate(study.series, start=1):
        series_uid = str(generate_uid())
        study.series_uids.append(series_uid)
        uids = []
        for i in range(count):
            sop_uid = str(generate_uid())
            uids.append(sop_uid)
            ds = Dataset()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = sop_class
            ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.SpecificCharacterSet = "ISO_IR 192"
            ds.SOPClassUID = sop_class
            ds.SOPInstanceUID = sop_uid
            ds.StudyInstanceUID = study.study_uid
            ds.SeriesInstanceUID = series_uid
            ds.PatientID = study.patient_id
            ds.PatientName = study.patient_name
            ds.PatientBirthDate = "19800101"
            ds.PatientSex = "F"
            ds.StudyDate = study.study_date
            ds.StudyTime = "101500"
            ds.AccessionNumber = study.accession
            ds.StudyID = "1"
            ds.StudyDescription = f"{modality} study"
            ds.ReferringPhysicianName = ""
            ds.Modality = modality
            ds.SeriesNumber = number
            ds.InstanceNumber = i + 1
            ds.ImageComments = f"image {i + 1}"
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows = ds.Columns = 8
            ds.BitsAllocated = ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = 0
            ds.PixelData = (np.arange(64, dtype=np.uint16) + i).tobytes()
            out.append(ds)
        study.sop_uids.append(uids)
    return out


def store(port: int, datasets: list[Dataset], *, calling: str = "MODALITY") -> None:
    """C-STORE ``datasets`` to the receiver; every one must succeed."""
    ae = AE(ae_title=calling)
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSLAB")
    assert assoc.is_established
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            assert status.Status == 0x0000, hex(status.Status)
    finally:
        assoc.release()


def fill(port: int) -> list[Study]:
    studies = archive()
    store(port, [ds for s in studies for ds in build(s)])
    return studies


def write(directory: Path, datasets: list[Dataset]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = directory / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
