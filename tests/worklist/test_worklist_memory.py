"""In-memory fakes: the worklist index returns a superset of matches; MPPS saves are CAS."""

from __future__ import annotations

from datetime import date, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import DuplicateError, ProcedureStepStateError
from tests.worklist.mpps_requests import n_create, n_set
from worklist.memory import InMemoryMppsRepository, InMemoryWorklist
from worklist.model import SpsStatus, from_dataset, make_item, to_dataset
from worklist.mpps import OrderStatusChanged, StepRef, apply
from worklist.ports import CandidateFilter

STATIONS = ["CT1", "CT2", "MR1"]
DAY0 = datetime(2026, 11, 24, 6, 0)


def _items(spec: list[tuple[int, int, int]]) -> list:  # type: ignore[type-arg]
    out = []
    for n, (station, day, hour) in enumerate(spec):
        ae = STATIONS[station]
        out.append(
            make_item(
                f"A{n}",
                station_ae_title=ae,
                modality=ae[:2],
                start=DAY0 + timedelta(days=day, hours=hour),
            )
        )
    return out


@settings(max_examples=60, deadline=None)
@given(
    spec=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 4), st.integers(0, 12)), max_size=30),
    station=st.sampled_from([None, *STATIONS]),
    modality=st.sampled_from([None, "CT", "MR"]),
    lo=st.one_of(st.none(), st.integers(0, 4)),
    width=st.one_of(st.none(), st.integers(0, 3)),
)
def test_candidates_equal_a_brute_force_scan(
    spec: list[tuple[int, int, int]],
    station: str | None,
    modality: str | None,
    lo: int | None,
    width: int | None,
) -> None:
    items = _items(spec)
    start_from = None if lo is None else DAY0.date() + timedelta(days=lo)
    start_until = None if width is None else (start_from or DAY0.date()) + timedelta(days=width)
    flt = CandidateFilter(station, modality, start_from, start_until)

    def ok(item) -> bool:  # type: ignore[no-untyped-def]
        return any(
            (station is None or s.station_ae_title == station)
            and (modality is None or s.modality == modality)
            and (start_from is None or s.start.date() >= start_from)
            and (start_until is None or s.start.date() <= start_until)
            for s in item.steps
        )

    got = InMemoryWorklist(items).candidates(flt)
    assert sorted(i.key for i in got) == sorted(i.key for i in items if ok(i))
    starts = [i.steps[0].start for i in got]
    assert starts == sorted(starts)


def test_effects_update_step_status_and_leave_the_offer() -> None:
    wl = InMemoryWorklist([make_item("A1")])
    ref = StepRef("A1", "RPA1", "SPSA1", "")
    wl.apply_effects([OrderStatusChanged("1.2.3", ref, SpsStatus.STARTED)])
    assert wl.items()[0].steps[0].status is SpsStatus.STARTED
    assert wl.candidates(CandidateFilter()) == []
    assert wl.items()[0].order.version == 2


def test_put_replaces_and_remove_forgets() -> None:
    wl = InMemoryWorklist([make_item("A1", station_ae_title="CT1")])
    wl.put(make_item("A1", station_ae_title="CT2"))
    assert wl.candidates(CandidateFilter(station_ae_title="CT1")) == []
    assert len(wl.candidates(CandidateFilter(station_ae_title="CT2"))) == 1
    wl.remove(("A1", "RPA1"))
    assert wl.items() == []


def test_mpps_repository_is_compare_and_set() -> None:
    repo = InMemoryMppsRepository()
    created = apply(None, n_create())
    repo.save(created)
    with pytest.raises(DuplicateError):
        repo.save(created)
    done = apply(created, n_set("COMPLETED"))
    repo.save(done)
    with pytest.raises(ProcedureStepStateError):
        repo.save(done)  # a second writer of the same version loses
    assert repo.get(created.sop_instance_uid) == done


def test_to_dataset_and_from_dataset_round_trip() -> None:
    item = make_item("A7", patient_name="NGUYỄN^VĂN AN")
    back = from_dataset(to_dataset(item, item.steps[0]))
    assert back == item
    assert date(1980, 1, 2) == back.patient.birth_date
