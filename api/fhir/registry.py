"""Every FHIR resource this server serves, with its search parameters (one registry).

The routes parse their searches with these specs (:func:`api.fhir.parse_search`) and
``/fhir/metadata`` is generated from them (:func:`api.fhir.capability_statement`),
so a parameter is advertised exactly when a route accepts it. Definition URLs are the
FHIR R4 SearchParameter canonicals (http://hl7.org/fhir/R4/searchparameter-registry.html).
"""

from __future__ import annotations

from api.fhir._search import ResourceSpec, SearchParam

__all__ = [
    "AUDIT_EVENT",
    "DIAGNOSTIC_REPORT",
    "ENDPOINT",
    "IMAGING_STUDY",
    "OBSERVATION",
    "PATIENT",
    "RESOURCES",
    "SERVICE_REQUEST",
]

_SP = "http://hl7.org/fhir/SearchParameter/"
_READ_SEARCH = ("read", "search-type")


def _p(name: str, kind: str, definition: str, doc: str, *mods: str) -> SearchParam:
    return SearchParam(name, kind, _SP + definition, doc, tuple(mods))  # type: ignore[arg-type]


_ID = _p("_id", "token", "Resource-id", "Logical id; comma-separated ids are ORed")
_LAST_UPDATED = _p(
    "_lastUpdated",
    "date",
    "Resource-lastUpdated",
    "When the server last changed the resource: eq (default), gt, ge, lt, le; "
    "partial dates (YYYY, YYYY-MM, YYYY-MM-DD) are ranges",
)
_PATIENT_DOC = (
    "Patient/[id], [id], or an absolute URL of this server; :identifier takes "
    "[system]|[value] of the Patient's identifier"
)

PATIENT = ResourceSpec(
    "Patient",
    # update: demographics (and identifier) from the record system; $merge: IHE PIR
    # patient merge (FHIR R5 Patient-merge, answered in R4), issue 17.
    (*_READ_SEARCH, "update"),
    (
        _ID,
        _LAST_UPDATED,
        _p("identifier", "token", "Patient-identifier", "Patient ID: [issuer system]|[id]"),
        _p(
            "name",
            "string",
            "Patient-name",
            "Starts any part of the name (family, given), case-insensitive",
        ),
        _p("family", "string", "individual-family", "Starts the family name, case-insensitive"),
        _p("birthdate", "date", "individual-birthdate", "Birth date (eq, gt, ge, lt, le)"),
        _p("gender", "token", "individual-gender", "male | female | other | unknown"),
    ),
    operations=(("merge", "http://hl7.org/fhir/OperationDefinition/Patient-merge"),),
    update_create=False,
    versioning="versioned-update",  # If-Match on PUT (issue 17)
)

IMAGING_STUDY = ResourceSpec(
    "ImagingStudy",
    _READ_SEARCH,
    (
        _ID,
        _LAST_UPDATED,
        _p("patient", "reference", "clinical-patient", _PATIENT_DOC, "identifier"),
        _p("subject", "reference", "ImagingStudy-subject", _PATIENT_DOC, "identifier"),
        _p(
            "identifier",
            "token",
            "clinical-identifier",
            "Accession Number (urn:pacslab:accession|[value]), or urn:dicom:uid|urn:oid:[UID]",
        ),
        _p("started", "date", "ImagingStudy-started", "Study Date (day precision)"),
        _p("modality", "token", "ImagingStudy-modality", "DICOM modality: [DCM system]|[code]"),
        _p(
            "status",
            "token",
            "ImagingStudy-status",
            "available (every stored study is); the other ImagingStudyStatus codes match none",
        ),
    ),
    includes=("ImagingStudy:subject", "ImagingStudy:patient"),
)

ENDPOINT = ResourceSpec("Endpoint", ("read",))

SERVICE_REQUEST = ResourceSpec(
    "ServiceRequest",
    ("read", "search-type", "create", "update"),
    (
        _ID,
        _LAST_UPDATED,
        _p("patient", "reference", "clinical-patient", _PATIENT_DOC, "identifier"),
        _p("subject", "reference", "ServiceRequest-subject", _PATIENT_DOC, "identifier"),
        _p("code", "token", "clinical-code", "Requested procedure: [system]|[code]"),
        _p("status", "token", "ServiceRequest-status", "active | completed | revoked"),
        _p(
            "identifier",
            "token",
            "clinical-identifier",
            "Placer order number (no system), Accession Number "
            "(urn:pacslab:accession|[value]) or urn:dicom:uid|urn:oid:[Study UID]",
        ),
        _p("authored", "date", "ServiceRequest-authored", "When the order was placed"),
    ),
    sorts=("_id", "_lastUpdated"),
    versioning="versioned-update",  # If-Match on PUT
)

_LAB_COMMON = (
    _ID,
    _LAST_UPDATED,
    _p("patient", "reference", "clinical-patient", _PATIENT_DOC, "identifier"),
    _p("subject", "reference", "{type}-subject", _PATIENT_DOC, "identifier"),
    _p("code", "token", "clinical-code", "Test code: http://loinc.org|[code] or the code alone"),
    _p("date", "date", "clinical-date", "When the result was performed"),
    _p(
        "specimen",
        "reference",
        "{type}-specimen",
        "Specimen; :identifier takes the specimen ID",
        "identifier",
    ),
    _p("_tag", "token", "Resource-tag", "urn:pacslab:lab-tag|critical or |qc"),
)


def _lab(type_: str) -> tuple[SearchParam, ...]:
    return tuple(
        SearchParam(
            p.name, p.type, p.definition.replace("{type}", type_), p.documentation, p.modifiers
        )
        for p in _LAB_COMMON
    )


OBSERVATION = ResourceSpec(
    "Observation",
    ("read", "vread", "history-instance", "search-type"),
    (
        *_lab("Observation"),
        _p("category", "token", "Observation-category", "laboratory (every lab result)"),
        _p(
            "status",
            "token",
            "Observation-status",
            "preliminary | final | corrected | cancelled | entered-in-error | unknown",
        ),
        _p(
            "based-on",
            "reference",
            "Observation-based-on",
            "ServiceRequest/[id]; :identifier takes the placer or filler order number",
            "identifier",
        ),
        _p("identifier", "token", "clinical-identifier", "urn:pacslab:lab-result|[id]"),
    ),
    sorts=("_id", "_lastUpdated", "-_lastUpdated", "date", "-date"),
)

DIAGNOSTIC_REPORT = ResourceSpec(
    "DiagnosticReport",
    ("read", "search-type"),
    (
        *_lab("DiagnosticReport"),
        _p("category", "token", "DiagnosticReport-category", "LAB (v2-0074; every lab report)"),
        _p(
            "status",
            "token",
            "DiagnosticReport-status",
            "registered | partial | preliminary | final | corrected | cancelled",
        ),
        _p(
            "based-on",
            "reference",
            "DiagnosticReport-based-on",
            "ServiceRequest/[id]: the order the report is linked to",
        ),
        _p(
            "identifier",
            "token",
            "clinical-identifier",
            "Specimen ID, placer or filler order number",
        ),
    ),
    sorts=("_id", "_lastUpdated", "-_lastUpdated"),
    includes=("DiagnosticReport:result",),
)

AUDIT_EVENT = ResourceSpec(
    "AuditEvent",
    ("search-type",),
    (
        _p(
            "patient",
            "reference",
            "AuditEvent-patient",
            "Keyed patient reference (32 hex digits), or the Patient ID as [issuer]|[id]",
        ),
        _p("agent", "reference", "AuditEvent-agent", "Who acted: token subject, apikey:[id], AE"),
        _p("date", "date", "AuditEvent-date", "When recorded (eq, gt, ge, lt, le)"),
    ),
    sorts=("date", "-date", "_id", "-_id"),
)

#: Every resource served, in CapabilityStatement order.
RESOURCES: tuple[ResourceSpec, ...] = (
    AUDIT_EVENT,
    DIAGNOSTIC_REPORT,
    ENDPOINT,
    IMAGING_STUDY,
    OBSERVATION,
    PATIENT,
    SERVICE_REQUEST,
)
