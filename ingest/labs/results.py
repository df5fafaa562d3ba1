"""From parsed messages to stored results, summaries and reason files (pure).

Decisions made here, each a function over values:

- which *series* a result continues (:func:`series_key`): a result for the same
  specimen, test (code, system, HL7 OBX-4 sub-ID; for ASTM the whole universal test
  ID R.3, whose extra components name the result kind on e.g. ARCHITECT) as an
  earlier one is its next version, whether it says so (HL7 v2.5.1 OBX-11 ``C``,
  ASTM E1394 R.9 ``C``) or is simply re-sent. Two results with the same key inside
  one message are different results (their occurrence number tells them apart).
  QC runs are keyed by run time too: tomorrow's QC is not a correction of today's.
- which group (FHIR DiagnosticReport) a result joins (:func:`report_key`): its order
  (HL7 OBR-2 placer, else OBR-3 filler), else its specimen/sample ID (ASTM O.3).
  The group's code is the ordered panel (HL7 OBR-4, ASTM O.5 with one test).
- whose result it is: the patient (PID-3 with its assigning authority PID-3.4, ASTM
  P record) travels with each result; the store keeps the patient in the result's
  identity (a series already reported for another patient is held, never continued,
  see ``storage/index/lab.py``).
- whether a value is critical (:func:`critical_reason`): per-test limits from the
  settings, or the analyzer's panic flags ``HH``/``LL`` (HL7 v2.5.1 table 0078).
- what ``processed/<name>.summary.json`` and ``rejected/<name>.error.json`` say.

Nothing here reads or writes files or the database.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from core.errors import LabMessageError
from core.settings import LabCriticalLimit
from ingest.labs._values import parse_number
from ingest.labs.model import LabMessage, LabObservation, LabOrder, ParseResult
from storage.lab import NewLabReport, NewLabResult

__all__ = [
    "PANIC_FLAGS",
    "critical_reason",
    "error_report",
    "plan_results",
    "report_key",
    "series_key",
    "short_id",
    "summary",
]

#: HL7 v2.5.1 table 0078: ``LL`` below lower panic limits, ``HH`` above upper.
PANIC_FLAGS = frozenset({"HH", "LL"})


def short_id(key: str) -> str:
    """A FHIR id (R4 §2.24.0.1 ``id``: ``[A-Za-z0-9\\-\\.]{1,64}``) for a key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]


def series_key(
    obs: LabObservation,
    *,
    fmt: str,
    sample: str,
    occurrence: int,
    file_sha256: str,
    position: int,
) -> str:
    """The identity a result keeps across corrections and re-sends.

    Parameters
    ----------
    obs : LabObservation
    fmt : str
        Format the file was read as; for ASTM the raw test ID takes part.
    sample : str
        Specimen ID, else filler/placer order number. Empty means the result can
        never be matched again, so it is keyed by file and position.
    occurrence : int
        How many results with the same key came before it in its message.
    """
    if not sample:
        return f"file|{file_sha256}|{position}"
    variant = obs.test_raw if fmt == "astm" else ""
    run = obs.performed_at.isoformat() if obs.is_qc and obs.performed_at else ""
    qc = "qc" if obs.is_qc else "pt"
    return "|".join(
        (qc, sample, obs.test.system, obs.test.code, obs.sub_id, variant, run, str(occurrence))
    )


def report_key(*, is_qc: bool, sample: str, placer: str, filler: str, fallback: str) -> str:
    """The group (one order, else one specimen) a result is reported in."""
    qc = "qc" if is_qc else "pt"
    if placer:
        return f"{qc}|placer|{placer}"
    if filler:
        return f"{qc}|filler|{filler}"
    if sample:
        return f"{qc}|specimen|{sample}"
    return f"{qc}|{fallback}"


def critical_reason(obs: LabObservation, limits: Mapping[str, LabCriticalLimit]) -> str:
    """Why ``obs`` is a critical value, or ``""``.

    Limits are looked up by the sender's test code, then by any alternate code
    (LOINC). A value with a comparator counts only when it is beyond the limit
    whatever the true value (``>8`` against a high limit of 7 is critical, ``<8``
    is not). A value kept as text is read as a number here when it is one
    (``7,85``), so no critical value escapes because of how it was written. QC
    results are never critical: they belong to no patient.
    """
    if obs.is_qc:
        return ""
    panic = [f for f in obs.flags if f in PANIC_FLAGS]
    if panic:
        return f"flag {panic[0]}"
    limit = None
    for coding in (obs.test, *obs.test_alternates):
        limit = limits.get(coding.code)
        if limit is not None:
            break
    if limit is None:
        return ""
    value, comp = obs.value, obs.comparator
    if value is None and obs.coded_value is None:
        # "however it was written" (issue 18): a number the parser kept as text
        # (HL7 ST, a profile that reads commas as text, ``7,85``) is still a
        # number to a clinician; read it leniently here, for the alert only.
        value, comp = parse_number(obs.text, decimal_comma="auto")
    if value is None:
        return ""
    if limit.high is not None and (
        (comp is None and value > limit.high) or (comp in (">", ">=") and value >= limit.high)
    ):
        return f"above critical high {limit.high:g}"
    if limit.low is not None and (
        (comp is None and value < limit.low) or (comp in ("<", "<=") and value <= limit.low)
    ):
        return f"below critical low {limit.low:g}"
    return ""


def _order(msg: LabMessage, obs: LabObservation) -> LabOrder | None:
    if obs.order_index is not None and obs.order_index < len(msg.orders):
        return msg.orders[obs.order_index]
    return None


def _sample(msg: LabMessage, obs: LabObservation) -> tuple[str, str, str]:
    placer = filler = ""
    order = _order(msg, obs)
    if order is not None:
        placer, filler = order.placer_order_id, order.filler_order_id
    return obs.specimen_id or filler or placer, placer, filler


def _local(value: datetime | None, zone: ZoneInfo) -> datetime | None:
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=zone)


def plan_results(
    parsed: ParseResult,
    *,
    file_sha256: str,
    fmt: str,
    analyzer: str = "",
    patient_issuer: str = "",
    critical: Mapping[str, LabCriticalLimit] | None = None,
    local_timezone: str = "UTC",
) -> list[NewLabResult]:
    """Turn every observation of a parsed file into a result to store.

    Parameters
    ----------
    parsed : ParseResult
    file_sha256 : str
        Hash of the file's bytes (keys results that have no specimen).
    fmt : str
        The format the file was read as (``"astm"``, ``"hl7v2"``…).
    analyzer : str
        The profile's analyzer name, for messages that name no sender.
    patient_issuer : str
        The profile's issuer of Patient IDs, for patients whose message names none
        (HL7 PID-3.4 wins; without either the store applies the hospital's).
    critical : mapping of test code to LabCriticalLimit
    local_timezone : str
        IANA zone of analyzer clocks that send no offset.
    """
    zone = ZoneInfo(local_timezone)
    limits = critical or {}
    out: list[NewLabResult] = []
    position = 0
    for message_index, msg in enumerate(parsed.messages):
        seen: Counter[str] = Counter()
        for obs in msg.observations:
            sample, placer, filler = _sample(msg, obs)
            base = series_key(
                obs,
                fmt=fmt,
                sample=sample,
                occurrence=0,
                file_sha256=file_sha256,
                position=position,
            )
            occurrence = seen[base]
            seen[base] += 1
            key = series_key(
                obs,
                fmt=fmt,
                sample=sample,
                occurrence=occurrence,
                file_sha256=file_sha256,
                position=position,
            )
            patient = None
            index = obs.patient_index
            if not obs.is_qc and index is not None and index < len(msg.patients):
                patient = msg.patients[index]
            sender = msg.sender or analyzer
            order = _order(msg, obs)
            panel = order.panel if order is not None else None
            report = NewLabReport(
                report_id=short_id(
                    report_key(
                        is_qc=obs.is_qc,
                        sample=sample,
                        placer=placer,
                        filler=filler,
                        fallback=f"file|{file_sha256}|{message_index}|{obs.order_index}",
                    )
                ),
                specimen_id=obs.specimen_id,
                placer_order_id=placer,
                filler_order_id=filler,
                patient_id=patient.patient_id if patient else "",
                patient_issuer=(patient.issuer or patient_issuer) if patient else "",
                patient_name=patient.name if patient else "",
                is_qc=obs.is_qc,
                analyzer=sender,
                order_code=panel.code if panel else "",
                order_system=panel.system if panel else "",
                order_display=panel.display if panel else "",
            )
            loinc = next((c for c in (obs.test, *obs.test_alternates) if c.system == "LN"), None)
            coded = obs.coded_value
            reason = critical_reason(obs, limits)
            out.append(
                NewLabResult(
                    observation_id=short_id(key),
                    report=report,
                    location=obs.where,
                    message_index=message_index,
                    position=position,
                    control_id=msg.control_id,
                    format=fmt,
                    analyzer=sender,
                    instrument_id=obs.instrument_id,
                    test_code=obs.test.code,
                    test_system=obs.test.system,
                    test_display=obs.test.display,
                    loinc=loinc.code if loinc else "",
                    loinc_display=loinc.display if loinc else "",
                    test_raw=obs.test_raw,
                    sub_id=obs.sub_id,
                    value_type=obs.value_type,
                    raw_value=obs.raw_value,
                    value_text=obs.text,
                    value=obs.value,
                    comparator=obs.comparator or "",
                    coded_value=f"{coded.code}^{coded.display}^{coded.system}" if coded else "",
                    unit=obs.unit,
                    ucum_unit=obs.ucum_unit or "",
                    reference_range=obs.reference_range,
                    reference_low=obs.reference_low,
                    reference_high=obs.reference_high,
                    flags=obs.flags,
                    status=obs.status.value if obs.status is not None else "",
                    status_code=obs.status_code,
                    specimen_id=obs.specimen_id,
                    placer_order_id=placer,
                    filler_order_id=filler,
                    performed_at=_local(obs.performed_at, zone),
                    is_qc=obs.is_qc,
                    patient_id=patient.patient_id if patient else "",
                    patient_issuer=(patient.issuer or patient_issuer) if patient else "",
                    patient_name=patient.name if patient else "",
                    patient_birth_date=(
                        patient.birth_date.isoformat() if patient and patient.birth_date else ""
                    ),
                    patient_sex=patient.sex if patient else "",
                    comments=obs.comments,
                    is_critical=bool(reason),
                    critical_reason=reason,
                )
            )
            position += 1
    return out


def summary(
    *,
    name: str,
    sha256: str,
    profile: str,
    fmt: str,
    parsed: ParseResult,
    results: list[NewLabResult],
) -> dict[str, Any]:
    """The parse summary written beside a processed file. Holds no patient data."""
    return {
        "status": "ingested",
        "file": name,
        "sha256": sha256,
        "profile": profile,
        "format": fmt,
        "messages": len(parsed.messages),
        "message_types": sorted({m.message_type for m in parsed.messages}),
        "results": len(results),
        "qc_results": sum(r.is_qc for r in results),
        "critical_results": sum(r.is_critical for r in results),
        "specimens": len({r.specimen_id for r in results if r.specimen_id}),
        "warnings": [str(w) for w in parsed.warnings],
    }


def error_report(
    exc: LabMessageError, *, name: str, sha256: str, profile: str, fmt: str | None
) -> dict[str, Any]:
    """The reason file written beside a rejected file: what, where and why."""
    return {
        "status": "rejected",
        "file": name,
        "sha256": sha256,
        "profile": profile,
        "format": fmt,
        "what": exc.title,
        "where": exc.where,
        "why": exc.reason,
    }
