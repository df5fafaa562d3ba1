"""Issue 21: nothing on a hot or periodic path reads the whole archive.

Run on SQLite and PostgreSQL (``tests/conftest_pg.py``): the name key and per-study
modality set, the roll-up column, the trigger-kept counters, job pruning, compressed
metadata. SQLite alone: reads never take the write lock, the query plans use the new
indexes, and migration 0006 backfills an archive written at 0004.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from core.errors import InvalidQueryError, NotFoundError, OutOfResourcesError
from core.instance import InstanceRecord
from core.person_name import person_name_key
from core.rejection import RejectedRef
from core.settings import IndexSettings
from storage.abc import NewInstance
from storage.index.migrate import upgrade
from storage.index.patients import SqlPatientStore
from storage.index.queries import Match, NameSearch, Query, count_query, find_query
from storage.index.rejection import apply_rejection
from storage.index.sql import SqlIndex
from storage.shares import ShareStore


def record(i: int, *, series: str, study: str, patient: str, name: str,
           modality: str = "CT") -> InstanceRecord:
    return InstanceRecord(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid=f"{series}.{i}",
        study_instance_uid=study, series_instance_uid=series,
        transfer_syntax_uid="1.2.840.10008.1.2.1", patient_id=patient,
        patient_name=name, modality=modality, instance_number=i, rows=8, columns=8,
        study_date="20261201", accession_number=f"A{patient}")


def new(rec: InstanceRecord, key: str, *, age_s: float = 0.0, meta: str = "{}") -> NewInstance:
    return NewInstance(record=rec, blob_key=key.ljust(64, "0"), size=10, calling_ae="CT1",
                       received_at=datetime.now(UTC) - timedelta(seconds=age_s),
                       metadata_json=meta)


PEOPLE = [
    ("1.1", "1.1.1", "P1", "TRẦN^THỊ LAN", "CT"),
    ("1.1", "1.1.2", "P1", "TRẦN^THỊ LAN", "SR"),
    ("2.1", "2.1.1", "P2", "Đỗ^VĂN HÙNG", "MR"),
    ("3.1", "3.1.1", "P3", "NGUYỄN^ÁNH", "CT"),
    ("4.1", "4.1.1", "P4", "NGUYEN^BINH", "US"),
]


def fill(index: SqlIndex, *, age_s: float = 0.0) -> None:
    items = [new(record(i, series=se, study=st, patient=p, name=n, modality=m),
                 f"{se}-{i}".replace(".", "a"), age_s=age_s)
             for st, se, p, n, m in PEOPLE for i in (1, 2)]
    index.add_instances(items)


def studies_of(index: SqlIndex, *matches: Match, fuzzy: bool = False) -> set[str]:
    rows = index.find(Query(level="study", matches=matches, fuzzy=fuzzy))
    return {r["StudyInstanceUID"] for r in rows}


class ScaleContract:
    @pytest.fixture
    def index(self, tmp_path: Path) -> Iterator[SqlIndex]:
        raise NotImplementedError

    @pytest.mark.parametrize(("pattern", "expected"), [
        ("TRẦN*", {"1.1"}), ("trần*", {"1.1"}), ("tran*", {"1.1"}), ("Đỗ*", {"2.1"}),
        ("do*", {"2.1"}), ("ĐỖ^VĂN HÙNG", {"2.1"}), ("nguyễn*", {"3.1", "4.1"}),
        ("NGUYEN^ANH", {"3.1"}), ("*BINH", {"4.1"}), ("T?AN*", {"1.1"}), ("Z*", set()),
    ])
    def test_person_name_key(self, index: SqlIndex, pattern: str, expected: set[str]) -> None:
        fill(index)
        assert studies_of(index, Match("PatientName", pattern)) == expected

    @pytest.mark.parametrize(("names", "expected"), [
        ((NameSearch(("trần",)),), {"P1"}), ((NameSearch(("TRAN", "nguyễn")),), {"P1", "P3", "P4"}),
        ((NameSearch(("hùng",)),), {"P2"}), ((NameSearch(("hung",), family_only=True),), set()),
        ((NameSearch(("đỗ",), family_only=True),), {"P2"}), ((NameSearch(("ran",)),), set()),
        ((NameSearch(("nguy",)), NameSearch(("anh",))), {"P3"}),
    ])
    def test_fhir_name_search(self, index: SqlIndex, names: tuple[NameSearch, ...],
                              expected: set[str]) -> None:
        fill(index)
        rows = index.find(Query(level="patient", names=names))
        assert {r["PatientID"] for r in rows} == expected
        assert index.count(Query(level="patient", names=names)) == len(expected)

    def test_fuzzy_name_is_any_part(self, index: SqlIndex) -> None:
        fill(index)
        assert studies_of(index, Match("PatientName", "hung"), fuzzy=True) == {"2.1"}
        assert studies_of(index, Match("PatientName", "THỊ"), fuzzy=True) == {"1.1"}

    def test_modalities_in_study_is_a_per_study_set(self, index: SqlIndex) -> None:
        fill(index)
        assert studies_of(index, Match("ModalitiesInStudy", "CT")) == {"1.1", "3.1"}
        assert studies_of(index, Match("ModalitiesInStudy", "SR\\US")) == {"1.1", "4.1"}
        rows = {r["StudyInstanceUID"]: r for r in index.find(Query(level="study"))}
        assert rows["1.1"]["ModalitiesInStudy"] == "CT\\SR"
        assert rows["2.1"]["ModalitiesInStudy"] == "MR"
        assert (rows["1.1"]["NumberOfStudyRelatedSeries"],
                rows["1.1"]["NumberOfStudyRelatedInstances"]) == (2, 4)
        # series level: the study key filters series too
        series = index.find(Query(level="series", matches=(Match("ModalitiesInStudy", "MR"),)))
        assert [r["SeriesInstanceUID"] for r in series] == ["2.1.1"]
        assert series[0]["NumberOfSeriesRelatedInstances"] == 2

    def test_a_rejected_modality_leaves_the_study_set(self, index: SqlIndex) -> None:
        """A study whose CT series was rejected (IHE IOCM) and whose MR series is left
        no longer matches ModalitiesInStudy=CT, whichever index chooses the page."""
        fill(index)
        mr = record(1, series="1.1.3", study="1.1", patient="P1", name="TRẦN^THỊ LAN",
                    modality="MR")
        index.add_instances([new(mr, "mr-1")])
        apply_rejection(index, [RejectedRef("1.1", "1.1.1", f"1.1.1.{i}") for i in (1, 2)],
                        "113001", source="test")
        for kw in ({}, {"limit": 1}, {"limit": 1, "offset": 1}, {"newest_first": True}):
            rows = index.find(Query(level="study", matches=(Match("ModalitiesInStudy", "CT"),),
                                    **kw))
            assert "1.1" not in {r["StudyInstanceUID"] for r in rows}, kw
        assert studies_of(index, Match("ModalitiesInStudy", "CT")) == {"3.1"}
        assert studies_of(index, Match("ModalitiesInStudy", "MR")) == {"1.1", "2.1"}
        assert studies_of(index, Match("ModalitiesInStudy", "CT"),
                          Match("PatientName", "TRAN*")) == set()
        assert studies_of(index, Match("ModalitiesInStudy", "CT"),
                          Match("StudyDate", "20261201")) == {"3.1"}
        assert index.count(Query(level="study", matches=(
            Match("ModalitiesInStudy", "CT"),))) == 1
        (row,) = index.find(Query(level="study", matches=(Match("StudyInstanceUID", "1.1"),)))
        assert row["ModalitiesInStudy"] == "MR\\SR"

    def test_modality_pages_are_the_primary_key_order(self, index: SqlIndex) -> None:
        """ModalitiesInStudy=CT pages off the modality's index: the same studies, in
        the same order (oldest or newest first), as the unpaged answer."""
        fill(index)
        more = [new(record(1, series=f"{n}.1.1", study=f"{n}.1", patient=f"P{n}",
                           name="LÊ^VĂN", modality="CT"), f"ct-{n}") for n in range(5, 9)]
        index.add_instances(more)
        for newest in (False, True):
            whole = [r["StudyInstanceUID"] for r in index.find(Query(
                level="study", matches=(Match("ModalitiesInStudy", "CT"),),
                newest_first=newest))]
            assert sorted(whole) == ["1.1", "3.1", "5.1", "6.1", "7.1", "8.1"]
            paged = [r["StudyInstanceUID"] for off in range(0, 6, 4) for r in index.find(
                Query(level="study", matches=(Match("ModalitiesInStudy", " CT "),),
                      limit=4, offset=off, newest_first=newest))]
            assert paged == whole, newest
            assert whole == (sorted(whole, key=lambda u: int(u.split(".")[0]),
                                    reverse=newest))

    def test_modality_lists_and_wildcards_page_off_the_index(self, index: SqlIndex) -> None:
        """A list (PS3.4 C.2.2.2.2) or a wildcard (C.2.2.2.4) on ModalitiesInStudy: one
        page per modality merged (a wildcard first resolved to the archive's matching
        modalities): the same studies, once each, in the unpaged order, at every page."""
        fill(index)  # 1.1 CT+SR, 2.1 MR, 3.1 CT, 4.1 US
        extra = [("5.1", "CT"), ("6.1", "CT"), ("6.1", "MR"), ("7.1", "MR"), ("8.1", "PT")]
        index.add_instances([
            new(record(1, series=f"{st}.{m}", study=st, patient="P5", name="LÊ^VĂN",
                       modality=m), f"x-{st}-{m}") for st, m in extra])
        for value, expected in [
            ("CT\\MR", {"1.1", "2.1", "3.1", "5.1", "6.1", "7.1"}),
            ("MR,PT", {"2.1", "6.1", "7.1", "8.1"}),
            ("CT\\XA", {"1.1", "3.1", "5.1", "6.1"}),  # XA: no study has it
            ("C*", {"1.1", "3.1", "5.1", "6.1"}),
            ("?T", {"1.1", "3.1", "5.1", "6.1", "8.1"}),  # CT and PT
            ("*R", {"1.1", "2.1", "6.1", "7.1"}),  # SR and MR
            ("X*", set()),
            # Longer than the merge takes (storage/index/queries.py): matched by IN.
            ("\\".join(f"M{i}" for i in range(40)) + "\\CT", {"1.1", "3.1", "5.1", "6.1"}),
        ]:
            match = (Match("ModalitiesInStudy", value),)
            for newest in (False, True):
                whole = [r["StudyInstanceUID"] for r in index.find(Query(
                    level="study", matches=match, newest_first=newest))]
                assert whole == sorted(expected, key=lambda u: int(u.split(".")[0]),
                                       reverse=newest), value
                paged = [r["StudyInstanceUID"] for off in range(0, 7, 2)
                         for r in index.find(Query(level="study", matches=match, limit=2,
                                                   offset=off, newest_first=newest))]
                assert paged == whole, (value, newest)
            assert index.count(Query(level="study", matches=match)) == len(expected), value
            # Beside a key whose index chooses the page, and at series level.
            assert studies_of(index, *match, Match("PatientName", "L*")) == expected - {
                "1.1", "2.1", "3.1", "4.1"}, value
            assert studies_of(index, *match, Match("StudyDate", "20261201")) == expected
            rows = index.find(Query(level="series", matches=match))
            assert {r["StudyInstanceUID"] for r in rows} == expected, value
            # FHIR _total other than accurate: the count stops at its bound + 1.
            assert index.count(Query(level="study", matches=match), at_most=1) == min(
                len(expected), 2), value

    def test_newest_first_name_pages_read_among_the_newest_studies(
        self, index: SqlIndex, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The viewer's newest-first name search (``storage.index.queries.newest_window``)
        reads its page among the newest studies first: a full page from there is the
        page; otherwise (a rare name, a deep page, a small archive) the whole archive is
        read. Every page, either way, is the unwindowed answer's slice, and the window
        was used for some of them (here 4 studies wide, 2 per row of the page)."""
        from storage.index import queries as q

        monkeypatch.setattr(q, "NEWEST_WINDOW", 4)
        monkeypatch.setattr(q, "NEWEST_WINDOW_PER_ROW", 2)
        fill(index)  # 1.1 TRẦN, 2.1 Đỗ, 3.1 NGUYỄN, 4.1 NGUYEN: the oldest studies
        names = ["TRẦN^AN", "LÊ^BÌNH", "TRAN^CHI", "LÊ^DŨNG", "TRẦN^EM", "LÊ^GIANG"]
        index.add_instances([
            new(record(1, series=f"{n}.1.1", study=f"{n}.1", patient=f"P{n}",
                       name=names[(n - 5) % len(names)]), f"w-{n}") for n in range(5, 23)])
        reads: list[tuple[bool, bool]] = []  # (windowed, a full page)
        rows = SqlIndex._rows

        def spy(conn: Any, query: Query) -> list[dict[str, Any]]:
            out = rows(conn, query)
            reads.append((query.newer_than_pk is not None, len(out) == query.limit))
            return out

        monkeypatch.setattr(SqlIndex, "_rows", staticmethod(spy))
        expected = {"trần*": 10, "TRAN*": 10, "lê*": 9, "đỗ*": 1, "nguyen*": 2, "x*": 0}
        for pattern in expected:
            match = (Match("PatientName", pattern),)
            whole = [r["StudyInstanceUID"] for r in index.find(Query(
                level="study", matches=match, newest_first=True))]
            assert len(set(whole)) == len(whole) == expected[pattern]  # the reference
            for limit in (1, 2, 3, 7):
                for offset in range(0, len(whole) + 1):
                    page = [r["StudyInstanceUID"] for r in index.find(Query(
                        level="study", matches=match, newest_first=True, limit=limit,
                        offset=offset))]
                    assert page == whole[offset:offset + limit], (pattern, limit, offset)
        # Pages served from the window, and pages read again without it.
        assert (True, True) in reads and (True, False) in reads

    def test_keyset_pages_follow_the_page_order(self, index: SqlIndex) -> None:
        """``Query.after`` (QIDO-RS's ``next`` Link): each page starts after the last
        study of the one before, in whichever order the page is read (primary key,
        name key, study date, a modality or a list's merge; oldest or newest first)."""
        fill(index)
        index.add_instances([
            new(record(1, series=f"{n}.1.1", study=f"{n}.1", patient=f"P{n}", name=name,
                       modality=m), f"k-{n}")
            for n, name, m in [(5, "NGUYỄN^AN", "CT"), (6, "NGUYEN^AN", "MR"),
                               (7, "TRẦN^B", "CT")]])
        for matches in [(), (Match("PatientName", "N*"),), (Match("StudyDate", "20260101-"),),
                        (Match("ModalitiesInStudy", "CT"),),
                        (Match("ModalitiesInStudy", "CT\\MR"),)]:
            for newest in (False, True):
                def uids(matches: tuple[Match, ...] = matches, newest: bool = newest,
                         **kw: Any) -> list[str]:
                    return [r["StudyInstanceUID"] for r in index.find(Query(
                        level="study", matches=matches, newest_first=newest, **kw))]

                whole, paged, after = uids(), [], None
                while page := uids(limit=2, after=after):
                    paged += page
                    after = page[-1]
                assert paged == whole, (matches, newest)
        with pytest.raises(InvalidQueryError):
            index.find(Query(level="study", after="9.9", limit=2))

    def test_counts_survive_a_new_version(self, index: SqlIndex) -> None:
        fill(index)
        rec = record(1, series="1.1.1", study="1.1", patient="P1", name="TRẦN^THỊ LAN")
        assert index.add_instances([new(rec, "other")])[0].status == "replaced"
        counts = index.counts()
        assert (counts["patients"], counts["studies"], counts["series"]) == (4, 4, 5)
        assert (counts["instances"], counts["instances_current"]) == (11, 10)
        series = index.find(Query(level="series", matches=(Match("SeriesInstanceUID",
                                                                 "1.1.1"),)))
        assert series[0]["NumberOfSeriesRelatedInstances"] == 2

    def test_roll_up_reads_the_column(self, index: SqlIndex) -> None:
        fill(index, age_s=60)
        due = index.series_due(10, limit=100)
        assert sorted(due) == sorted(se for _, se, *_ in PEOPLE)
        for uid in due:
            index.add_job("series", uid)
        assert index.series_due(10) == [] and index.series_due(0) == []
        # A new instance makes its series due again once quiet, and only it.
        rec = record(9, series="2.1.1", study="2.1", patient="P2", name="Đỗ^VĂN HÙNG")
        index.add_instances([new(rec, "late")])
        assert index.series_due(10) == []
        assert index.series_due(0) == ["2.1.1"]

    def test_job_counters_and_pruning(self, index: SqlIndex) -> None:
        fill(index)
        assert index.counts()["jobs_pending"] == 10
        jobs = index.claim_jobs("w", limit=4)
        assert len(jobs) == 4
        c = index.counts()
        assert (c["jobs_pending"], c["jobs_running"]) == (6, 4)
        index.finish_jobs([(j.id, {}) for j in jobs[:3]])
        index.fail_job(jobs[3].id, "boom")
        index.add_job("series", "1.1.1")
        c = index.counts()
        assert (c["jobs_pending"], c["jobs_done"], c["jobs_failed"]) == (7, 3, 1)
        assert index.prune_jobs(3600) == 0  # not old enough
        assert index.prune_jobs(0) == 3
        c = index.counts()
        assert (c["jobs_pending"], c["jobs_done"], c["jobs_failed"]) == (7, 0, 1)
        assert len(index.get_jobs()) == 8  # the failed one and the pending ones stay

    def test_bulk_statements_keep_the_counters_exact(self, index: SqlIndex) -> None:
        fill(index)
        with index.write() as conn:
            conn.execute(text("UPDATE jobs SET status = 'done' WHERE id % 2 = 0"))
            conn.execute(text("UPDATE instances SET is_current = false WHERE id % 5 = 0"))
            conn.execute(text("DELETE FROM jobs WHERE id % 3 = 0"))
        with index.engine.connect() as conn:
            real = {
                "instances": conn.execute(text("SELECT count(*) FROM instances")).scalar_one(),
                "instances_current": conn.execute(
                    text("SELECT count(*) FROM instances WHERE is_current")).scalar_one(),
                **{f"jobs_{s}": n for s, n in conn.execute(
                    text("SELECT status, count(*) FROM jobs GROUP BY status"))},
            }
        counts = index.counts()
        assert {k: counts[k] for k in real} == real

    def test_metadata_is_compressed_and_read_back(self, index: SqlIndex) -> None:
        meta = json.dumps({f"0009{i:04X}": {"vr": "LO", "Value": ["TRẦN " * 5]}
                           for i in range(40)}, ensure_ascii=False)
        rec = record(1, series="5.1.1", study="5.1", patient="P5", name="LÊ^HOA")
        index.add_instances([new(rec, "m", meta=meta)])
        assert index.get_instance(rec.sop_instance_uid).metadata_json == meta
        (row,) = index.instance_metadata("5.1")
        assert row.metadata_json == meta
        (found,) = index.find(Query(level="instance", fields=frozenset({"metadata_json"})))
        assert found["metadata_json"] == meta
        index.set_metadata_json(rec.sop_instance_uid, "m".ljust(64, "0"), meta + " ")
        assert index.get_instance(rec.sop_instance_uid).metadata_json == meta + " "
        with index.engine.connect() as conn:
            stored = conn.execute(text("SELECT metadata_json, metadata_z FROM instances")).one()
        assert stored[0] == "" and len(stored[1]) < len(meta.encode()) // 2


class TestSqliteScale(ScaleContract):
    @pytest.fixture
    def index(self, tmp_path: Path) -> Iterator[SqlIndex]:
        idx = SqlIndex(IndexSettings(url=f"sqlite:///{tmp_path}/index.db", busy_timeout_s=0.2))
        yield idx
        idx.close()

    def test_reads_never_take_the_write_lock(self, index: SqlIndex, tmp_path: Path) -> None:
        fill(index, age_s=60)
        for uid in index.series_due(0, limit=100):
            index.add_job("series", uid)
        for job in index.claim_jobs("w", limit=100):
            index.finish_job(job.id)
        holder = sqlite3.connect(tmp_path / "index.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # a receiver's long commit, say
        try:
            # Everything an idle service does, and the read requests, still answer.
            assert index.counts()["instances"] == 10
            assert index.series_due(0) == []
            assert index.claim_jobs("w") == []
            assert len(index.find(Query(level="study", matches=(
                Match("PatientName", "tran*"),)))) == 1
            assert len(index.instance_metadata("1.1")) == 4
            index.get_jobs()
            index.get_instance("1.1.1.1")
            # The control: a write does wait for the lock, and gives up.
            rec = record(7, series="1.1.1", study="1.1", patient="P1", name="TRẦN^THỊ LAN")
            with pytest.raises(OutOfResourcesError):
                index.add_instances([new(rec, "w")])
        finally:
            holder.execute("ROLLBACK")
            holder.close()

    def test_patient_and_share_reads_never_take_the_write_lock(
            self, index: SqlIndex, tmp_path: Path) -> None:
        # FHIR Patient search read each resource's version and links through a plain
        # connect(), i.e. BEGIN IMMEDIATE: under read load the receiver's commits queued
        # behind SQLite's busy handler (write p99 45 ms against 8 on an empty file,
        # 100,000 instances, issue 21).
        fill(index)
        patients = SqlPatientStore(index)
        share_store = ShareStore(index)
        with index.read() as conn:
            pk, pid, issuer = conn.execute(
                text("SELECT p.id, p.patient_id, p.issuer FROM patients p JOIN studies s"
                     " ON s.patient_pk = p.id WHERE s.study_instance_uid = '1.1'")).one()
        holder = sqlite3.connect(tmp_path / "index.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            assert patients.find(pid, [issuer]) is not None
            assert patients.patient(pk) is not None
            assert patients.study_patient("1.1") is not None
            assert patients.surviving(pid, [issuer]) is None
            assert patients.version(pk) == 1
            assert patients.links(pk) == (None, [])
            assert patients.link_states([pk]) == {pk: (None, [], 1)}
            assert patients.changes() == []
            with pytest.raises(NotFoundError):
                patients.change("nope")
            assert share_store.by_token_hash("x") is None
            assert share_store.get("x") is None
            assert share_store.list() == []
            assert "1.1.1" in (share_store.study_series("1.1") or ())
            assert share_store.study_patient("1.1")[0] == pid
        finally:
            holder.execute("ROLLBACK")
            holder.close()

    def _plan(self, index: SqlIndex, stmt: object) -> str:
        sql = str(stmt.compile(dialect=index.engine.dialect,  # type: ignore[attr-defined]
                               compile_kwargs={"literal_binds": True}))
        with index.engine.connect() as conn:
            rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql).all()
        return "\n".join(str(r[-1]) for r in rows)

    def test_query_plans_use_the_new_indexes(self, index: SqlIndex) -> None:
        fill(index)
        name = self._plan(index, find_query(Query(
            level="study", matches=(Match("PatientName", "NGUY*"),), limit=100)))
        assert "ix_patients_name_key" in name, name
        assert "SCAN patients" not in name and "SCAN instances" not in name, name
        modality = self._plan(index, find_query(Query(
            level="study", matches=(Match("ModalitiesInStudy", "CT"),), limit=100)))
        assert "ix_study_modalities_modality" in modality, modality
        assert "SCAN instances" not in modality, modality
        fuzzy = self._plan(index, find_query(Query(
            level="study", matches=(Match("PatientName", "hung"),), fuzzy=True, limit=100)))
        assert "patient_name_words" in fuzzy and "SCAN patients" not in fuzzy, fuzzy
        # FHIR Patient name/family (any part / family prefix), with its total.
        for names in ((NameSearch(("trần", "nguy")),), (NameSearch(("Đỗ",), family_only=True),)):
            for stmt in (find_query(Query(level="patient", names=names, limit=100)),
                         count_query(Query(level="patient", names=names))):
                plan = self._plan(index, stmt)
                assert "SCAN patients" not in plan, plan
        for column in ("blob_key", "sop_instance_uid"):
            lookup = self._plan(index, text(f"SELECT id FROM instances WHERE {column} = 'x'"))
            assert "SCAN instances" not in lookup, (column, lookup)
        plain = self._plan(index, find_query(Query(level="study", limit=100)))
        assert "SCAN instances" not in plain and "i_n" not in plain, plain


@pytest.mark.postgres
class TestPostgresScale(ScaleContract):
    @pytest.fixture
    def index(self, pg_url: str) -> Iterator[SqlIndex]:
        idx = SqlIndex(IndexSettings(url=pg_url))
        yield idx
        idx.close()


def test_migration_0006_backfills_an_archive_written_at_0004(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/old.db"
    engine = create_engine(url)
    upgrade(engine, "0004")
    old = "2026-11-30 10:00:00.000000"
    newer = "2026-11-30 11:00:00.000000"
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO patients (id, patient_id, issuer, name, updated_at) VALUES "
            "(1, 'P1', '', 'TRẦN^THỊ LAN', :t), (2, 'P2', '', 'Đỗ^VĂN HÙNG', :t)"), {"t": old})
        conn.execute(text(
            "INSERT INTO studies (id, study_instance_uid, patient_pk, created_at, updated_at) "
            "VALUES (1, '1.1', 1, :t, :t), (2, '2.1', 2, :t, :t)"), {"t": old})
        conn.execute(text(
            "INSERT INTO series (id, series_instance_uid, study_pk, modality, updated_at) "
            "VALUES (1, '1.1.1', 1, 'CT', :t), (2, '1.1.2', 1, 'SR', :t), "
            "(3, '2.1.1', 2, 'MR', :t)"), {"t": old})
        for pk, (series_pk, current, at) in enumerate(
                [(1, 1, old), (1, 0, old), (1, 1, old), (2, 1, newer), (3, 1, old)], 1):
            conn.execute(text(
                "INSERT INTO instances (id, sop_instance_uid, series_pk, sop_class_uid, "
                "transfer_syntax_uid, blob_key, size, version, is_current, received_at) "
                "VALUES (:pk, :uid, :s, '1.2', '1.2.840.10008.1.2.1', :key, 1, 1, :c, :t)"),
                {"pk": pk, "uid": f"9.{pk}", "s": series_pk, "key": f"k{pk}", "c": current,
                 "t": at})
        # Series 1.1.1 was rolled up after its last instance; 1.1.2 before its last one;
        # 2.1.1 never. Instance jobs: 2 done, 1 pending.
        conn.execute(text(
            "INSERT INTO jobs (kind, target, status, created_at, updated_at) VALUES "
            "('series', '1.1.1', 'done', :late, :late), ('series', '1.1.2', 'done', :t, :t), "
            "('instance', '9.1', 'done', :t, :t), ('instance', '9.2', 'done', :t, :t), "
            "('instance', '9.3', 'pending', :t, :t)"),
            {"t": old, "late": "2026-11-30 12:00:00.000000"})
    engine.dispose()
    index = SqlIndex(IndexSettings(url=url))  # migrates to head
    try:
        with index.engine.connect() as conn:
            keys = conn.execute(text("SELECT name_key FROM patients ORDER BY id")).scalars()
            assert list(keys) == [person_name_key("TRẦN^THỊ LAN"), "do^van hung"]
            words = conn.execute(text(
                "SELECT patient_pk, word FROM patient_name_words ORDER BY 1, 2")).all()
            assert [tuple(w) for w in words] == [
                (1, "lan"), (1, "thi"), (1, "tran"), (2, "do"), (2, "hung"), (2, "van")]
            pairs = conn.execute(text(
                "SELECT study_pk, modality FROM study_modalities ORDER BY 1, 2")).all()
            assert [tuple(p) for p in pairs] == [(1, "CT"), (1, "SR"), (2, "MR")]
            numbers = conn.execute(text("SELECT num_instances FROM series ORDER BY id"))
            assert list(numbers.scalars()) == [2, 1, 1]
        assert sorted(index.series_due(0)) == ["1.1.2", "2.1.1"]
        counts = index.counts()
        assert (counts["patients"], counts["studies"], counts["series"]) == (2, 2, 3)
        assert (counts["instances"], counts["instances_current"]) == (5, 4)
        assert (counts["jobs_done"], counts["jobs_pending"]) == (4, 1)
        assert studies_of(index, Match("PatientName", "TRAN*")) == {"1.1"}
        assert studies_of(index, Match("ModalitiesInStudy", "SR")) == {"1.1"}
        # The triggers count from here on.
        fill(index)
        assert index.counts()["patients"] == 4  # P1, P2 known; P3, P4 new
    finally:
        index.close()
