"""One contract per worklist storage protocol, run against every backend (STYLE.md example C).

``WorklistSource`` (``worklist.ports``): every item with a step satisfying the
filter comes back, once, ordered by first start. ``MppsRepository``: get/save with
compare-and-set (PS3.4 F.7.2: N-CREATE of an existing instance is 0x0111; a stale
N-SET must not overwrite a newer one).

Backends: the in-memory fakes (``worklist.memory``), SQLite, and PostgreSQL when
``PACSLAB_TEST_POSTGRES_URL`` names a scratch database (marker ``postgres``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from core.errors import DuplicateError, ProcedureStepStateError
from core.orders import OrderStatus, derive_status
from core.settings import IndexSettings
from storage.index.orders import SqlMppsRepository, SqlOrderStore, SqlWorklistSource
from storage.index.sql import SqlIndex
from tests.worklist.mpps_requests import n_create, n_set
from tests.worklist.order_requests import place_items
from worklist.memory import InMemoryMppsRepository, InMemoryWorklist
from worklist.model import SpsStatus, WorklistItem, make_item
from worklist.mpps import apply, restore_step
from worklist.ports import CandidateFilter, MppsRepository, WorklistSource

DAY0 = datetime(2026, 11, 25, 7, 0)

SourceFactory = Callable[[Sequence[WorklistItem]], WorklistSource]


def _items() -> list[WorklistItem]:
    out = []
    for n, (station, day, hour) in enumerate(
        [("CT1", 0, 2), ("CT1", 0, 1), ("CT2", 0, 3), ("MR1", 1, 0), ("CT1", 2, 5), ("CT1", 1, 23)]
    ):
        out.append(
            make_item(
                f"C{n}",
                patient_name="NGUYỄN^VĂN AN" if n == 0 else f"PATIENT{n}^TEST",
                station_ae_title=station,
                modality=station[:2],
                start=DAY0 + timedelta(days=day, hours=hour),
            )
        )
    # Item C6 is started: not on offer.
    started = make_item("C6", station_ae_title="CT1", start=DAY0)
    out.append(started.with_step_status(started.steps[0].step_id, SpsStatus.STARTED))
    return out


def _satisfies(item: WorklistItem, flt: CandidateFilter) -> bool:
    return any(
        (flt.station_ae_title is None or s.station_ae_title == flt.station_ae_title)
        and (flt.modality is None or s.modality == flt.modality)
        and (flt.start_from is None or s.start.date() >= flt.start_from)
        and (flt.start_until is None or s.start.date() <= flt.start_until)
        and s.status in flt.statuses
        for s in item.steps
    ) and (
        (flt.accession_numbers is None or item.order.accession_number in flt.accession_numbers)
        and (flt.patient_ids is None or item.patient.id in flt.patient_ids)
    )


FILTERS = [
    CandidateFilter(),
    CandidateFilter(station_ae_title="CT1"),
    CandidateFilter(modality="MR"),
    CandidateFilter(station_ae_title="CT1", start_from=DAY0.date(), start_until=DAY0.date()),
    CandidateFilter(start_from=DAY0.date() + timedelta(days=1)),
    CandidateFilter(start_until=DAY0.date()),
    CandidateFilter(station_ae_title="CT1", modality="MR"),
    CandidateFilter(statuses=frozenset({SpsStatus.STARTED})),
    CandidateFilter(accession_numbers=frozenset({"C1", "C4", "nope"})),
    CandidateFilter(patient_ids=frozenset({"PC3"}), station_ae_title="MR1"),
    CandidateFilter(accession_numbers=frozenset({"C6"})),  # started: not on offer
    CandidateFilter(accession_numbers=frozenset({"c1"})),  # case-sensitive
]


class WorklistSourceContract:
    @pytest.fixture
    def make_source(self) -> SourceFactory:
        raise NotImplementedError

    @pytest.mark.parametrize("flt", FILTERS, ids=lambda f: repr(f)[16:60])
    def test_every_satisfying_item_once(
        self, make_source: SourceFactory, flt: CandidateFilter
    ) -> None:
        items = _items()
        got = list(make_source(items).candidates(flt))
        keys = [i.key for i in got]
        assert len(keys) == len(set(keys)), "an item came twice"
        wanted = {i.key for i in items if _satisfies(i, flt)}
        assert wanted <= set(keys)

    def test_items_come_in_order_of_first_start(self, make_source: SourceFactory) -> None:
        got = list(make_source(_items()).candidates(CandidateFilter(station_ae_title="CT1")))
        starts = [min(s.start for s in i.steps) for i in got]
        assert starts == sorted(starts)
        assert [i.key[0] for i in got] == ["C1", "C0", "C5", "C4"]

    def test_items_come_back_whole(self, make_source: SourceFactory) -> None:
        items = _items()
        got = {i.key: i for i in make_source(items).candidates(CandidateFilter())}
        assert got[items[0].key] == items[0]  # Vietnamese name, codes, birth date…

    def test_date_bounds_are_inclusive_days(self, make_source: SourceFactory) -> None:
        day = DAY0.date() + timedelta(days=1)
        flt = CandidateFilter(start_from=day, start_until=day)
        got = {i.key[0] for i in make_source(_items()).candidates(flt)}
        assert "C3" in got  # 07:00 the next day
        assert not got & {"C0", "C4", "C5"}  # C5: 23 h after 07:00 is the day after


class MppsRepositoryContract:
    @pytest.fixture
    def repo(self) -> MppsRepository:
        raise NotImplementedError

    def test_unknown_is_none(self, repo: MppsRepository) -> None:
        assert repo.get("1.2.3.4") is None

    def test_create_then_get_round_trips_attributes(self, repo: MppsRepository) -> None:
        step = apply(None, n_create())
        repo.save(step)
        got = repo.get(step.sop_instance_uid)
        assert got is not None
        assert got.version == 1 and got.status == "IN PROGRESS"
        assert str(got.attributes.PatientName) == "NGUYỄN^VĂN AN"
        ssa = got.attributes.ScheduledStepAttributesSequence[0]
        assert ssa.AccessionNumber == "A1"
        assert got.scheduled_steps == step.scheduled_steps

    def test_second_create_is_duplicate(self, repo: MppsRepository) -> None:
        repo.save(apply(None, n_create()))
        with pytest.raises(DuplicateError):
            repo.save(apply(None, n_create()))

    def test_set_is_compare_and_set(self, repo: MppsRepository) -> None:
        created = apply(None, n_create())
        repo.save(created)
        stored = repo.get(created.sop_instance_uid)
        done = apply(stored, n_set("COMPLETED"))
        repo.save(done)
        again = repo.get(created.sop_instance_uid)
        assert again is not None and again.status == "COMPLETED" and again.version == 2
        assert again.series_instance_uids == done.series_instance_uids
        with pytest.raises(ProcedureStepStateError):
            repo.save(apply(created, n_set("DISCONTINUED")))  # stale: built on version 1


# ------------------------------------------------------------------------ backends


def _sql_source(index: SqlIndex) -> SourceFactory:
    store = SqlOrderStore(index)

    def make(items: Sequence[WorklistItem]) -> WorklistSource:
        place_items(store, items, source="test")
        return SqlWorklistSource(index)

    return make


@pytest.fixture
def sqlite_index(tmp_path: Path) -> Iterator[SqlIndex]:
    index = SqlIndex(IndexSettings(url=f"sqlite:///{tmp_path}/index.db"))
    yield index
    index.close()


@pytest.fixture
def postgres_index(pg_url: str) -> Iterator[SqlIndex]:
    # pg_url: a fresh database on the throwaway server (tests/conftest_pg.py), or the
    # one PACSLAB_TEST_POSTGRES_URL names.
    index = SqlIndex(IndexSettings(url=pg_url))
    yield index
    index.close()


class TestMemoryWorklistSource(WorklistSourceContract):
    @pytest.fixture
    def make_source(self) -> SourceFactory:
        return InMemoryWorklist


class TestSqliteWorklistSource(WorklistSourceContract):
    @pytest.fixture
    def make_source(self, sqlite_index: SqlIndex) -> SourceFactory:
        return _sql_source(sqlite_index)


@pytest.mark.postgres
class TestPostgresWorklistSource(WorklistSourceContract):
    @pytest.fixture
    def make_source(self, postgres_index: SqlIndex) -> SourceFactory:
        return _sql_source(postgres_index)


class TestMemoryMppsRepository(MppsRepositoryContract):
    @pytest.fixture
    def repo(self) -> MppsRepository:
        return InMemoryMppsRepository()


class TestSqliteMppsRepository(MppsRepositoryContract):
    @pytest.fixture
    def repo(self, sqlite_index: SqlIndex) -> MppsRepository:
        return SqlMppsRepository(sqlite_index, restore_step)


@pytest.mark.postgres
class TestPostgresMppsRepository(MppsRepositoryContract):
    @pytest.fixture
    def repo(self, postgres_index: SqlIndex) -> MppsRepository:
        return SqlMppsRepository(postgres_index, restore_step)


def test_sql_source_sees_step_status_changes(sqlite_index: SqlIndex) -> None:
    """A step that starts leaves the worklist at once (the index row follows the item)."""
    store = SqlOrderStore(sqlite_index)
    item = make_item("S1", start=DAY0)
    rec = store.create(
        public_id="o1",
        placer="P1",
        filler="",
        source="t",
        build=lambda _pk: item,
        status=lambda it: derive_status(it.steps),
    )
    source = SqlWorklistSource(sqlite_index)
    assert [i.key for i in source.candidates(CandidateFilter(station_ae_title="CT1"))] == [item.key]
    started = item.with_step_status(item.steps[0].step_id, SpsStatus.STARTED)
    store.update(rec, started, OrderStatus.IN_PROGRESS, event="step")
    assert list(source.candidates(CandidateFilter(station_ae_title="CT1"))) == []
    moved = replace(item, steps=(replace(item.steps[0], station_ae_title="CT9"),))
    with pytest.raises(ProcedureStepStateError):  # stale version
        store.update(rec, moved, OrderStatus.SCHEDULED, event="changed")
