"""One contract for every MetadataIndex backend (STYLE.md example C, zarr's StoreTests).

SQLite always runs; PostgreSQL runs against the session's throwaway server
(``tests/conftest_pg.py``: started from the Debian binaries, or the server named by
PACSLAB_TEST_POSTGRES_URL), each test in a fresh database migrated by Alembic.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import text

from core.errors import NotFoundError
from core.instance import InstanceRecord
from core.settings import IndexSettings
from storage.abc import MetadataIndex, NewInstance
from storage.index.queries import Match, Query
from storage.index.sql import SqlIndex


def record(i: int, *, series: str = "1.2.3.1", study: str = "1.2.3", patient: str = "P1"
           ) -> InstanceRecord:
    return InstanceRecord(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid=f"1.2.3.1.{i}",
        study_instance_uid=study, series_instance_uid=series,
        transfer_syntax_uid="1.2.840.10008.1.2.1", patient_id=patient,
        patient_name="TRẦN^THỊ BÌNH", modality="CT", instance_number=i, rows=512,
        columns=512, study_date="20261125", accession_number="ACC1")


def new(rec: InstanceRecord, key: str) -> NewInstance:
    return NewInstance(record=rec, blob_key=key.ljust(64, "0"), size=10, calling_ae="CT1",
                       received_at=datetime.now(UTC))


class IndexContract:
    @pytest.fixture
    def index(self, tmp_path: Path) -> MetadataIndex:
        raise NotImplementedError

    def test_add_then_find(self, index: SqlIndex) -> None:
        outcomes = index.add_instances([new(record(i), f"{i:x}") for i in range(1, 4)])
        assert [o.status for o in outcomes] == ["stored"] * 3
        inst = index.get_instance("1.2.3.1.2")
        assert (inst.series_instance_uid, inst.study_instance_uid, inst.version) == (
            "1.2.3.1", "1.2.3", 1)
        assert [i.instance_number for i in index.series_instances("1.2.3.1")] == [1, 2, 3]
        counts = index.counts()
        assert counts["patients"] == counts["studies"] == counts["series"] == 1
        assert counts["instances"] == 3 and counts["jobs_pending"] == 3

    def test_same_bytes_stored_once(self, index: SqlIndex) -> None:
        index.add_instances([new(record(1), "a")])
        assert index.add_instances([new(record(1), "a")])[0].status == "duplicate"
        assert index.counts()["instances"] == 1 and index.counts()["jobs_pending"] == 1

    def test_other_bytes_add_a_current_version(self, index: SqlIndex) -> None:
        index.add_instances([new(record(1), "a")])
        out = index.add_instances([new(record(1), "b")])[0]
        assert (out.status, out.version) == ("replaced", 2)
        versions = index.instance_versions("1.2.3.1.1")
        assert [(v.version, v.is_current) for v in versions] == [(1, False), (2, True)]
        assert index.get_instance("1.2.3.1.1").blob_key.startswith("b")

    def test_both_versions_in_one_batch(self, index: SqlIndex) -> None:
        out = index.add_instances([new(record(1), "a"), new(record(1), "b"),
                                   new(record(1), "a")])
        assert [o.status for o in out] == ["stored", "replaced", "duplicate"]

    def test_unknown_instance(self, index: SqlIndex) -> None:
        with pytest.raises(NotFoundError):
            index.get_instance("9.9.9")

    def test_empty_patient_ids_are_not_merged(self, index: SqlIndex) -> None:
        index.add_instances([new(record(1, patient="", study="1.1", series="1.1.1"), "a"),
                             new(record(2, patient="", study="2.2", series="2.2.1"), "b")])
        assert index.counts()["patients"] == 2

    def test_jobs_claim_finish_fail_requeue(self, index: SqlIndex) -> None:
        index.add_instances([new(record(i), f"{i:x}") for i in range(1, 4)])
        first = index.claim_jobs("w1", limit=2)
        second = index.claim_jobs("w2", limit=5)
        assert len(first) == 2 and len(second) == 1
        assert not {j.id for j in first} & {j.id for j in second}
        index.finish_jobs([(first[0].id, {"ok": True})])
        index.fail_job(first[1].id, "boom", retry_in_s=None)
        assert index.requeue_stale_jobs(0) == 1  # second[0] was left running
        counts = index.counts()
        assert (counts["jobs_done"], counts["jobs_failed"], counts["jobs_pending"]) == (1, 1, 1)
        retried = index.claim_jobs("w3")
        assert retried[0].attempts == 2

    def test_the_change_signal_moves_with_committed_work(self, index: SqlIndex) -> None:
        """``data_version()``: what the idle worker polls instead of the job queue
        (issue 21). It moves after instances, a new job, a retry and a requeue are
        committed, so a worker that saw it unchanged may skip its queries."""
        from tests.support import wait_until

        def moves_after(commit: Callable[[], object]) -> None:
            seen = index.data_version()
            assert seen is not None
            commit()
            wait_until(lambda: index.data_version() != seen,
                       message="committed work left the signal unchanged")

        moves_after(lambda: index.add_instances([new(record(1), "1")]))
        moves_after(lambda: index.add_job("forward", "1.2.3.1.1"))
        claimed = index.claim_jobs("w1", limit=2)
        moves_after(lambda: index.fail_job(claimed[0].id, "peer down", retry_in_s=0))
        moves_after(lambda: index.requeue_stale_jobs(0))

    def test_renewed_leases_are_not_requeued(self, index: SqlIndex) -> None:
        index.add_instances([new(record(i), f"{i:x}") for i in range(1, 4)])
        mine = index.claim_jobs("w1", limit=2)
        theirs = index.claim_jobs("w2", limit=1)
        threading.Event().wait(0.05)
        # Only w1's running jobs are renewed, whoever asks for which ids.
        assert index.renew_jobs("w1", [j.id for j in mine + theirs]) == 2
        assert index.requeue_stale_jobs(0.04) == 1  # w2's lease ran out, w1's did not
        assert {j.id for j in index.get_jobs() if j.status == "running"} == {
            j.id for j in mine}
        index.finish_jobs([(mine[0].id, {})])
        assert index.renew_jobs("w1", [j.id for j in mine]) == 1  # done is not renewed
        assert index.renew_jobs("w1", []) == 0

    def test_a_job_its_workers_keep_dying_under_is_given_up_alone(self, index: SqlIndex) -> None:
        index.add_instances([new(record(i), f"{i:x}") for i in range(1, 5)])
        batch = index.claim_jobs("w", limit=8)  # the worker dies running the first one
        assert len(batch) == 4
        assert index.requeue_worker_jobs("w", give_up_after=3) == 4
        poison = index.claim_jobs("w", limit=8)
        assert [j.id for j in poison] == [batch[0].id]  # a retried job runs on its own
        assert index.requeue_worker_jobs("w", give_up_after=3) == 1  # second death
        assert [j.id for j in index.claim_jobs("w", limit=8)] == [batch[0].id]
        assert index.requeue_worker_jobs("w", give_up_after=3) == 0  # third: given up
        failed = [j for j in index.get_jobs() if j.status == "failed"]
        assert [j.id for j in failed] == [batch[0].id]
        assert "stopped while running it 3 times" in failed[0].error
        # its neighbours, interrupted once, are run and finish normally
        rest = [index.claim_jobs("w", limit=8) for _ in range(3)]
        assert sorted(j.id for c in rest for j in c) == sorted(j.id for j in batch[1:])
        index.finish_jobs([(j.id, {}) for c in rest for j in c])
        assert index.counts()["jobs_done"] == 3

    def test_concurrent_writers(self, index: SqlIndex) -> None:
        errors: list[BaseException] = []

        def write(t: int) -> None:
            try:
                for i in range(20):
                    rec = record(t * 100 + i, series=f"1.2.3.{t}")
                    index.add_instances([new(rec, f"{t}{i:03d}")])
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=write, args=(t,)) for t in range(1, 5)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert errors == []
        assert index.counts()["instances"] == 80 and index.counts()["series"] == 4

    def test_same_instance_from_concurrent_writers_is_stored_once(self, index: SqlIndex
                                                                    ) -> None:
        """Two receivers given the same study at once (issue #8 §4): one row per instance."""
        outcomes: list[str] = []
        errors: list[BaseException] = []
        barrier = threading.Barrier(4)

        def write() -> None:
            try:
                barrier.wait()
                for i in range(15):
                    out = index.add_instances([new(record(i, series="1.2.3.9"), f"{i:03x}")])
                    outcomes.append(out[0].status)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=write) for _ in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert errors == []
        assert sorted(outcomes) == ["duplicate"] * 45 + ["stored"] * 15
        assert index.counts()["instances"] == 15 and index.counts()["jobs_pending"] == 15
        assert all(v.version == 1 for i in range(15)
                   for v in index.instance_versions(f"1.2.3.1.{i}"))

    def test_concurrent_new_versions_get_distinct_numbers(self, index: SqlIndex) -> None:
        errors: list[BaseException] = []
        barrier = threading.Barrier(4)

        def write(t: int) -> None:
            try:
                barrier.wait()
                for i in range(5):
                    index.add_instances([new(record(1), f"{t}{i}")])
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=write, args=(t,)) for t in range(1, 5)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert errors == []
        versions = index.instance_versions("1.2.3.1.1")
        assert [v.version for v in versions] == list(range(1, 21))
        assert [v.is_current for v in versions] == [False] * 19 + [True]

    def test_record_fields_round_trip(self, index: SqlIndex) -> None:
        rec = replace(record(1), series_number=7)
        index.add_instances([new(rec, "a")])
        with index.engine.connect() as conn:
            name = conn.execute(text("SELECT name FROM patients")).scalar_one()
        assert name == "TRẦN^THỊ BÌNH"

    def test_study_aggregates_are_per_study(self, index: SqlIndex) -> None:
        """ModalitiesInStudy and the study counts come from the study's own series
        (issue 13.1; PS3.18 Table 10.6.1-5), on every backend; a study-level key
        filters series too (PS3.18 10.6.1.2)."""
        recs = [record(1), replace(record(2, series="1.2.3.2"), modality="PT"),
                replace(record(3, series="1.2.4.1", study="1.2.4"), modality="MR")]
        index.add_instances([new(r, f"{i:x}") for i, r in enumerate(recs, 1)])
        rows = index.find(Query(level="study"))
        got = {r["StudyInstanceUID"]: (sorted(r["ModalitiesInStudy"].split("\\")),
                                       r["NumberOfStudyRelatedSeries"],
                                       r["NumberOfStudyRelatedInstances"]) for r in rows}
        assert got == {"1.2.3": (["CT", "PT"], 2, 2), "1.2.4": (["MR"], 1, 1)}
        series_of_mr = index.find(Query(level="series", matches=(
            Match("ModalitiesInStudy", "MR"),)))
        assert [r["SeriesInstanceUID"] for r in series_of_mr] == ["1.2.4.1"]


class TestSqliteIndex(IndexContract):
    @pytest.fixture
    def index(self, tmp_path: Path) -> SqlIndex:
        idx = SqlIndex(IndexSettings(url=f"sqlite:///{tmp_path}/index.db"))
        yield idx  # type: ignore[misc]
        idx.close()


@pytest.mark.postgres
class TestPostgresIndex(IndexContract):
    @pytest.fixture
    def index(self, pg_url: str) -> SqlIndex:
        idx = SqlIndex(IndexSettings(url=pg_url))
        yield idx  # type: ignore[misc]
        idx.close()
