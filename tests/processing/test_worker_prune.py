"""The worker deletes finished instance jobs past their retention (issue 21), in
bounded batches and at most every ``prune_every_s``, against a real SQLite index."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from core.instance import InstanceRecord
from core.settings import IndexSettings
from processing.worker import JobWorker
from storage.abc import NewInstance
from storage.index.sql import SqlIndex


def _fill(index: SqlIndex, n: int) -> None:
    index.add_instances([
        NewInstance(record=InstanceRecord(
            sop_class_uid="1.2", sop_instance_uid=f"1.2.3.{i}", study_instance_uid="1.2",
            series_instance_uid="1.2.3", transfer_syntax_uid="1.2.840.10008.1.2.1",
            patient_id="P1", patient_name="LÊ^HOA", modality="CT"),
            blob_key=f"{i:064x}", size=1, calling_ae="CT1", received_at=datetime.now(UTC))
        for i in range(n)])


def test_prune_done_jobs(tmp_path: Path) -> None:
    index = SqlIndex(IndexSettings(url=f"sqlite:///{tmp_path}/index.db"))
    try:
        _fill(index, 6)
        worker = JobWorker(index, {"instance": lambda job: {}}, name="w", batch=4,
                           prune_after_s=0.000001, prune_every_s=3600)
        while worker.run_once():
            pass
        index.add_job("series", "1.2.3")  # a series job is never pruned
        index.fail_job(index.claim_jobs("w")[0].id, "kept: failures stay visible")
        index.add_job("series", "1.2.3")
        assert index.counts()["jobs_done"] == 6
        assert worker.prune_done() == 6
        assert index.counts()["jobs_done"] == 0
        assert [j.kind for j in index.get_jobs()] == ["series", "series"]
        # Not again before prune_every_s: nothing is read.
        assert worker.prune_done() == 0
        off = JobWorker(index, {}, name="x")  # prune_after_s=0: keeps everything
        assert off.prune_done() == 0
    finally:
        index.close()
