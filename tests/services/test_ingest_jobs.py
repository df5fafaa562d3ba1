"""Instance jobs wait for their series' pause and run per batch; the scrub finds rot
(issue 19). Real stores: the SQLite index and the file originals of ``Settings``."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from sqlalchemy import update

from core.settings import Settings
from core.synthetic import write_ct_series
from pacslab.wiring import build_archive, build_index, build_originals
from pacslab.worker_process import build_worker
from services.scrub import OriginalScrub
from storage.index.schema import series
from storage.staging import StagedWriter


def _store(settings: Settings, paths: list[Path]) -> list[str]:
    archive = build_archive(settings)
    uids = []
    for path in paths:
        raw = path.read_bytes()
        ds = dcmread(path, stop_before_pixels=True)
        writer = StagedWriter(archive.staging_dir(), ds.SOPClassUID, ds.SOPInstanceUID,
                              ds.file_meta.TransferSyntaxUID)
        writer.write(raw[144 + int.from_bytes(raw[140:144], "little"):])
        archive.accept(writer.finish(), calling_ae="TEST")
        uids.append(str(ds.SOPInstanceUID))
    archive.close()
    return uids


def _settings(tmp_path: Path, **processing: float) -> Settings:
    settings = Settings(data_dir=tmp_path / "data", auth={"enabled": False},
                        processing=processing)
    build_index(settings, migrate=True).close()
    return settings


def test_instance_jobs_wait_while_their_series_arrives(tmp_path: Path) -> None:
    settings = _settings(tmp_path, series_quiet_s=600, instance_defer_s=300)
    uids = _store(settings, write_ct_series(tmp_path / "ct", slices=3, rows=32, columns=32))
    worker = build_worker(settings)
    index = worker.index
    try:
        assert worker.run_once() == 0  # the series received an instance just now
        assert {j.status for j in index.get_jobs()} == {"pending"}
        with index.write() as conn:  # the sender paused five minutes ago
            conn.execute(update(series).values(rollup_due_at=series.c.rollup_due_at
                                               - _minutes(6)))
        assert worker.run_once() == 3  # one claim, one batch
        jobs = index.get_jobs()
        assert [j.status for j in jobs] == ["done"] * 3
        for uid in uids:
            meta = json.loads(index.get_instance(uid).metadata_json)
            assert meta["00080018"]["Value"] == [uid]
            assert meta["7FE00010"] == {"vr": "OW", "BulkDataURI": ""}
    finally:
        index.close()


FIRST, SECOND = "1.2.826.0.1.3680043.99.1", "1.2.826.0.1.3680043.99.2"


def _quiet_for(index: Any, series_uid: str, minutes: int) -> None:
    """The series' last instance came ``minutes`` ago."""
    with index.write() as conn:
        conn.execute(update(series).where(series.c.series_instance_uid == series_uid)
                     .values(rollup_due_at=datetime.now(UTC) - _minutes(minutes)))


def _done(index: Any) -> set[str]:
    return {j.target for j in index.get_jobs() if j.status == "done"}


@pytest.mark.parametrize("busy", [300.0, 0.0])
def test_instance_jobs_wait_while_another_series_arrives_up_to_the_busy_wait(
    tmp_path: Path, busy: float
) -> None:
    """A series quiet past ``instance_defer_s`` still waits while another one arrives
    (the next transfer is received without the worker beside it), until
    ``instance_defer_busy_s`` after its own last instance; without the busy wait it
    runs at once (the control)."""
    settings = _settings(tmp_path, series_quiet_s=600, instance_defer_s=60,
                         instance_defer_busy_s=busy)
    first = _store(settings, write_ct_series(tmp_path / "a", slices=3, rows=32, columns=32,
                                             series_instance_uid=FIRST))
    second = _store(settings, write_ct_series(tmp_path / "b", slices=2, rows=32, columns=32,
                                              series_instance_uid=SECOND))
    worker = build_worker(settings)
    index = worker.index
    try:
        _quiet_for(index, FIRST, 2)  # past instance_defer_s, the other series arriving
        if busy:
            assert worker.run_once() == 0
            _quiet_for(index, FIRST, 6)  # past the busy wait
        assert worker.run_once() == 3
        assert _done(index) == set(first)
        assert worker.run_once() == 0  # the other series is still arriving
        _quiet_for(index, SECOND, 2)
        assert worker.run_once() == 2
        assert _done(index) == set(first) | set(second)
    finally:
        index.close()


def _minutes(n: int) -> object:
    from datetime import timedelta

    return timedelta(minutes=n)


def test_an_unreadable_instance_fails_alone_in_its_batch(tmp_path: Path) -> None:
    settings = _settings(tmp_path, series_quiet_s=0)
    uids = _store(settings, write_ct_series(tmp_path / "ct", slices=3, rows=32, columns=32))
    worker = build_worker(settings)
    index = worker.index
    try:
        lost = index.get_instance(uids[1])
        path = build_originals(settings).path(lost.blob_key)
        path.chmod(0o600)
        path.unlink()
        assert worker.run_once() == 3
        jobs = {j.target: j for j in index.get_jobs()}
        assert jobs[uids[1]].status == "failed" and "missing" in (jobs[uids[1]].error or "")
        assert jobs[uids[0]].status == jobs[uids[2]].status == "done"
        assert index.get_instance(uids[0]).metadata_json
        assert index.get_instance(uids[2]).metadata_json
        assert index.get_instance(uids[1]).metadata_json in ("", "{}")  # not computed
    finally:
        index.close()


def test_the_scrub_waits_for_ingest_then_finds_a_damaged_original(tmp_path: Path) -> None:
    settings = _settings(tmp_path, series_quiet_s=0)
    uids = _store(settings, write_ct_series(tmp_path / "ct", slices=3, rows=32, columns=32))
    worker = build_worker(settings)
    index = worker.index
    originals = build_originals(settings)
    damaged = index.get_instance(uids[2])
    path = originals.path(damaged.blob_key)
    path.chmod(0o600)
    with path.open("r+b") as fp:  # one bit of the data set flipped on disk
        fp.seek(-1, os.SEEK_END)
        last = fp.read(1)
        fp.seek(-1, os.SEEK_END)
        fp.write(bytes([last[0] ^ 1]))
    scrub = OriginalScrub(index, originals, per_turn=2)
    try:
        assert scrub.step() == 0  # the series' roll-up is still owed: ingest first
        for _ in range(5):
            if not worker.run_once():
                for hook in worker.on_idle:
                    hook()
        assert index.latest_job("series", damaged.series_instance_uid) is not None
        assert scrub.step() == 2
        assert scrub.mismatched == []
        assert scrub.step() == 1
        assert scrub.mismatched == [uids[2]]
        assert scrub.step() == 0  # the pass is over; the next one waits
        # the instance jobs no longer verified the original: all of them ran
        assert {j.status for j in index.get_jobs()} == {"done"}
    finally:
        index.close()
