"""In-memory implementations of :mod:`worklist.ports`, for tests and ``pacslab serve`` demos.

:class:`InMemoryWorklist` keeps the same index the SQL side should (see
:mod:`worklist.ports`): per station AE title and per modality, steps sorted by start,
so "station X, today" costs a dictionary lookup and two bisections instead of a scan.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from datetime import date, datetime, time, timedelta

from core.errors import DuplicateError, ProcedureStepStateError
from worklist.model import WorklistItem
from worklist.mpps import Effect, OrderStatusChanged, ProcedureStep
from worklist.ports import CandidateFilter

__all__ = ["InMemoryMppsRepository", "InMemoryWorklist"]

# (start, sequence number, item key, step index); the sequence number keeps tuples
# comparable without comparing keys.
_IndexEntry = tuple[datetime, int, tuple[str, str], int]


def _day_start(day: date) -> tuple[datetime]:
    return (datetime.combine(day, time.min),)


class InMemoryWorklist:
    """A :class:`~worklist.ports.WorklistSource` over a dict, indexed like the SQL side.

    Thread-safe: pynetdicom runs each association in its own thread.
    """

    def __init__(self, items: Iterable[WorklistItem] = ()) -> None:
        self._lock = threading.Lock()
        self._items: dict[tuple[str, str], WorklistItem] = {item.key: item for item in items}
        self._all: list[_IndexEntry] = []
        self._by_station: dict[str, list[_IndexEntry]] = {}
        self._by_modality: dict[str, list[_IndexEntry]] = {}
        self._rebuild()

    def _rebuild(self) -> None:
        entries: list[_IndexEntry] = []
        for n, (key, item) in enumerate(self._items.items()):
            for i, sps in enumerate(item.steps):
                entries.append((sps.start, n * 1000 + i, key, i))
        entries.sort()
        self._all = entries
        self._by_station = {}
        self._by_modality = {}
        for entry in entries:
            sps = self._items[entry[2]].steps[entry[3]]
            self._by_station.setdefault(sps.station_ae_title, []).append(entry)
            self._by_modality.setdefault(sps.modality, []).append(entry)

    def put(self, item: WorklistItem) -> None:
        """Add ``item``, or replace the item with the same accession and procedure id."""
        with self._lock:
            self._items[item.key] = item
            self._rebuild()

    def remove(self, key: tuple[str, str]) -> None:
        """Forget the item with this key (no error if absent)."""
        with self._lock:
            if self._items.pop(key, None) is not None:
                self._rebuild()

    def items(self) -> list[WorklistItem]:
        """A snapshot of all items."""
        with self._lock:
            return list(self._items.values())

    def candidates(self, flt: CandidateFilter) -> list[WorklistItem]:
        """Items with a step satisfying ``flt`` (see :class:`~worklist.ports.WorklistSource`)."""
        with self._lock:
            if flt.station_ae_title is not None:
                entries = self._by_station.get(flt.station_ae_title, [])
            elif flt.modality is not None:
                entries = self._by_modality.get(flt.modality, [])
            else:
                entries = self._all
            lo = 0 if flt.start_from is None else bisect_left(entries, _day_start(flt.start_from))
            hi = (
                len(entries)
                if flt.start_until is None
                else bisect_left(entries, _day_start(flt.start_until + timedelta(days=1)))
            )
            seen: set[tuple[str, str]] = set()
            out: list[WorklistItem] = []
            for _, _, key, index in entries[lo:hi]:
                if key in seen:
                    continue
                item = self._items[key]
                sps = item.steps[index]
                if sps.status not in flt.statuses:
                    continue
                if flt.modality is not None and sps.modality != flt.modality:
                    continue
                if (
                    flt.station_ae_title is not None
                    and sps.station_ae_title != flt.station_ae_title
                ):
                    continue
                seen.add(key)
                out.append(item)
            return out

    def apply_effects(self, effects: Sequence[Effect]) -> None:
        """An :class:`~worklist.ports.EffectSink`: MPPS progress updates step statuses."""
        with self._lock:
            changed = False
            for effect in effects:
                if not isinstance(effect, OrderStatusChanged):
                    continue
                ref = effect.step
                for key, item in self._items.items():
                    if item.order.accession_number != ref.accession_number:
                        continue
                    if ref.requested_procedure_id and key[1] != ref.requested_procedure_id:
                        continue
                    for sps in item.steps:
                        if sps.step_id == ref.scheduled_procedure_step_id:
                            self._items[key] = item.with_step_status(sps.step_id, effect.status)
                            changed = True
            if changed:
                self._rebuild()


class InMemoryMppsRepository:
    """A :class:`~worklist.ports.MppsRepository` over a dict, with compare-and-set saves."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._steps: dict[str, ProcedureStep] = {}

    def get(self, sop_instance_uid: str) -> ProcedureStep | None:
        with self._lock:
            return self._steps.get(sop_instance_uid)

    def save(self, step: ProcedureStep) -> None:
        with self._lock:
            current = self._steps.get(step.sop_instance_uid)
            if current is None and step.version != 1:
                raise ProcedureStepStateError(f"MPPS {step.sop_instance_uid} vanished")
            if current is not None:
                if step.version == 1:
                    raise DuplicateError(f"MPPS {step.sop_instance_uid} exists")
                if current.version != step.version - 1:
                    raise ProcedureStepStateError(
                        f"MPPS {step.sop_instance_uid} changed concurrently"
                    )
            self._steps[step.sop_instance_uid] = step
