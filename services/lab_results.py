"""Lab results: filing, search, history and the review of held results (issues 5, 14, 18).

The use cases over the lab store, whatever the wire. The edges are thin shells
around them: the inbox watcher (``ingest/labs/watcher.py``: drop folders, moves,
reason files) and the analyzer links (``ingest/labs/links/`` through
:class:`services.analyzers.AnalyzerService`) file results here; the FHIR R4 routes
(``api/routes/fhir_lab.py``) and the review list (``api/routes/lab_review.py``) read
and settle them.

- **file** (:meth:`LabResultService.file`, then :meth:`~LabResultService.publish`):
  a parsed message or file becomes stored results (:func:`plan_results`, pure) in
  one transaction of the store's ``ingest_file``, which matches each result to its
  patient and its order and holds a result whose specimen and test were already
  reported for another patient (``storage/index/lab.py``). Publishing, once the edge
  has done its part (moved the file), writes the action log (one entry per patient,
  one per held result) and hands the new critical and held results to the webhook.
- **read** (:meth:`~LabResultService.search_results`, :meth:`~LabResultService.history`,
  :meth:`~LabResultService.search_reports`): FHIR R4 search and ``_history`` over the
  versioned results (HL7 v2.5.1 OBX-11 ``C``: a correction replaces, the earlier
  version is kept);
- **review** (:meth:`~LabResultService.conflicts`, :meth:`~LabResultService.resolve`):
  moving a specimen to another patient is an explicit act, written to the action log
  with what each affected result was before and after (versions, states and keyed
  patient references only: no identifier, no name).

The decisions are pure functions over values, kept apart from the service:

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
  identity (a series already reported for another patient is held, never continued).
- whether a value is critical (:func:`critical_reason`): per-test limits from the
  settings, or the analyzer's panic flags ``HH``/``LL`` (HL7 v2.5.1 table 0078).
- what ``processed/<name>.summary.json`` and ``rejected/<name>.error.json`` say
  (:func:`summary`, :func:`error_report`), and what the webhook announces
  (:func:`notices`: FHIR R4 Subscription "id-only" bodies, no patient data).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, Literal
from zoneinfo import ZoneInfo

from core.audit import AuditEntry, patient_key
from core.errors import LabMessageError
from core.lab_values import parse_number
from core.labs import LabMessage, LabObservation, LabOrder, ParseResult
from core.logging import correlation_id
from core.settings import LabCriticalLimit
from storage.audit import AuditLog
from storage.lab import (
    LabIngestOutcome,
    LabReportQuery,
    LabResolution,
    LabResultQuery,
    LabResultStore,
    NewLabFile,
    NewLabReport,
    NewLabResult,
    OrderLookup,
    StoredLabReport,
    StoredLabResult,
)

__all__ = [
    "PANIC_FLAGS",
    "LabFiling",
    "LabResultService",
    "LabSource",
    "conflict_notice",
    "critical_notice",
    "critical_reason",
    "error_report",
    "notices",
    "plan_results",
    "report_key",
    "resolution_json",
    "result_state",
    "series_key",
    "short_id",
    "summary",
]

logger = logging.getLogger(__name__)


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
            key_of = partial(
                series_key, obs, fmt=fmt, sample=sample, file_sha256=file_sha256,
                position=position,
            )
            base = key_of(occurrence=0)
            occurrence = seen[base]
            seen[base] += 1
            key = key_of(occurrence=occurrence)
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


def _notice(event: str, result: StoredLabResult, facts: Mapping[str, Any]) -> dict[str, Any]:
    """An "id-only" notice (FHIR R4 Subscription ``payload``) naming one Observation."""
    return {
        "event": event,
        "resourceType": "Observation",
        "id": result.observation_id,
        "reference": f"Observation/{result.observation_id}",
        "versionId": str(result.version),
        "lastUpdated": result.updated_at.isoformat(),
        **facts,
        "specimen": result.specimen_id,
        "analyzer": result.analyzer,
    }


def critical_notice(result: StoredLabResult) -> dict[str, Any]:
    """The JSON body announcing one critical result (pure, no patient data)."""
    return _notice("lab-result.critical", result, {
        "code": result.loinc or result.test_code,
        "system": "LN" if result.loinc else result.test_system,
        "value": result.value,
        "comparator": result.comparator or None,
        "unit": result.ucum_unit or result.unit,
        "reason": result.critical_reason,
    })


def conflict_notice(result: StoredLabResult) -> dict[str, Any]:
    """The JSON body announcing one held result (pure, no patient data).

    ``conflictsWith`` names the other patient's Observation of the same specimen and
    test (absent when only the order/specimen group was theirs).
    """
    body = _notice("lab-result.conflict", result, {
        "reason": "specimen/test already reported for another patient; held for review",
    })
    if result.conflict_with:
        body["conflictsWith"] = f"Observation/{result.conflict_with}"
    return body


def notices(result: StoredLabResult) -> list[dict[str, Any]]:
    """What to announce about a new result: critical value, held conflict, or both."""
    out = []
    if result.is_critical:
        out.append(critical_notice(result))
    if result.review == "conflict":
        out.append(conflict_notice(result))
    return out




def _patient_ref(pk: int | None) -> str | None:
    return f"Patient/{pk}" if pk is not None else None


def result_state(r: StoredLabResult | None) -> dict[str, Any] | None:
    """What the action log keeps of one result version: no patient data, only references."""
    if r is None:
        return None
    return {
        "observation": r.observation_id,
        "version": r.version,
        "review": r.review,
        "status": r.status,
        "patient": _patient_ref(r.patient_pk),
    }


def resolution_json(resolution: LabResolution) -> dict[str, Any]:
    """The choice and each affected result before and after (the log's and the reply's)."""
    return {
        "choice": resolution.choice,
        "held": {
            "before": result_state(resolution.held_before),
            "after": result_state(resolution.held_after),
        },
        "other": {
            "before": result_state(resolution.retired_before),
            "after": result_state(resolution.retired_after),
        },
    }




@dataclass(frozen=True, slots=True)
class LabSource:
    """Where results come from: one inbox profile or one analyzer link.

    Parameters
    ----------
    kind : ``"file"`` or ``"link"``
        The action log's event type is ``lab.<kind>``.
    name : str
        The profile's or the link's name: the agent of the action log (the device
        that wrote the results) and, for a link, the sender of its messages.
    origin : str
        Where they came from (``inbox/lab/<folder>``, ``link/<name>``): the log's source.
    profile : str
        The journal's profile of a filed file (``<profile>``, ``link:<name>``).
    analyzer : str
        The analyzer, for messages that name no sender (MSH-3/H.5).
    patient_issuer : str
        The issuer of Patient IDs for patients whose message names none (HL7 PID-3.4
        wins; without either the store applies the hospital's).
    """

    kind: Literal["file", "link"]
    name: str
    origin: str
    profile: str
    analyzer: str = ""
    patient_issuer: str = ""

    @classmethod
    def inbox(cls, profile: str, folder: str, *, analyzer: str = "", patient_issuer: str = "",
              ) -> LabSource:
        """The inbox folder ``folder`` bound to profile ``profile``."""
        return cls("file", profile, f"inbox/lab/{folder}", profile, analyzer, patient_issuer)

    @classmethod
    def link(cls, name: str) -> LabSource:
        """The analyzer link ``name`` (its messages are journaled as ``link:<name>``)."""
        return cls("link", name, f"link/{name}", f"link:{name}", name)


@dataclass(frozen=True, slots=True)
class LabFiling:
    """One file or message committed by :meth:`LabResultService.file`, to publish."""

    source: LabSource
    sha256: str
    format: str
    results: tuple[NewLabResult, ...]
    #: The summary journaled with the file (:func:`summary`).
    summary: Mapping[str, Any]
    outcome: LabIngestOutcome

    @property
    def filed_summary(self) -> dict[str, Any]:
        """The summary written beside the filed file: with what the commit found."""
        return dict(self.summary) | {
            "new_versions": self.outcome.new_versions,
            # issue 14: results of another patient's specimen/test, held for review
            "held_for_review": len(self.outcome.conflicts),
        }


class LabResultService:
    """File, read and settle lab results (thread-safe: the store is).

    Parameters
    ----------
    store : LabResultStore
        The versioned results (``storage.index.lab.SqlLabStore``).
    audit : AuditLog, optional
        The action log filings and resolutions are written to.
    patient_secret : bytes
        Keys the patient references of the log (:func:`core.audit.patient_key`).
    critical : mapping of test code to LabCriticalLimit
        Per-test critical limits (``LabSettings.critical``).
    local_timezone : str
        IANA zone of analyzer clocks that send no offset.
    announce : callable, optional
        Called with the new critical results and the results held as conflicts
        (``review == "conflict"``) after their commit; errors are logged, never
        raised (a side effect, STYLE.md §5).
    order_lookup : OrderLookup, optional
        Links results to a known order at filing; without it the store matches
        orders itself (placer/filler order number and the same patient).
    """

    def __init__(
        self,
        store: LabResultStore,
        *,
        audit: AuditLog | None = None,
        patient_secret: bytes = b"",
        critical: Mapping[str, LabCriticalLimit] | None = None,
        local_timezone: str = "UTC",
        announce: Callable[[tuple[StoredLabResult, ...]], None] | None = None,
        order_lookup: OrderLookup | None = None,
    ) -> None:
        self.store = store
        self.audit = audit
        self.patient_secret = patient_secret
        self.critical = dict(critical or {})
        self.local_timezone = local_timezone
        self.announce = announce
        self.order_lookup = order_lookup

    # -- file -------------------------------------------------------------------

    def file(
        self,
        parsed: ParseResult,
        *,
        sha256: str,
        name: str,
        fmt: str,
        source: LabSource,
        received_at: datetime | None = None,
    ) -> LabFiling:
        """Commit every result of a parsed file or message, with its journal entry.

        Returns once committed (the edge may then move the file or acknowledge the
        message); nothing is logged or announced before :meth:`publish`. Bytes
        already filed (same ``sha256``) come back with ``outcome.duplicate`` set and
        nothing written.
        """
        results = plan_results(
            parsed,
            file_sha256=sha256,
            fmt=fmt,
            analyzer=source.analyzer,
            patient_issuer=source.patient_issuer,
            critical=self.critical,
            local_timezone=self.local_timezone,
        )
        body = summary(
            name=name, sha256=sha256, profile=source.profile, fmt=fmt, parsed=parsed,
            results=results,
        )
        outcome = self.store.ingest_file(
            NewLabFile(
                sha256=sha256,
                name=name,
                profile=source.profile,
                format=fmt,
                message_count=len(parsed.messages),
                summary_json=json.dumps(body, ensure_ascii=False),
                received_at=received_at or datetime.now(UTC),
            ),
            results,
            order_lookup=self.order_lookup,
        )
        return LabFiling(source, sha256, fmt, tuple(results), body, outcome)

    def publish(self, filing: LabFiling) -> None:
        """Log, audit and announce a filing (nothing for a duplicate).

        One action-log entry per patient of the file (a search by patient finds it),
        or one without a patient for a file with none (QC only); one per held result;
        the new critical and held results to ``announce``.
        """
        outcome, source, sha = filing.outcome, filing.source, filing.sha256
        if outcome.duplicate:
            return
        logger.info(
            "lab results filed (%s %s, %s): %d results, %d corrections/re-sends, %d critical,"
            " %d held",
            source.kind, source.name, filing.format, outcome.results, outcome.new_versions,
            len(outcome.critical), len(outcome.conflicts),
        )
        results = filing.results
        per_patient = Counter(r.patient_id for r in results if r.patient_id and not r.is_qc)
        base = {"new_versions": outcome.new_versions, "qc_results": sum(r.is_qc for r in results)}
        for patient_id, count in sorted(per_patient.items()) or [("", len(results))]:
            self.record(source, sha, "0", "ingested", fmt=filing.format, patient_id=patient_id,
                        detail=base | {"results": count})
        for held in outcome.conflicts:  # issue 14: another patient's specimen/test, held
            self.record(source, sha, "4", "held: specimen/test of another patient",
                        fmt=filing.format, patient_id=held.patient_id,
                        detail={"observation": held.observation_id,
                                "conflicts_with": held.conflict_with})
        held_only = tuple(r for r in outcome.conflicts if not r.is_critical)
        if (outcome.critical or held_only) and self.announce is not None:
            try:
                self.announce(outcome.critical + held_only)
            except Exception:
                logger.error("announcing critical results failed", exc_info=True)

    def record(
        self,
        source: LabSource,
        sha256: str,
        outcome: str,
        desc: str,
        *,
        fmt: str | None,
        detail: Mapping[str, Any],
        patient_id: str = "",
    ) -> None:
        """One ``lab.file``/``lab.link`` action-log entry about the file ``sha256``.

        The source is the agent (the device that wrote the results), ``origin``
        where they came from, the file's SHA-256 the resource, the keyed patient
        reference (:func:`core.audit.patient_key`) whose results it brought.
        """
        self._record(
            action="C", event_type=f"lab.{source.kind}", outcome=outcome, desc=desc,
            agent=source.name, agent_type="system", source=source.origin,
            resource=f"LabFile/{sha256}", patient_id=patient_id,
            detail={"format": fmt or "", "analyzer": source.analyzer, **detail},
        )

    # -- read -------------------------------------------------------------------

    def search_results(self, query: LabResultQuery) -> tuple[list[StoredLabResult], int]:
        """One page of results (FHIR ``Observation`` search) and the total."""
        return self.store.search_results(query)

    def history(self, observation_id: str) -> list[StoredLabResult]:
        """Every version of one result, newest first (FHIR ``_history``)."""
        return self.store.result_history(observation_id)

    def search_reports(self, query: LabReportQuery) -> tuple[list[StoredLabReport], int]:
        """One page of result groups (FHIR ``DiagnosticReport`` search) and the total."""
        return self.store.search_reports(query)

    # -- review -----------------------------------------------------------------

    def conflicts(self, *, limit: int = 100, offset: int = 0) -> tuple[list[StoredLabResult], int]:
        """Results held because their specimen/test was another patient's, oldest first."""
        return self.store.conflicts(limit=limit, offset=offset)

    def resolve(
        self, observation_id: str, choice: str, *, agent: str, agent_type: str, source: str
    ) -> LabResolution:
        """Accept the held result as its patient's (the other patient's result of the same
        specimen/test is withdrawn) or discard it; audited with before and after.

        Raises
        ------
        NotFoundError
            No held result ``observation_id``.
        DuplicateError
            Another reviewer settled it first (HTTP 409).
        InvalidQueryError
            ``choice`` is not one of ``storage.lab.REVIEW_CHOICES``.
        """
        resolution = self.store.resolve(observation_id, choice)
        held = resolution.held_after
        self._record(
            action="U", event_type="lab.resolve", outcome="0",
            desc=f"held result {resolution.choice}ed", agent=agent,
            agent_type=agent_type, source=source, resource=f"Observation/{held.observation_id}",
            # Keyed as filings key their lab.file entries, so one search finds both.
            patient_id=held.patient_id, detail=resolution_json(resolution),
        )
        logger.info("held lab result %s: %s", observation_id, choice)
        return resolution

    def _record(
        self,
        *,
        action: str,
        event_type: str,
        outcome: str,
        desc: str,
        agent: str,
        agent_type: str,
        source: str,
        resource: str,
        patient_id: str,
        detail: Mapping[str, Any],
    ) -> None:
        """Queue one action-log entry; a side effect, so it logs and carries on (§5)."""
        if self.audit is None:
            return
        try:
            self.audit.record(
                AuditEntry(
                    action=action,
                    event_type=event_type,
                    outcome=outcome,
                    outcome_desc=desc[:64],
                    agent=agent[:128],
                    agent_type=agent_type,  # type: ignore[arg-type]
                    source=source[:64],
                    resource=resource,
                    patient_key=patient_key(self.patient_secret, patient_id),
                    correlation_id=correlation_id.get()[:32],
                    detail=AuditEntry.details(detail),
                )
            )
        except Exception:
            logger.error("lab %s audit entry not recorded", event_type, exc_info=True)
