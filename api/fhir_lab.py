"""Lab results as FHIR R4 ``Observation`` and ``DiagnosticReport`` (pure mapping).

Stored results (:class:`storage.lab.StoredLabResult`) become JSON dicts shaped as
FHIR R4 (4.0.1) resources; the routes in ``api/routes/fhir_lab.py`` only fetch and
wrap them. Search parameters are parsed here too, so the rules are tested without
HTTP.

Choices, each tied to the specification:

- ``Observation.id`` is the *logical* result, ``meta.versionId`` its version: a
  correction is version 2 of the same id and version 1 stays readable at
  ``Observation/<id>/_history/1`` (R4 §3.1.0.1.5 ``vread``).
- The subject is ``Patient/<pk>``, the Patient resource of the ``patients`` row
  imaging shares (``/fhir/Patient``), with its identifier (system from the issuer,
  as :func:`api.fhir.imaging.patient_system` derives it) beside the reference (R4
  §2.3.0.1: reference and identifier may both be given). Specimens are logical
  references by identifier.
- ``basedOn`` is ``ServiceRequest/<id>`` when the group was matched to an order
  (placer/filler number and patient); absent otherwise: an order number nobody
  placed here is no reference (it stays in DiagnosticReport.identifier).
- DiagnosticReport.code is the ordered panel (HL7 OBR-4, ASTM O.5); LOINC 11502-2
  "Laboratory report" only when the message names none.
- A result held because its specimen/test was reported for another patient first
  (issue 14) has status ``preliminary`` ("data may be incomplete or unverified"):
  its patient is unverified, so it must not read as ``final``; ``entered-in-error``
  would claim the result is wrong, which nobody has decided yet. It carries
  ``meta.tag`` ``needs-review`` (searchable, ``_tag``). Once resolved, a withdrawn
  version reads ``entered-in-error``.
- Numbers go to ``valueQuantity`` with UCUM (``http://unitsofmeasure.org``) when the
  unit is known and the comparator kept (``<``, ``>``…, R4 Quantity.comparator);
  coded answers (HL7 CE/CWE) to ``valueCodeableConcept``; anything else to
  ``valueString``. The value exactly as sent stays in an extension.
- Abnormal flags (HL7 v2.5.1 table 0078, ASTM E1394 R.7) map to
  ``v3-ObservationInterpretation``, whose codes they share; others are kept as text.
- Critical and QC results carry a ``meta.tag`` (``_tag`` search, R4 §3.1.1.5.6),
  which with ``_lastUpdated`` is the change feed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from api.fhir.imaging import patient_system
from core.errors import InvalidQueryError
from storage.lab import DateBound, StoredLabReport, StoredLabResult
from storage.lab import report_status as lab_report_status

__all__ = [
    "CODE_SYSTEM_PREFIX",
    "LOINC",
    "TAG_SYSTEM",
    "UCUM",
    "diagnostic_report",
    "history_bundle",
    "observation",
    "parse_date",
    "parse_token",
    "report_status",
    "system_uri",
]

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
#: Our local code systems: ``urn:pacslab:lab-code:<sender's system name>``.
CODE_SYSTEM_PREFIX = "urn:pacslab:lab-code:"
TAG_SYSTEM = "urn:pacslab:lab-tag"
RESULT_ID_SYSTEM = "urn:pacslab:lab-result"
RAW_VALUE_URL = "urn:pacslab:fhir:StructureDefinition:lab-raw-value"
_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
_V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
_V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
_INTERPRETATION_CODES = frozenset(
    {
        "H",
        "L",
        "HH",
        "LL",
        "N",
        "A",
        "AA",
        "<",
        ">",
        "U",
        "D",
        "B",
        "W",
        "S",
        "R",
        "I",
        "NEG",
        "POS",
    }
)
_STATUS = {
    "preliminary": "preliminary",
    "final": "final",
    "corrected": "corrected",
    "cancelled": "cancelled",
    "entered-in-error": "entered-in-error",
}
#: Review states that make a result ``preliminary`` with a ``needs-review`` tag.
_HELD = "conflict"
_DEFAULT_REPORT_CODE = {
    "coding": [{"system": LOINC, "code": "11502-2", "display": "Laboratory report"}],
    "text": "Laboratory report",
}


def system_uri(system: str) -> str:
    """FHIR code system URI for a sender's coding system name (HL7 table 0396)."""
    if system == "LN":
        return LOINC
    return CODE_SYSTEM_PREFIX + (system or "local")


def parse_token(value: str) -> tuple[str | None, str]:
    """Read a FHIR token (``[system|]code``, R4 §3.1.1.5.2) as ``(system name, code)``.

    ``http://loinc.org|2345-7`` → ``("LN", "2345-7")``; a bare code matches any
    system (``None``).

    Raises
    ------
    InvalidQueryError
        For an empty code or a system we do not know.
    """
    system, bar, code = value.partition("|")
    if not bar:
        system, code = "", value
    if not code:
        raise InvalidQueryError(f"token {value!r} has no code")
    if not bar or not system:
        return None, code
    if system == LOINC:
        return "LN", code
    if system.startswith(CODE_SYSTEM_PREFIX):
        return system.removeprefix(CODE_SYSTEM_PREFIX), code
    raise InvalidQueryError(
        f"unknown code system {system!r}: use {LOINC} or {CODE_SYSTEM_PREFIX}<name>"
    )


_DATE = re.compile(
    r"^(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<H>\d{2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?:\.(?P<f>\d{1,6}))?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)


def parse_date(value: str) -> tuple[DateBound, ...]:
    """Read one FHIR date search value (R4 §3.1.1.5.1) as bounds on an instant.

    The value names a range (``2024`` is the whole year, ``2024-03-15T08:15`` one
    minute); the prefix compares the stored instant with it: ``eq`` (default)
    within, ``gt``/``sa`` after its end, ``ge`` from its start, ``lt``/``eb``
    before its start, ``le`` up to its end. Values without an offset are UTC.

    Raises
    ------
    InvalidQueryError
        For an unknown prefix (``ne`` and ``ap`` are not supported) or a bad date.
    """
    value = value.replace(" ", "+")  # "+01:00" arrives as " 01:00" when not escaped
    prefix, text = "eq", value
    if len(value) > 2 and value[:2].isalpha():
        prefix, text = value[:2], value[2:]
    match = _DATE.match(text)
    if match is None:
        raise InvalidQueryError(f"date {value!r} is not a FHIR date, dateTime or instant")
    g = match.groupdict()
    try:
        start = datetime(
            int(g["y"]),
            int(g["m"] or 1),
            int(g["d"] or 1),
            int(g["H"] or 0),
            int(g["M"] or 0),
            int(g["S"] or 0),
            int((g["f"] or "0").ljust(6, "0")),
            tzinfo=UTC,
        )
    except ValueError as exc:
        raise InvalidQueryError(f"date {value!r} is not a valid date") from exc
    if g["tz"] and g["tz"] != "Z":
        sign = 1 if g["tz"][0] == "+" else -1
        hours, minutes = int(g["tz"][1:3]), int(g["tz"][4:6])
        start -= sign * timedelta(hours=hours, minutes=minutes)
    if g["f"]:
        end = start + timedelta(microseconds=10 ** (6 - len(g["f"])))
    elif g["S"]:
        end = start + timedelta(seconds=1)
    elif g["M"]:
        end = start + timedelta(minutes=1)
    elif g["d"]:
        end = start + timedelta(days=1)
    elif g["m"]:
        month = start.month % 12 + 1
        end = start.replace(year=start.year + (start.month == 12), month=month)
    else:
        end = start.replace(year=start.year + 1)
    bounds: dict[str, tuple[DateBound, ...]] = {
        "eq": (("ge", start), ("lt", end)),
        "gt": (("ge", end),),
        "sa": (("ge", end),),
        "ge": (("ge", start),),
        "lt": (("lt", start),),
        "eb": (("lt", start),),
        "le": (("lt", end),),
    }
    if prefix not in bounds:
        raise InvalidQueryError(
            f"date prefix {prefix!r} is not supported (eq, gt, ge, lt, le, sa, eb)"
        )
    return bounds[prefix]


def _instant(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _date_time(value: datetime) -> str:
    # Keep the sender's offset: FHIR dateTime allows any offset (R4 §2.24.0.1).
    return value.isoformat()


def _code(result: StoredLabResult) -> dict[str, Any]:
    codings = []
    if not (result.test_system == "LN" and result.loinc == result.test_code):
        codings.append(
            _drop_empty(
                {
                    "system": system_uri(result.test_system),
                    "code": result.test_code,
                    "display": result.test_display,
                }
            )
        )
    if result.loinc:
        codings.append(
            _drop_empty({"system": LOINC, "code": result.loinc, "display": result.loinc_display})
        )
    return {"coding": codings, "text": result.test_display or result.test_code}


def _drop_empty(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v not in ("", None, [], {})}


def _quantity(result: StoredLabResult, value: float | None) -> dict[str, Any] | None:
    if value is None:
        return None
    out: dict[str, Any] = {"value": value}
    if result.unit:
        out["unit"] = result.unit
    if result.ucum_unit:
        out.update(system=UCUM, code=result.ucum_unit)
    return out


def _value(result: StoredLabResult) -> dict[str, Any]:
    if result.coded_value:
        code, display, system = ([*result.coded_value.split("^"), "", "", ""])[:3]
        return {
            "valueCodeableConcept": {
                "coding": [
                    _drop_empty({"system": system_uri(system), "code": code, "display": display})
                ],
                "text": display or code,
            }
        }
    if result.value is not None:
        quantity = _quantity(result, result.value)
        assert quantity is not None
        if result.comparator:
            quantity["comparator"] = result.comparator
        return {"valueQuantity": quantity}
    if result.value_text:
        return {"valueString": result.value_text}
    reason = "not-performed" if result.status == "cancelled" else "unknown"
    return {
        "dataAbsentReason": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/data-absent-reason",
                    "code": reason,
                }
            ]
        }
    }


def _interpretation(flags: Sequence[str]) -> list[dict[str, Any]]:
    out = []
    for flag in flags:
        if not flag:
            continue
        if flag in _INTERPRETATION_CODES:
            out.append({"coding": [{"system": _INTERPRETATION, "code": flag}], "text": flag})
        else:
            out.append({"text": flag})
    return out


def _tags(
    is_critical: bool, is_qc: bool, reason: str = "", *, held: bool = False
) -> list[dict[str, Any]]:
    tags = []
    if is_critical:
        tags.append({"system": TAG_SYSTEM, "code": "critical", "display": reason or "critical"})
    if is_qc:
        tags.append({"system": TAG_SYSTEM, "code": "qc", "display": "quality control"})
    if held:
        tags.append(
            {
                "system": TAG_SYSTEM,
                "code": "needs-review",
                "display": "specimen/test already reported for another patient",
            }
        )
    return tags


def _subject(
    patient_pk: int | None, patient_id: str, issuer: str, is_qc: bool
) -> dict[str, Any] | None:
    """``Patient/<pk>`` with the identifier; identifier only for rows older than 0005."""
    if is_qc or not patient_id:
        return None
    identifier: dict[str, Any] = {"value": patient_id}
    system = patient_system(issuer)
    if system:
        identifier = {"system": system, "value": patient_id}
    subject: dict[str, Any] = {"type": "Patient", "identifier": identifier}
    if patient_pk is not None:
        subject = {"reference": f"Patient/{patient_pk}", **subject}
    return subject


def _based_on(order_ref: str) -> list[dict[str, Any]]:
    if not order_ref.startswith("ServiceRequest/"):
        return []
    return [{"reference": order_ref, "type": "ServiceRequest"}]


def observation(result: StoredLabResult) -> dict[str, Any]:
    """One stored result version as a FHIR R4 ``Observation``."""
    meta: dict[str, Any] = {
        "versionId": str(result.version),
        "lastUpdated": _instant(result.updated_at),
    }
    held = result.review == _HELD
    tags = _tags(result.is_critical, result.is_qc, result.critical_reason, held=held)
    if tags:
        meta["tag"] = tags
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": result.observation_id,
        "meta": meta,
        "extension": [{"url": RAW_VALUE_URL, "valueString": result.raw_value}]
        if result.raw_value
        else [],
        "identifier": [{"system": RESULT_ID_SYSTEM, "value": result.observation_id}],
        "basedOn": _based_on(result.order_ref),
        "status": "preliminary" if held else _STATUS.get(result.status, "unknown"),
        "category": [
            {"coding": [{"system": _CATEGORY, "code": "laboratory", "display": "Laboratory"}]}
        ],
        "code": _code(result),
    }
    subject = _subject(result.patient_pk, result.patient_id, result.patient_issuer, result.is_qc)
    if subject:
        resource["subject"] = subject
    if result.performed_at is not None:
        resource["effectiveDateTime"] = _date_time(result.performed_at)
    resource["issued"] = _instant(result.created_at)
    resource.update(_value(result))
    resource["interpretation"] = _interpretation(result.flags)
    resource["note"] = [{"text": c} for c in result.comments if c]
    if (
        result.reference_range
        or result.reference_low is not None
        or result.reference_high is not None
    ):
        rng: dict[str, Any] = {}
        low = _quantity(result, result.reference_low)
        high = _quantity(result, result.reference_high)
        if low:
            rng["low"] = low
        if high:
            rng["high"] = high
        if result.reference_range:
            rng["text"] = result.reference_range
        resource["referenceRange"] = [rng]
    if result.specimen_id:
        resource["specimen"] = {
            "type": "Specimen",
            "identifier": {"value": result.specimen_id},
            "display": result.specimen_id,
        }
    device = result.instrument_id or result.analyzer
    if device:
        resource["device"] = {"display": device}
    return _drop_empty(resource)


def _report_code(report: StoredLabReport) -> dict[str, Any]:
    """The ordered panel (OBR-4 / ASTM O.5) as DiagnosticReport.code, else 11502-2."""
    if not report.order_code:
        return _DEFAULT_REPORT_CODE
    coding = _drop_empty(
        {
            "system": system_uri(report.order_system),
            "code": report.order_code,
            "display": report.order_display,
        }
    )
    return {"coding": [coding], "text": report.order_display or report.order_code}


def _order_identifier(code: str, value: str) -> dict[str, Any]:
    return {"type": {"coding": [{"system": _V2_0203, "code": code}]}, "value": value}


def report_status(results: Iterable[StoredLabResult]) -> str:
    """DiagnosticReport.status from its current results (R4 ValueSet diagnostic-report-status).

    The rules live in :func:`storage.lab.report_status`, which the store also keeps
    searchable; a held result makes the report ``preliminary`` rather than ``final``.
    """
    current = list(results)
    return lab_report_status(
        (r.status for r in current), held=any(r.review == _HELD for r in current)
    )


def diagnostic_report(
    report: StoredLabReport, results: Sequence[StoredLabResult]
) -> dict[str, Any]:
    """One result group (an order, else a specimen) as a FHIR R4 ``DiagnosticReport``.

    ``results`` are the group's current results.
    """
    identifiers = [
        _order_identifier(code, value)
        for code, value in (("PLAC", report.placer_order_id), ("FILL", report.filler_order_id))
        if value
    ]
    if report.specimen_id:
        identifiers.append({"system": "urn:pacslab:specimen", "value": report.specimen_id})
    performed = [r.performed_at for r in results if r.performed_at is not None]
    critical = any(r.is_critical for r in results)
    meta: dict[str, Any] = {"lastUpdated": _instant(report.updated_at)}
    tags = _tags(critical, report.is_qc, held=any(r.review == _HELD for r in results))
    if tags:
        meta["tag"] = tags
    resource: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": report.report_id,
        "meta": meta,
        "identifier": identifiers,
        "category": [
            {"coding": [{"system": _V2_0074, "code": "LAB", "display": "Laboratory"}]},
            # The generic LOINC document code the report used as its code: now a category.
            _DEFAULT_REPORT_CODE,
        ],
        "basedOn": _based_on(report.order_ref),
        "status": report_status(results),
        "code": _report_code(report),
        "issued": _instant(report.updated_at),
        "result": [
            {
                "reference": f"Observation/{r.observation_id}",
                "display": r.test_display or r.test_code,
            }
            for r in results
        ],
    }
    subject = _subject(report.patient_pk, report.patient_id, report.patient_issuer, report.is_qc)
    if subject:
        resource["subject"] = subject
    if performed:
        resource["effectiveDateTime"] = _date_time(max(performed))
    if report.specimen_id:
        resource["specimen"] = [
            {
                "type": "Specimen",
                "identifier": {"value": report.specimen_id},
                "display": report.specimen_id,
            }
        ]
    if report.analyzer:
        resource["performer"] = [{"display": report.analyzer}]
    return _drop_empty(resource)


def history_bundle(versions: Sequence[StoredLabResult], *, base: str) -> dict[str, Any]:
    """Every version of one result, newest first: a ``history`` Bundle (R4 §3.1.0.1.5)."""
    entries = []
    for version in versions:
        resource = observation(version)
        first = version.version == 1
        entries.append(
            {
                "fullUrl": f"{base}/Observation/{version.observation_id}",
                "resource": resource,
                "request": {
                    "method": "POST" if first else "PUT",
                    "url": "Observation" if first else f"Observation/{version.observation_id}",
                },
                "response": {
                    "status": "201 Created" if first else "200 OK",
                    "lastModified": _instant(version.updated_at),
                },
            }
        )
    return {"resourceType": "Bundle", "type": "history", "total": len(entries), "entry": entries}
