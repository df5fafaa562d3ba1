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

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol

__all__ = [
    "REVIEW_CHOICES",
    "DateBound",
    "LabFileState",
    "LabIngestOutcome",
    "LabReportQuery",
    "LabResolution",
    "LabResultQuery",
    "LabResultStore",
    "NewLabFile",
    "NewLabReport",
    "NewLabResult",
    "OrderLookup",
    "StoredLabReport",
    "StoredLabResult",
    "report_status",
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
    #: Assigning authority of ``patient_id`` (HL7 PID-3.4; the profile's or hospital's
    #: for ASTM and exports): the Issuer of Patient ID of the ``patients`` table.
    patient_issuer: str = ""
    patient_name: str = ""
    is_qc: bool = False
    analyzer: str = ""
    #: The ordered panel / test (HL7 OBR-4, ASTM O.5): FHIR DiagnosticReport.code.
    order_code: str = ""
    order_system: str = ""
    order_display: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class NewLabResult:
    """One observation to store (ASTM E1394 R record, HL7 v2.5.1 OBX, export row).

    ``observation_id`` names the series this result is a version of; the store
    numbers the versions. See :class:`core.labs.LabObservation` for the
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
    patient_issuer: str = ""
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
    #: The ``patients`` row (FHIR ``Patient/<pk>``); ``None`` for QC and anonymous.
    patient_pk: int | None = None
    patient_issuer: str = ""
    #: ``""``; ``"conflict"`` (held: the specimen/test was reported for another
    #: patient first, see :meth:`LabResultStore.resolve`); ``"accepted"``;
    #: ``"discarded"``; ``"moved"`` (retired when the specimen moved to another patient).
    review: str = ""
    #: For a conflict: the other patient's result series, and that patient's row.
    conflict_with: str = ""
    conflict_patient_pk: int | None = None


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
    patient_pk: int | None = None
    patient_issuer: str = ""
    order_code: str = ""
    order_system: str = ""
    order_display: str = ""
    #: :func:`report_status` of its current results, kept by the store.
    status: str = ""


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
    #: Results held because their specimen/test belongs to another patient already.
    conflicts: tuple[StoredLabResult, ...] = ()


#: ``(comparison, instant)``: ``"ge"``/``"gt"``/``"le"``/``"lt"`` against a UTC instant.
DateBound = tuple[Literal["ge", "gt", "le", "lt"], datetime]


@dataclass(frozen=True, slots=True, kw_only=True)
class LabResultQuery:
    """Search criteria for results; every criterion given must hold (AND).

    Tuples mean "any of" (FHIR comma-separated values, R4 §3.1.1.4).
    """

    observation_ids: tuple[str, ...] = ()
    #: Patient ID values as sent, any issuer (the legacy ``patient:identifier`` search).
    patient_ids: tuple[str, ...] = ()
    #: ``patients`` rows (FHIR ``patient=Patient/<pk>``).
    patient_pks: tuple[int, ...] = ()
    #: ``(issuer or None, patient id)``; ``None`` matches any issuer, ``""`` none.
    patient_identifiers: tuple[tuple[str | None, str], ...] = ()
    specimen_ids: tuple[str, ...] = ()
    #: Matches the placer or filler order number (an accession).
    order_ids: tuple[str, ...] = ()
    #: ServiceRequest ids (``based-on=ServiceRequest/<id>``): the linked order.
    based_on: tuple[str, ...] = ()
    #: FHIR observation-category codes; every lab result is ``laboratory``, so any
    #: other code matches nothing (and is not ignored).
    categories: tuple[str, ...] = ()
    #: Review states (``StoredLabResult.review``): ``("conflict",)`` is the held list.
    reviews: tuple[str, ...] = ()
    #: ``(system or None, code)``: ``None`` matches any system; ``"LN"`` also
    #: matches the LOINC alternate coding.
    codes: tuple[tuple[str | None, str], ...] = ()
    report_ids: tuple[str, ...] = ()
    #: FHIR Observation.status codes as served (a held result is ``preliminary``,
    #: an empty stored status ``unknown``).
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
    #: Count the total no further than this + 1 matches (FHIR ``_total`` other than
    #: ``accurate``); None counts every match. A page that is not full is its own
    #: count.
    total_at_most: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class LabReportQuery:
    """Search criteria for result groups (FHIR DiagnosticReport search)."""

    report_ids: tuple[str, ...] = ()
    patient_ids: tuple[str, ...] = ()
    patient_pks: tuple[int, ...] = ()
    patient_identifiers: tuple[tuple[str | None, str], ...] = ()
    specimen_ids: tuple[str, ...] = ()
    #: Matches specimen ID, placer or filler order number.
    identifiers: tuple[str, ...] = ()
    based_on: tuple[str, ...] = ()
    #: v2-0074 diagnostic service section codes; lab reports are ``LAB``.
    categories: tuple[str, ...] = ()
    #: DiagnosticReport.status as served (:func:`report_status`).
    statuses: tuple[str, ...] = ()
    #: Reports whose ordered panel (DiagnosticReport.code) or a current result has
    #: one of these codes.
    codes: tuple[tuple[str | None, str], ...] = ()
    performed: tuple[DateBound, ...] = ()
    updated: tuple[DateBound, ...] = ()
    qc: bool | None = False
    sort: Literal["updated", "-updated", "id"] = "id"
    offset: int = 0
    limit: int = 100
    #: Count the total no further than this + 1 matches (FHIR ``_total`` other than
    #: ``accurate``); None counts every match. A page that is not full is its own
    #: count.
    total_at_most: int | None = None


def report_status(statuses: Iterable[str], *, held: bool = False) -> str:
    """FHIR R4 DiagnosticReport.status (ValueSet diagnostic-report-status) of a group.

    ``statuses`` are its current results' stored statuses; ``held`` says one of them
    is held for review (its patient unverified: the report is not ``final``). Kept
    here, beside the data, so the store can keep it searchable and the API renders
    the same value.
    """
    found = set(statuses)
    if not found:
        return "registered"
    if found == {"entered-in-error"}:
        return "entered-in-error"
    found.discard("entered-in-error")  # withdrawn results say nothing of the others
    if "preliminary" in found:
        status = "partial" if found & {"final", "corrected"} else "preliminary"
    elif found == {"cancelled"}:
        status = "cancelled"
    elif "corrected" in found:
        status = "corrected"
    elif found <= {"final", "cancelled"}:
        status = "final"
    else:
        status = "unknown"
    return "preliminary" if held and status == "final" else status


#: What :meth:`LabResultStore.resolve` may do with a held conflict.
REVIEW_CHOICES = ("accept", "discard")


@dataclass(frozen=True, slots=True, kw_only=True)
class LabResolution:
    """What resolving a held conflict changed: each affected result, before and after.

    ``accept`` confirms the held result as its patient's (it joins the searches as
    any other result) and retires the other patient's result of the same specimen
    and test with a new version ``entered-in-error`` (FHIR R4 Observation.status:
    "should never have existed"); ``discard`` takes the held result out of every
    search (``is_current`` false, kept for the record).
    """

    choice: str
    held_before: StoredLabResult
    held_after: StoredLabResult
    retired_before: StoredLabResult | None = None
    retired_after: StoredLabResult | None = None


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

    def conflicts(self, *, limit: int = 100, offset: int = 0) -> tuple[list[StoredLabResult], int]:
        """Held results (``review == "conflict"``), oldest first: the needs-review list."""
        ...

    def resolve(self, observation_id: str, choice: str) -> LabResolution:
        """Accept or discard the held result ``observation_id`` (see :class:`LabResolution`).

        Raises
        ------
        NotFoundError
            No held conflict has this id.
        InvalidQueryError
            ``choice`` is not one of :data:`REVIEW_CHOICES`.
        """
        ...
