"""Which benchmark files measure which area (``./run bench AREA ...``).

A new benchmark file slots in by adding its name to its area here. Files that are
not there yet are ignored, so an area can be named before its first benchmark lands:
it reports "no benchmark in this area yet" instead of failing.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["AREAS", "area_of", "files_for"]

HERE = Path(__file__).resolve().parent

# area -> (what it measures, against which anchor; the files)
AREAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "ingest": ("C-STORE throughput vs Orthanc and DCMTK storescp, interleaved rounds",
               ("test_dicom_ingest.py",)),
    "pyramids": ("OME-Zarr pyramid build vs the codec-only limit; peak memory; tile reads",
                 ("test_pyramid_build.py",)),
    "tiles": ("IIIF tile latency over HTTP vs Orthanc /rendered", ("test_tiles_http.py",)),
    "worklist": ("Modality Worklist C-FIND vs DCMTK wlmscpfs", ("test_worklist_find.py",)),
    "lab": ("lab parse throughput; drop-to-visible latency vs Mirth's default poll",
            ("test_lab_parse.py", "test_lab_latency.py")),
    "query-retrieve": ("WADO-RS series metadata vs Orthanc + DICOMweb; QIDO-RS, C-FIND, "
                       "C-MOVE/C-GET to come", ("test_dicomweb_metadata.py",
                                                "test_query_retrieve.py")),
    "archive-scale": ("index and storage at archive scale", ("test_archive_scale.py",)),
    "patient-identity": ("patient merge to every answer (service level beside one study "
                         "query; HL7 A40 on pacslab serve to QIDO, C-FIND, FHIR, MWL, no anchor)",
                         ("test_patient_merge.py", "test_adt_merge.py")),
    "export": ("study export to ZIP with DICOMDIR (MB/s) vs Orthanc /archive and /media",
               ("test_study_export.py",)),
    "load": ("mixed load on one pacslab serve (modalities, analyzers, worklist, viewers)",
             ("test_load.py",)),
    "atna": ("ATNA syslog: request-path cost and delivery vs ATNA off and the chained log",
             ("test_atna_syslog.py",)),
}


def files_for(area: str, root: Path = HERE) -> list[Path]:
    """The area's benchmark files that exist (an unknown area raises KeyError)."""
    return [root / name for name in AREAS[area][1] if (root / name).is_file()]


def area_of(root: Path = HERE) -> dict[str, str]:
    """``benchmarks/<file>`` -> area, in the table's order (what the report groups by)."""
    return {f"{root.name}/{name}": area for area, (_, names) in AREAS.items()
            for name in names}
