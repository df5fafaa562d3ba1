"""FHIR R4 resources for imaging, built from index rows (pure).

* ImagingStudy (http://hl7.org/fhir/R4/imagingstudy.html), with series and instances,
  identifiers for the Study Instance UID (``urn:dicom:uid``) and the Accession Number
  (type ACSN), and an Endpoint to the DICOMweb base (``dicom-wado-rs``);
* Patient (http://hl7.org/fhir/R4/patient.html), the minimum the index knows;
* Endpoint for the DICOMweb service.

DICOM attribute to FHIR element mappings follow the ImagingStudy mapping table of
FHIR R4 and DICOM PS3.16 for modality codes (system DCM). Rows are the dicts returned
by :meth:`storage.index.sql.SqlIndex.find`, keyed by DICOM keyword.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import quote, unquote

from api.fhir._core import fhir_instant

__all__ = [
    "ACCESSION_SYSTEM",
    "DCM_SYSTEM",
    "DICOM_UID_SYSTEM",
    "ENDPOINT_ID",
    "dicomweb_endpoint",
    "imaging_study",
    "issuer_for_system",
    "patient",
    "patient_system",
    "viewer_endpoint",
]

#: Identifier.system for DICOM UIDs (FHIR R4 ImagingStudy.identifier, value ``urn:oid:``).
DICOM_UID_SYSTEM = "urn:dicom:uid"
#: DICOM Controlled Terminology (PS3.16) for modality codes.
DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
#: Our Identifier.system for Accession Numbers (the index keeps no issuer for them).
ACCESSION_SYSTEM = "urn:pacslab:accession"
_V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
_ISSUER_PREFIX = "urn:pacslab:issuer:"
_OID = re.compile(r"[0-2](\.(0|[1-9]\d*))+")
ENDPOINT_ID = "dicomweb"
#: The contained Endpoint of an ImagingStudy that opens it in the diagnostic viewer.
VIEWER_ENDPOINT_ID = "ohif"


def patient_system(issuer: str) -> str | None:
    """Identifier.system for an Issuer of Patient ID (PS3.3 C.7.1.1), None if none."""
    if not issuer or issuer.startswith("study:"):
        return None
    if issuer.startswith(("urn:", "http://", "https://")):
        return issuer
    if _OID.fullmatch(issuer):
        return f"urn:oid:{issuer}"
    return _ISSUER_PREFIX + quote(issuer, safe="")


def issuer_for_system(system: str) -> str:
    """The inverse of :func:`patient_system` (``""`` for no system)."""
    if system.startswith(_ISSUER_PREFIX):
        return unquote(system.removeprefix(_ISSUER_PREFIX))
    if system.startswith("urn:oid:") and _OID.fullmatch(system.removeprefix("urn:oid:")):
        return system.removeprefix("urn:oid:")
    return system


def _fhir_date(da: str) -> str | None:
    """DICOM DA (YYYYMMDD, PS3.5 6.2) to FHIR date; None if malformed."""
    if not re.fullmatch(r"\d{8}", da or ""):
        return None
    try:
        datetime.strptime(da, "%Y%m%d")
    except ValueError:
        return None
    return f"{da[:4]}-{da[4:6]}-{da[6:]}"


def _human_name(pn: str) -> dict[str, Any] | None:
    """The alphabetic group of a PN (PS3.5 6.2.1) as a HumanName."""
    alphabetic = (pn or "").split("=")[0]
    if not alphabetic.strip():
        return None
    parts = (alphabetic.split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (p.strip() for p in parts)
    name: dict[str, Any] = {"use": "official"}
    if family:
        name["family"] = family
    givens = [g for g in (*given.split(" "), *middle.split(" ")) if g]
    if givens:
        name["given"] = givens
    if prefix:
        name["prefix"] = [prefix]
    if suffix:
        name["suffix"] = [suffix]
    name["text"] = " ".join(p for p in (prefix, given, middle, family, suffix) if p)
    return name


_GENDER = {"M": "male", "F": "female", "O": "other"}


def patient(row: Mapping[str, Any]) -> dict[str, Any]:
    """A Patient from a patient-level row (``patient_pk``, PatientID, PatientName …)."""
    res: dict[str, Any] = {"resourceType": "Patient", "id": str(row["patient_pk"])}
    updated = row.get("patient_updated_at")
    if isinstance(updated, datetime):
        res["meta"] = {"lastUpdated": fhir_instant(updated)}
    if row.get("PatientID"):
        ident: dict[str, Any] = {
            "use": "usual",
            "type": {"coding": [{"system": _V2_0203, "code": "MR"}]},
            "value": row["PatientID"],
        }
        system = patient_system(row.get("IssuerOfPatientID") or "")
        if system:
            ident["system"] = system
        res["identifier"] = [ident]
    name = _human_name(row.get("PatientName") or "")
    if name:
        res["name"] = [name]
    sex = (row.get("PatientSex") or "").strip().upper()
    if sex:
        res["gender"] = _GENDER.get(sex, "unknown")
    birth = _fhir_date(row.get("PatientBirthDate") or "")
    if birth:
        res["birthDate"] = birth
    return res


def dicomweb_endpoint(dicomweb_base: str) -> dict[str, Any]:
    """The Endpoint every ImagingStudy points to (FHIR R4 endpoint.html)."""
    return {
        "resourceType": "Endpoint",
        "id": ENDPOINT_ID,
        "status": "active",
        "connectionType": {
            "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
            "code": "dicom-wado-rs",
        },
        "name": "pacslab DICOMweb (WADO-RS, QIDO-RS, STOW-RS)",
        "payloadType": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/endpoint-payload-type",
                        "code": "any",
                    }
                ],
                "text": "DICOM",
            }
        ],
        "payloadMimeType": ["application/dicom"],
        "address": dicomweb_base,
    }


def _modality(code: str) -> dict[str, str]:
    return {"system": DCM_SYSTEM, "code": code}


def viewer_endpoint(url: str) -> dict[str, Any]:
    """A contained Endpoint that opens the study in the diagnostic viewer (OHIF): IHE
    Invoke Image Display (``ihe-iid``, endpoint-connection-type), an HTML page."""
    return {
        "resourceType": "Endpoint",
        "id": VIEWER_ENDPOINT_ID,
        "status": "active",
        "connectionType": {
            "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
            "code": "ihe-iid",
        },
        "name": "pacslab diagnostic viewer (OHIF) for this study",
        "payloadType": [{"text": "DICOM"}],
        "payloadMimeType": ["text/html"],
        "address": url,
    }


def imaging_study(
    study: Mapping[str, Any],
    series_rows: Sequence[Mapping[str, Any]],
    instance_rows: Sequence[Mapping[str, Any]],
    *,
    viewer_url: str | None = None,
) -> dict[str, Any]:
    """An ImagingStudy from a study row and its series and instance rows.

    ``viewer_url``: the page that opens this study in the diagnostic viewer; it becomes
    a second, contained Endpoint (R4 ImagingStudy.endpoint), beside the DICOMweb one.

    ``started`` is the Study Date only: the index keeps no Timezone Offset From UTC,
    and a FHIR dateTime with a time must carry a zone (FHIR R4 datatypes dateTime).
    """
    uid = study["StudyInstanceUID"]
    res: dict[str, Any] = {"resourceType": "ImagingStudy", "id": uid}
    updated = study.get("study_updated_at")
    if isinstance(updated, datetime):
        res["meta"] = {"lastUpdated": fhir_instant(updated)}
    identifiers: list[dict[str, Any]] = [
        {"use": "official", "system": DICOM_UID_SYSTEM, "value": f"urn:oid:{uid}"}
    ]
    if study.get("AccessionNumber"):
        identifiers.append(
            {
                "use": "usual",
                "type": {"coding": [{"system": _V2_0203, "code": "ACSN"}]},
                "system": ACCESSION_SYSTEM,
                "value": study["AccessionNumber"],
            }
        )
    res["identifier"] = identifiers
    res["status"] = "available"
    modalities = [m for m in (study.get("ModalitiesInStudy") or "").split("\\") if m]
    if modalities:
        res["modality"] = [_modality(m) for m in sorted(set(modalities))]
    res["subject"] = {"reference": f"Patient/{study['patient_pk']}"}
    started = _fhir_date(study.get("StudyDate") or "")
    if started:
        res["started"] = started
    res["endpoint"] = [{"reference": f"Endpoint/{ENDPOINT_ID}"}]
    if viewer_url:
        res["contained"] = [viewer_endpoint(viewer_url)]
        res["endpoint"].append({"reference": f"#{VIEWER_ENDPOINT_ID}"})
    res["numberOfSeries"] = int(study.get("NumberOfStudyRelatedSeries") or len(series_rows))
    res["numberOfInstances"] = int(study.get("NumberOfStudyRelatedInstances") or len(instance_rows))
    if study.get("StudyDescription"):
        res["description"] = study["StudyDescription"]
    by_series: dict[str, list[Mapping[str, Any]]] = {}
    for inst in instance_rows:
        by_series.setdefault(inst["SeriesInstanceUID"], []).append(inst)
    out_series = []
    for se in series_rows:
        item: dict[str, Any] = {
            "uid": se["SeriesInstanceUID"],
            "modality": _modality(se.get("Modality") or "OT"),
        }
        if se.get("SeriesNumber") is not None:
            item["number"] = int(se["SeriesNumber"])
        if se.get("SeriesDescription"):
            item["description"] = se["SeriesDescription"]
        members = by_series.get(se["SeriesInstanceUID"], [])
        item["numberOfInstances"] = int(se.get("NumberOfSeriesRelatedInstances") or len(members))
        if se.get("BodyPartExamined"):
            item["bodySite"] = {"display": se["BodyPartExamined"]}
        series_started = _fhir_date(se.get("SeriesDate") or "")
        if series_started:
            item["started"] = series_started
        instances_out = []
        for inst in members:
            entry: dict[str, Any] = {
                "uid": inst["SOPInstanceUID"],
                "sopClass": {
                    "system": "urn:ietf:rfc:3986",
                    "code": f"urn:oid:{inst['SOPClassUID']}",
                },
            }
            if inst.get("InstanceNumber") is not None:
                entry["number"] = int(inst["InstanceNumber"])
            instances_out.append(entry)
        if instances_out:
            item["instance"] = instances_out
        out_series.append(item)
    if out_series:
        res["series"] = out_series
    return res
