"""Lab results in storage: value objects and the :class:`LabResultStore` seam (STYLE.md §6).

What ingest hands over (:class:`NewLabFile`, :class:`NewLabResult`) and what the
API reads back (:class:`StoredLabResult`, :class:`StoredLabReport`). Only the
standard library here: ingest maps its parsed ``LabObservation`` (ASTM E1394 R
record, HL7 v2.5.1 OBX) onto these, and ``api`` maps them onto FHIR R4
``Observation`` / ``DiagnosticReport``, so neither needs the other.

Versioning follows FHIR R4 resource history (``meta.versionId``): every result
belongs to one logical ``observation_id`` (its *series*: specimen + test + sub-ID),
and a correction or re-send adds version ``n + 1`` while the earlier version stays,
no longer current (HL7 v2.5.1 §7.4.2.11 OBX-11 ``C``: "record coming over is a
correction and thus replaces a final result"; the replaced one must be kept).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol

__all__ = [
    "DateBound",
    "LabFileState",
    "LabIngestOutcome",
    "LabReportQuery",
    "LabResultQuery",
    "LabResultStore",
    "NewLabFile",
    "NewLabReport",
    "NewLabResult",
    "OrderLookup",
    "StoredLabReport",
    "StoredLabResult",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class NewLabFile:
    """One accepted inbox file: the journal entry written with its results.

    ``sha256`` of the file's bytes is the key: a file whose hash is already in the
    store is a duplicate, never ingested twice.
    """

    sha256: str
    name: str
    profile: str
    format: str
    message_count: int
    summary_json: str = "{}"
    received_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class NewLabReport:
    """The group a result belongs to: one order / specimen (FHIR DiagnosticReport)."""

    report_id: str
    specimen_id: str = ""
    placer_order_id: str = ""
    filler_order_id: str = ""
    patient_id: str = ""
    patient_name: str = ""
    is_qc: bool = False
    analyzer: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class NewLabResult:
    """One observation to store (ASTM E1394 R record, HL7 v2.5.1 OBX, export row).

    ``observation_id`` names the series this result is a version of; the store
    numbers the versions. See :class:`ingest.labs.model.LabObservation` for the
    meaning of each field as sent.
    """

    observation_id: str
    report: NewLabReport
    location: str
    message_index: int
    position: int
    control_id: str = ""
    format: str = ""
    analyzer: str = ""
    instrument_id: str = ""
    test_code: str
    test_system: str = "local"
    test_display: str = ""
    loinc: str = ""
    loinc_display: str = ""
    test_raw: str = ""
    sub_id: str = ""
    value_type: str = "ST"
    raw_value: str = ""
    value_text: str = ""
    value: float | None = None
    comparator: str = ""
    coded_value: str = ""
    unit: str = ""
    ucum_unit: str = ""
    reference_range: str = ""
    reference_low: float | None = None
    reference_high: float | None = None
    flags: tuple[str, ...] = ()
    status: str = ""
    status_code: str = ""
    specimen_id: str = ""
    placer_order_id: str = ""
    filler_order_id: str = ""
    performed_at: datetime | None = None
    is_qc: bool = False
    patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    comments: tuple[str, ...] = ()
    is_critical: bool = False
    critical_reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredLabResult:
    """A stored version of a result, as the API reads it."""

    pk: int
    observation_id: str
    version: int
    is_current: bool
    supersedes_pk: int | None
    report_id: str
    file_sha256: str
    file_name: str
    location: str
    message_index: int
    position: int
    control_id: str
    format: str
    analyzer: str
    instrument_id: str
    test_code: str
    test_system: str
    test_display: str
    loinc: str
    loinc_display: str
    test_raw: str
    sub_id: str
    value_type: str
    raw_value: str
    value_text: str
    value: float | None
    comparator: str
    coded_value: str
    unit: str
    ucum_unit: str
    reference_range: str
    reference_low: float | None
    reference_high: float | None
    flags: tuple[str, ...]
    status: str
    status_code: str
    specimen_id: str
    placer_order_id: str
    filler_order_id: str
    performed_at: datetime | None
    is_qc: bool
    patient_id: str
    patient_name: str
    patient_birth_date: str
    patient_sex: str
    comments: tuple[str, ...]
    is_critical: bool
    critical_reason: str
    unmatched: bool
    order_ref: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredLabReport:
    """A stored result group (one order / specimen), for FHIR DiagnosticReport."""

    report_id: str
    specimen_id: str
    placer_order_id: str
    filler_order_id: str
    patient_id: str
    patient_name: str
    is_qc: bool
    analyzer: str
    unmatched: bool
    order_ref: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class LabFileState:
    """What the journal knows about a file hash.

    ``status`` is ``"ingested"`` once its results are committed and ``"filed"`` once
    the file has also been moved to ``processed/``. An ``"ingested"`` file still
    in the inbox after a crash only needs moving.
    """

    sha256: str
    name: str
    profile: str
    status: Literal["ingested", "filed"]
    result_count: int
    duplicates: int
    summary_json: str


@dataclass(frozen=True, slots=True)
class LabIngestOutcome:
    """What :meth:`LabResultStore.ingest_file` did.

    ``duplicate`` is true when the hash was already journaled (nothing written).
    ``critical`` lists the new results flagged critical, to be announced.
    """

    duplicate: bool
    results: int = 0
    new_versions: int = 0
    critical: tuple[StoredLabResult, ...] = ()


#: ``(comparison, instant)``: ``"ge"``/``"gt"``/``"le"``/``"lt"`` against a UTC instant.
DateBound = tuple[Literal["ge", "gt", "le", "lt"], datetime]


@dataclass(frozen=True, slots=True, kw_only=True)
class LabResultQuery:
    """Search criteria for results; every criterion given must hold (AND).

    Tuples mean "any of" (FHIR comma-separated values, R4 §3.1.1.4).
    """

    observation_ids: tuple[str, ...] = ()
    patient_ids: tuple[str, ...] = ()
    specimen_ids: tuple[str, ...] = ()
    #: Matches the placer or filler order number (an accession).
    order_ids: tuple[str, ...] = ()
    #: ``(system or None, code)``: ``None`` matches any system; ``"LN"`` also
    #: matches the LOINC alternate coding.
    codes: tuple[tuple[str | None, str], ...] = ()
    report_ids: tuple[str, ...] = ()
    statuses: tuple[str, ...] = ()
    performed: tuple[DateBound, ...] = ()
    updated: tuple[DateBound, ...] = ()
    critical: bool | None = None
    #: ``None`` for both patient and QC results.
    qc: bool | None = False
    unmatched: bool | None = None
    current_only: bool = True
    sort: Literal["updated", "-updated", "performed", "-performed", "id"] = "id"
    offset: int = 0
    limit: int = 100


@dataclass(frozen=True, slots=True, kw_only=True)
class LabReportQuery:
    """Search criteria for result groups (FHIR DiagnosticReport search)."""

    report_ids: tuple[str, ...] = ()
    patient_ids: tuple[str, ...] = ()
    specimen_ids: tuple[str, ...] = ()
    #: Matches specimen ID, placer or filler order number.
    identifiers: tuple[str, ...] = ()
    #: Reports having a current result with one of these codes.
    codes: tuple[tuple[str | None, str], ...] = ()
    performed: tuple[DateBound, ...] = ()
    updated: tuple[DateBound, ...] = ()
    qc: bool | None = False
    sort: Literal["updated", "-updated", "id"] = "id"
    offset: int = 0
    limit: int = 100


#: Finds the order a result answers: ``(specimen_id, placer, filler)`` → order
#: reference, or ``None``. Supplied by whoever owns orders (issue: order intake).
OrderLookup = Callable[[str, str, str], "str | None"]


class LabResultStore(Protocol):
    """Where lab results live. :class:`storage.index.lab.SqlLabStore` implements it."""

    def file_state(self, sha256: str) -> LabFileState | None:
        """The journal entry of a file hash, or ``None`` when never ingested."""
        ...

    def ingest_file(
        self,
        file: NewLabFile,
        results: Sequence[NewLabResult],
        *,
        order_lookup: OrderLookup | None = None,
    ) -> LabIngestOutcome:
        """Journal the file and store its results in one transaction."""
        ...

    def mark_filed(self, sha256: str) -> None:
        """Record that the ingested file has been moved out of the inbox."""
        ...

    def unfiled(self, profile: str) -> list[LabFileState]:
        """Files of an inbox committed but not known to be moved (a crash in between)."""
        ...

    def record_duplicate(self, sha256: str) -> int:
        """Count one more arrival of an already ingested file; returns the count."""
        ...

    def search_results(self, query: LabResultQuery) -> tuple[list[StoredLabResult], int]:
        """Matching results (one page) and the total number of matches."""
        ...

    def result_history(self, observation_id: str) -> list[StoredLabResult]:
        """Every version of one result, newest first."""
        ...

    def search_reports(self, query: LabReportQuery) -> tuple[list[StoredLabReport], int]: ...

    def link_results(self, order_ref: str, *, specimen_id: str = "", order_id: str = "") -> int:
        """Attach unmatched results of a specimen/accession to an order; returns how many."""
        ...

    def link_unmatched(self, lookup: OrderLookup, *, limit: int = 1000) -> int:
        """Try ``lookup`` on every unmatched result group; returns results linked."""
        ...
