"""Issue 21: the hot and periodic statements keep their indexes (SQLite query plans).

Not timings: each test runs a path of the service against a small index, records every
statement SQLite is handed (the connection's trace callback, with the values bound),
and asks SQLite for its plan (``EXPLAIN QUERY PLAN``). A statement that reads a big
table from end to end (``SCAN instances``) or sorts every match before its limit
(``USE TEMP B-TREE FOR ORDER BY`` inside the page's subquery) fails: on an index of a
year of images that is the statement whose cost grows with the archive.
"""

from __future__ import annotations

import re
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, select

from core.settings import IndexSettings
from storage.index.queries import Match, NameSearch, Query, find_query
from storage.index.schema import series, studies
from storage.index.sql import SqlIndex
from tests.storage.test_index_scale import PEOPLE, fill, new, record

#: Tables that grow with the archive (jobs: one row per instance received).
BIG = ("instances", "series", "studies", "patients", "jobs", "patient_name_words",
       "study_modalities")
#: The aliases our statements give those tables: SQLite's plan names a table by its
#: alias, so ``SCAN sm_m`` (every row of study_modalities, for ``ModalitiesInStudy=C*``)
#: went unseen while only table names were looked for.
ALIASES = ("sm", "sm_m", "sm_v", "sm_w", "se_v", "se_n", "old", "surv")
_SCAN = re.compile(rf"^SCAN ({'|'.join(BIG + ALIASES)})\b")  # with or without an index: all


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small filled index, built once (migrations and all) and copied per test."""
    path = tmp_path_factory.mktemp("plans") / "index.db"
    idx = SqlIndex(IndexSettings(url=f"sqlite:///{path}"))
    fill(idx, age_s=60)
    idx.close()  # the last connection: the WAL is checkpointed into the file
    return path


@pytest.fixture
def index(template: Path, tmp_path: Path) -> Iterator[SqlIndex]:
    shutil.copyfile(template, tmp_path / "index.db")
    idx = SqlIndex(IndexSettings(url=f"sqlite:///{tmp_path}/index.db"))
    yield idx
    idx.close()


@pytest.fixture
def traced() -> Iterator[list[str]]:
    """Every statement run on a SQLite connection opened while the fixture is active."""
    seen: list[str] = []

    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        if isinstance(dbapi_conn, sqlite3.Connection):
            dbapi_conn.set_trace_callback(seen.append)

    event.listen(Engine, "connect", on_connect)
    try:
        yield seen
    finally:
        event.remove(Engine, "connect", on_connect)


def _plans(index: SqlIndex, statements: list[str]) -> dict[str, list[tuple[int, int, str]]]:
    """Plan rows (id, parent, detail) of each statement that reads or writes rows."""
    out: dict[str, list[tuple[int, int, str]]] = {}
    path = index.url.removeprefix("sqlite:///")
    conn = sqlite3.connect(path)
    conn.create_function("lower", 1, lambda v: v.lower() if isinstance(v, str) else v)
    try:
        for sql in statements:
            head = sql.lstrip().split(None, 1)[0].upper() if sql.strip() else ""
            if head not in ("SELECT", "UPDATE", "DELETE", "INSERT", "WITH"):
                continue
            rows = conn.execute("EXPLAIN QUERY PLAN " + sql).fetchall()
            out[sql] = [(r[0], r[1], str(r[-1])) for r in rows]
    finally:
        conn.close()
    return out


def _run(index: SqlIndex, traced: list[str], call: Callable[[], object]) -> dict[
        str, list[tuple[int, int, str]]]:
    # New connections, traced from the start (the receiver's engine too).
    for engine in {index.engine, index._ingest()[0]}:
        engine.dispose()
    traced.clear()
    call()
    assert traced, "no statement traced"
    return _plans(index, list(traced))


def _no_full_scan(plans: dict[str, list[tuple[int, int, str]]]) -> None:
    for sql, rows in plans.items():
        for _id, _parent, detail in rows:
            assert not _SCAN.match(detail), (detail, sql)


_LIMITED_MEMBER = re.compile(r"LIMIT \d+ OFFSET \d+\) AS anon_\d+")


def _no_sort_before_limit(plans: dict[str, list[tuple[int, int, str]]]) -> None:
    """Only the outermost query (the page's own rows) may sort; the subquery that
    chooses the page must read its rows in order off an index and stop at the limit.

    One exception, the merge of a ModalitiesInStudy list's pages (``MERGE (UNION)``):
    SQLite sorts each member's rows again for the merge, but every member is a read
    that stopped at its own LIMIT (offset + limit rows), which the SQL must show."""
    for sql, rows in plans.items():
        parents = {id_: detail for id_, _parent, detail in rows}
        members = sql.count(" UNION SELECT ") + 1
        for _id, parent, detail in rows:
            if not detail.startswith("USE TEMP B-TREE FOR ORDER BY") or parent == 0:
                continue
            merged = parents.get(parent) in ("LEFT", "RIGHT")
            assert merged and len(_LIMITED_MEMBER.findall(sql)) == members > 1, (detail, sql)


def _no_list_before_limit(plans: dict[str, list[tuple[int, int, str]]]) -> None:
    """Nor may it first collect every match of one key into a list (``x IN (SELECT …)``
    as a ``LIST SUBQUERY`` under the page's own): ``ModalitiesInStudy=CT`` listed
    every CT study of the archive before the page's first row (issue 21)."""
    for sql, rows in plans.items():
        for _id, parent, detail in rows:
            if detail.startswith("LIST SUBQUERY"):
                assert parent == 0, (detail, sql)


def test_receiver_write_uses_indexes(index: SqlIndex, traced: list[str]) -> None:
    rec = record(3, series="1.1.1", study="1.1", patient="P1", name="TRẦN^THỊ LAN")
    plans = _run(index, traced, lambda: index.add_instances([new(rec, "plan-w")]))
    _no_full_scan(plans)


def test_periodic_paths_use_indexes(index: SqlIndex, traced: list[str]) -> None:
    """What the worker and /metrics run every fraction of a second, idle or not."""
    def periodic() -> None:
        for uid in index.series_due(10, limit=50):
            index.add_job("series", uid)
        jobs = index.claim_jobs("w", limit=8)
        index.finish_jobs([(j.id, {}) for j in jobs])
        index.claim_jobs("w", limit=8)
        index.requeue_stale_jobs(300, give_up_after=3)
        index.prune_jobs(0)
        index.counts()

    plans = _run(index, traced, periodic)
    _no_full_scan(plans)


@pytest.mark.parametrize(("matches", "sort_ok"), [
    ((Match("PatientName", "NGUY*"),), False),
    ((Match("PatientName", "trần*"),), False),
    ((Match("PatientName", "ĐỖ^VĂN HÙNG"),), False),
    ((Match("StudyDate", "20261101-20261231"),), False),
    ((Match("StudyDate", "20261101-"),), False),
    ((Match("ModalitiesInStudy", "CT"),), False),
    # Two keys: the date's or the name's index chooses the page, the modality is a key
    # lookup per study read.
    ((Match("ModalitiesInStudy", "CT"), Match("StudyDate", "20261101-20261231")), False),
    ((Match("ModalitiesInStudy", "CT"), Match("PatientName", "NGUY*")), False),
    # A list or a wildcard: one page per modality off its index, merged; a wildcard
    # resolved to the archive's modalities by a loose scan of that index first.
    ((Match("ModalitiesInStudy", "CT\\MR"),), False),
    ((Match("ModalitiesInStudy", "CT,MR,US"),), False),
    ((Match("ModalitiesInStudy", "C*"),), False),
    ((Match("ModalitiesInStudy", "?R"),), False),
    ((Match("ModalitiesInStudy", "C*"), Match("StudyDate", "20261101-20261231")), False),
    ((Match("ModalitiesInStudy", "CT\\MR"), Match("PatientName", "NGUY*")), False),
    # Equality on a patient's or a study's own key: a handful of rows to sort.
    ((Match("PatientID", "P1"),), True),
    ((Match("AccessionNumber", "AP1"),), True),
], ids=lambda m: "+".join(f"{x.keyword}={x.value}" for x in m) if isinstance(m, tuple) else "")
def test_qido_study_search_reads_a_page_off_an_index(
        index: SqlIndex, traced: list[str], matches: tuple[Match, ...], sort_ok: bool) -> None:
    """QIDO-RS and C-FIND study searches with the default limit (and a second page, by
    offset and by the keyset QIDO-RS's ``next`` Link carries)."""
    def search() -> None:
        index.find(Query(level="study", matches=matches, limit=101))
        index.find(Query(level="study", matches=matches, limit=101, offset=100))
        index.find(Query(level="study", matches=matches, limit=101, after="3.1"))

    plans = _run(index, traced, search)
    _no_full_scan(plans)
    if not sort_ok:
        _no_sort_before_limit(plans)
        _no_list_before_limit(plans)


def test_viewer_modality_filter_reads_a_page_off_its_index(
        index: SqlIndex, traced: list[str]) -> None:
    """The viewer's list (newest first) filtered by modality, and the FHIR
    ImagingStudy ``modality`` search (one code), with their totals."""
    for value in ("CT", "CT\\MR", "?T"):
        ct = (Match("ModalitiesInStudy", value),)
        plans = _run(index, traced, lambda ct=ct: (  # type: ignore[misc]
            index.find(Query(level="study", matches=ct, limit=51, newest_first=True)),
            index.find(Query(level="study", matches=ct, limit=51, offset=50,
                             newest_first=True)),
            index.find(Query(level="study", matches=(*ct, Match("PatientName", "TRAN*")),
                             limit=51, newest_first=True)),
        ))
        _no_full_scan(plans)
        _no_sort_before_limit(plans)
        _no_list_before_limit(plans)
        assert any("ix_study_modalities_modality (modality=?)" in d for rows in plans.values()
                   for *_, d in rows), plans


def test_default_listing_stops_at_its_limit(index: SqlIndex, traced: list[str]) -> None:
    """No matching key: the primary key's order, read until the page is full (a SCAN
    of studies, but one that stops: no sort of every study before the limit)."""
    plans = _run(index, traced, lambda: (
        index.find(Query(level="study", limit=101)),
        index.find(Query(level="study", limit=51, newest_first=True)),
    ))
    _no_sort_before_limit(plans)
    for rows in plans.values():
        assert not any(d.startswith(("SCAN instances", "SCAN series")) for *_, d in rows), rows


def test_fhir_and_viewer_reads_use_indexes(index: SqlIndex, traced: list[str]) -> None:
    def reads() -> None:
        index.find(Query(level="patient", names=(NameSearch(("trần",)),), limit=101))
        index.count(Query(level="patient", names=(NameSearch(("đỗ",), family_only=True),)))
        index.find(Query(level="study", matches=(Match("PatientName", "tran*"),),
                         limit=51, newest_first=True))
        index.instance_metadata("1.1")
        index.find(Query(level="series", matches=(Match("StudyInstanceUID", "1.1"),)))
        index.find(Query(level="instance", matches=(Match("SeriesInstanceUID", "1.1.1"),),
                         limit=101))
        with index.read() as conn:  # the viewer's series panel (api/routes/viewer.py)
            conn.execute(select(series.c.series_instance_uid)
                         .select_from(series.join(studies, series.c.study_pk == studies.c.id))
                         .where(studies.c.study_instance_uid == "1.1",
                                series.c.num_instances > 0)).all()

    plans = _run(index, traced, reads)
    _no_full_scan(plans)


def test_the_page_order_follows_the_index(index: SqlIndex) -> None:
    """The order chosen so (name key, date) pages come off their index: by the folded
    name, then by date; each ends in the study key, so paging is stable."""
    def uids(*matches: Match, **kw: Any) -> list[str]:
        return [r["StudyInstanceUID"] for r in index.find(
            Query(level="study", matches=matches, **kw))]

    by_name = uids(Match("PatientName", "N*"))
    assert by_name == ["3.1", "4.1"]  # nguyen^anh, then nguyen^binh
    assert uids(Match("PatientName", "N*"), limit=1) + uids(
        Match("PatientName", "N*"), limit=1, offset=1) == by_name
    assert sorted(uids(Match("PatientName", "*"))) == sorted({st for st, *_ in PEOPLE})
    sql = str(find_query(Query(level="study", matches=(Match("StudyDate", "20260101-"),),
                               limit=5)))
    assert "study_date" in sql.rsplit("ORDER BY", 1)[1]


def test_patient_versions_and_changes_read_the_link_table_index(
        index: SqlIndex, traced: list[str]) -> None:
    """IHE PIR (issue 21): a patient's version (FHIR ``meta.versionId``, checked for
    ``If-Match``), a search page's versions and a patient's changes are ranges of
    ``patient_change_patients``' primary key (patient_pk, change_pk), not a ``LIKE``
    over every row of the change log, which grows with the archive."""
    from storage.index.patients import SqlPatientStore

    store = SqlPatientStore(index)
    plans = _run(index, traced, lambda: (
        store.version(1),
        store.link_states([1, 2, 3]),
        store.changes(patient_pk=1, limit=20),
    ))
    _no_full_scan(plans)
    _no_sort_before_limit(plans)
    details = [d for rows in plans.values() for *_, d in rows]
    assert not any(d.startswith("SCAN patient_change") for d in details), plans
    version = next(rows for sql, rows in plans.items()
                   if "count(*)" in sql and "patient_change_patients" in sql
                   and "GROUP BY" not in sql)
    assert [d for *_, d in version] == [
        "SEARCH patient_change_patients USING COVERING INDEX"
        " sqlite_autoindex_patient_change_patients_1 (patient_pk=?)"], version
