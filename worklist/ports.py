"""What the worklist needs from storage: two small protocols and one callback.

The SQL index (``storage/index``) implements these; :mod:`worklist.memory` holds the
in-memory fakes the tests use.

Indexing note for the SQL side: C-FIND traffic is dominated by modalities polling
"my station, today" every few seconds. Keep one row per *scheduled procedure step*
(``sps(item_id, step_id, station_ae_title, modality, start_at, status)``) beside the
item row, with indexes on ``(station_ae_title, start_at)``, ``(modality, start_at)``
and ``(start_at)``, and a partial index ``WHERE status IN ('SCHEDULED','ARRIVED')``
where the dialect has one (SQLite and PostgreSQL both do). :class:`CandidateFilter`
maps onto ``WHERE station_ae_title = ? AND modality = ? AND start_at >= ? AND
start_at < ? + 1 day AND status IN (...)``, plus the order's Accession Number and
Patient ID when the query gives exact values; everything else is matched in Python by
:func:`worklist.query.match`, so the filter only has to be a superset.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING, Protocol

from worklist.model import OFFERED, SpsStatus, WorklistItem

if TYPE_CHECKING:
    from worklist.mpps import Effect, ProcedureStep

__all__ = ["CandidateFilter", "EffectSink", "MppsRepository", "WorklistSource"]


@dataclass(frozen=True, slots=True)
class CandidateFilter:
    """The part of a C-FIND query an index can answer (all fields optional).

    Attributes
    ----------
    station_ae_title : str or None
        Exact Scheduled Station AE Title (case-sensitive, PS3.4 C.2.2.2.1).
    modality : str or None
        Exact Modality.
    start_from, start_until : date or None
        Inclusive bounds on the step's start *date*.
    statuses : frozenset of SpsStatus
        Step statuses on offer.
    accession_numbers, patient_ids : frozenset of str or None
        The item's Accession Number / Patient ID is one of these (exact,
        case-sensitive); None when the key is universal or has a wild card.
    """

    station_ae_title: str | None = None
    modality: str | None = None
    start_from: date | None = None
    start_until: date | None = None
    statuses: frozenset[SpsStatus] = OFFERED
    accession_numbers: frozenset[str] | None = None
    patient_ids: frozenset[str] | None = None


class WorklistSource(Protocol):
    """Where scheduled work comes from (read side of the order store)."""

    def candidates(self, flt: CandidateFilter) -> Iterable[WorklistItem]:
        """Return every item with at least one step that satisfies all of ``flt``.

        More items may be returned (the matcher has the last word), but none that
        has such a step may be missing. Items come at most once, ideally in order of
        their first step's start. Raise
        :class:`~core.errors.OutOfResourcesError` when the store is unavailable.
        """
        ...


class MppsRepository(Protocol):
    """Storage of Modality Performed Procedure Steps (PS3.4 F.7)."""

    def get(self, sop_instance_uid: str) -> ProcedureStep | None:
        """The step with this SOP Instance UID, or None."""
        ...

    def save(self, step: ProcedureStep) -> None:
        """Store ``step`` if the stored version is ``step.version - 1`` (none for 1).

        Raises
        ------
        DuplicateError
            ``step.version == 1`` and the UID exists (a concurrent N-CREATE).
        ProcedureStepStateError
            The stored version moved on (a concurrent N-SET).
        """
        ...


class EffectSink(Protocol):
    """Acts on what an MPPS transition implies (order status, series completion).

    Called after the step is saved; a failure here is logged, not reported to the
    modality (STYLE.md §5: side effects log and carry on).
    """

    def __call__(self, effects: Sequence[Effect]) -> None: ...
