"""Synthetic but realistic CT series, for ``pacslab demo``, tests and benchmarks.

The phantom is an elliptical body with lungs, a spine and a contrast-filled aorta in
Hounsfield units, stored as CT Image Storage (PS3.3 A.3) with the Modality LUT
(Rescale Intercept -1024) and consistent geometry: Image Position (Patient) advances
along the normal of Image Orientation (Patient) by Spacing Between Slices, so a series
reader (SimpleITK, our own processing) reconstructs the volume exactly. The patient is
fictional.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

__all__ = [
    "SyntheticSeries",
    "ct_phantom_slice",
    "ct_series",
    "write_ct_series",
    "write_projection_image",
]


@dataclass(frozen=True, slots=True)
class SyntheticSeries:
    """UIDs and parameters of one generated series."""

    study_instance_uid: str
    series_instance_uid: str
    slices: int
    rows: int
    columns: int
    patient_id: str = "SYN0001"
    patient_name: str = "NGUYEN^VAN AN"
    accession_number: str = "ACC0001"
    pixel_spacing_mm: float = 0.7
    slice_spacing_mm: float = 1.25
    sop_instance_uids: tuple[str, ...] = field(default=())


def ct_phantom_slice(rows: int, columns: int, z: float) -> np.ndarray:
    """One axial slice of the phantom in HU at relative height ``z`` in [0, 1]."""
    yy, xx = np.mgrid[-1.0 : 1.0 : rows * 1j, -1.0 : 1.0 : columns * 1j]
    img = np.full((rows, columns), -1000.0, dtype=np.float32)  # air
    body = (xx / 0.85) ** 2 + (yy / 0.62) ** 2 <= 1.0
    img[body] = 40.0  # soft tissue
    outside_muscle = (xx / 0.8) ** 2 + (yy / 0.57) ** 2 > 1.0
    img[body & outside_muscle] = -100.0  # subcutaneous fat ring
    lung_r = 0.28 + 0.08 * np.sin(np.pi * z)
    for cx in (-0.38, 0.38):
        img[((xx - cx) / lung_r) ** 2 + ((yy + 0.02) / (lung_r * 1.4)) ** 2 <= 1.0] = -850.0
    img[(xx / 0.09) ** 2 + ((yy - 0.42) / 0.09) ** 2 <= 1.0] = 700.0  # vertebral body
    img[((xx + 0.08) / 0.06) ** 2 + ((yy - 0.22) / 0.06) ** 2 <= 1.0] = 250.0  # aorta, contrast
    rng = np.random.default_rng(int(z * 1e6) & 0xFFFF)
    img += rng.normal(0.0, 8.0, img.shape).astype(np.float32)  # quantum noise
    return np.clip(img, -1024, 3071)


def ct_series(
    slices: int = 120,
    rows: int = 512,
    columns: int = 512,
    *,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    patient_id: str = "SYN0001",
    patient_name: str = "NGUYEN^VAN AN",
    accession_number: str = "ACC0001",
) -> Iterator[Dataset]:
    """Yield ``slices`` CT Image Storage datasets with file meta, ready to save."""
    study_uid = study_instance_uid or generate_uid()
    series_uid = series_instance_uid or generate_uid()
    frame_uid = generate_uid()
    now = datetime.now()
    pixel_spacing, spacing = 0.7, 1.25
    origin_x = -pixel_spacing * (columns - 1) / 2
    origin_y = -pixel_spacing * (rows - 1) / 2
    for i in range(slices):
        z_rel = i / max(slices - 1, 1)
        hu = ct_phantom_slice(rows, columns, z_rel)
        stored = (hu + 1024.0).round().astype(np.int16)  # Modality LUT inverse
        sop_uid = generate_uid()

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = now.strftime("%H%M%S")
        ds.ContentTime = now.strftime("%H%M%S.%f")
        ds.AccessionNumber = accession_number
        ds.Modality = "CT"
        ds.Manufacturer = "pacslab synthetic"
        ds.InstitutionName = "Provincial General Hospital"
        ds.ReferringPhysicianName = "TRAN^THI BINH"
        ds.StudyDescription = "CT CHEST W CONTRAST"
        ds.SeriesDescription = "AXIAL 1.25mm"
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "M"
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = f"{spacing:g}"
        ds.SpacingBetweenSlices = f"{spacing:g}"
        ds.KVP = "120"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 2
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [f"{origin_x:.4f}", f"{origin_y:.4f}", f"{-i * spacing:.4f}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{-i * spacing:.4f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = columns
        ds.PixelSpacing = [f"{pixel_spacing:g}", f"{pixel_spacing:g}"]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.WindowCenter = ["40", "-600"]
        ds.WindowWidth = ["400", "1500"]
        ds.WindowCenterWidthExplanation = ["ABDOMEN", "LUNG"]
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.PixelData = stored.tobytes()
        ds["PixelData"].VR = "OW"
        yield ds


def write_ct_series(
    directory: Path, slices: int = 120, rows: int = 512, columns: int = 512, **kwargs: str
) -> list[Path]:
    """Write a series as Part-10 files ``directory/CT_000001.dcm`` …; return the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(ct_series(slices, rows, columns, **kwargs)):
        path = directory / f"CT_{i + 1:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_projection_image(
    path: Path,
    rows: int,
    columns: int,
    band: Callable[[int, int], np.ndarray],
    *,
    samples_per_pixel: int = 1,
    modality: str = "DX",
    pixel_spacing_mm: float = 0.1,
    band_rows: int = 1024,
) -> Path:
    """Write a large single-frame 2-D image (DX, or RGB secondary capture) by row bands.

    ``band(r0, r1)`` returns rows ``r0:r1`` as uint16 ``(n, columns)`` for greyscale
    or uint8 ``(n, columns, 3)`` for RGB. Pixel Data is streamed after the header,
    so images larger than memory (30000² RGB) can be written. Explicit VR Little
    Endian; Digital X-Ray (PS3.3 A.26) or Secondary Capture (PS3.3 A.8) without
    patient geometry, as projection radiographs and whole-slide captures come.
    """
    from pydicom.uid import DigitalXRayImageStorageForPresentation, SecondaryCaptureImageStorage

    rgb = samples_per_pixel == 3
    sop_class = SecondaryCaptureImageStorage if rgb else DigitalXRayImageStorageForPresentation
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT" if rgb else modality
    ds.PatientName = "TEST^PLANE"
    ds.PatientID = "SYN0002"
    ds.SamplesPerPixel = samples_per_pixel
    ds.PhotometricInterpretation = "RGB" if rgb else "MONOCHROME2"
    if rgb:
        ds.PlanarConfiguration = 0
    ds.Rows = rows
    ds.Columns = columns
    ds.ImagerPixelSpacing = [f"{pixel_spacing_mm:g}", f"{pixel_spacing_mm:g}"]
    bits = 8 if rgb else 16
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    length = rows * columns * samples_per_pixel * bits // 8
    with open(path, "ab") as fp:
        # (7FE0,0010) OB/OW, explicit VR little endian: tag, VR, 2 reserved, UL length.
        fp.write(b"\xe0\x7f\x10\x00" + (b"OB" if rgb else b"OW") + b"\x00\x00"
                 + int(length + length % 2).to_bytes(4, "little"))
        dtype = np.uint8 if rgb else np.dtype("<u2")
        for r0 in range(0, rows, band_rows):
            r1 = min(rows, r0 + band_rows)
            fp.write(np.ascontiguousarray(band(r0, r1), dtype=dtype).tobytes())
        if length % 2:
            fp.write(b"\x00")
    return path
