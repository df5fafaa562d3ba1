"""The original journal (storage/journal.py; issue 19): instances made durable in a
zero-filled segment, readable at once, written out as ordinary files when idle, and
after a crash by the next process; never an original the index does not reference.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import delete, select, update

from core.errors import NotFoundError
from core.settings import IndexSettings
from core.synthetic import write_ct_series
from storage.archive import Archive, make_journal
from storage.index.schema import instances, jobs, journal_marks
from storage.index.sql import SqlIndex
from storage.journal import (
    HEADER_BYTES,
    OriginalJournal,
    parse_location,
    read_records,
    segment_path,
)
from storage.originals import FileOriginalStore
from storage.staging import StagedFile, StagedWriter, stage_part10


@pytest.fixture
def index(tmp_path: Path) -> Iterator[SqlIndex]:
    idx = SqlIndex(IndexSettings(url=f"sqlite:///{tmp_path / 'index.db'}", migrate=True))
    yield idx
    idx.close()


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    return write_ct_series(tmp_path / "ct", slices=6, rows=64, columns=64)


def _archive(tmp_path: Path, index: SqlIndex, *, mb: int = 8) -> Archive:
    originals = FileOriginalStore(tmp_path / "originals")
    archive = Archive(originals, index, quarantine=tmp_path / "q",
                      journal=make_journal(originals, "test", mb << 20))
    archive.open_journal(background=False)
    return archive


def _stage(archive: Archive, path: Path) -> StagedFile:
    with path.open("rb") as fp:
        return stage_part10(archive.staging_dir(), fp, fsync=False, in_memory=True)


def _journal(archive: Archive) -> OriginalJournal:
    assert archive.journal is not None
    return archive.journal


def pydicom_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _dcm_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.dcm") if ".staging" not in p.parts]


def test_in_memory_writer_keeps_the_bytes_a_staged_file_has(tmp_path: Path,
                                                            files: list[Path]) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    with files[0].open("rb") as fp:
        on_disk = stage_part10(staging, fp, fsync=False)
    with files[0].open("rb") as fp:
        in_memory = stage_part10(staging, fp, fsync=False, in_memory=True)
    assert not in_memory.path.exists()
    assert in_memory.body == on_disk.path.read_bytes()
    assert (in_memory.key, in_memory.size, in_memory.head, in_memory.tail) == (
        on_disk.key, on_disk.size, on_disk.head, on_disk.tail)
    assert in_memory.ensure_file().read_bytes() == in_memory.body


def test_in_memory_writer_spills_to_a_file_past_one_buffer(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    writer = StagedWriter(staging, "1.2.840.10008.5.1.4.1.1.7", "1.2.3", "1.2.840.10008.1.2.1",
                          in_memory=True)
    data = os.urandom(3 << 20)
    writer.write(data)
    staged = writer.finish(fsync=False)
    assert staged.body is None
    assert staged.path.read_bytes()[staged.dataset_offset:] == data
    assert staged.key == hashlib.sha256(data).hexdigest()


def test_journaled_instance_is_readable_at_once_and_a_file_once_idle(
    tmp_path: Path, index: SqlIndex, files: list[Path]
) -> None:
    archive = _archive(tmp_path, index)
    try:
        staged = [_stage(archive, f) for f in files]
        bodies = [bytes(s.body or b"") for s in staged]  # (accept releases the buffer)
        accepted = [archive.accept(s) for s in staged]
        assert all(s.body is None for s in staged)
        originals = archive.originals
        assert _dcm_files(tmp_path / "originals") == []  # nothing but the journal yet
        for body, acc in zip(bodies, accepted, strict=True):
            with originals.open(acc.key) as fp:
                assert fp.read() == body
            assert originals.exists(acc.key)
        # A caller that needs a file (SimpleITK, storescu) gets one.
        first = originals.path(accepted[0].key)
        assert first.is_file()
        with originals.open(accepted[0].key) as fp:
            assert first.read_bytes() == fp.read()

        written = _journal(archive).checkpoint()
        assert written == len(files)
        assert len(_dcm_files(tmp_path / "originals")) == len(files)
        assert index.pending_originals() == []  # marks dropped with the segment
        for body, st in zip(bodies, staged, strict=True):
            assert originals.path(st.key).read_bytes() == body
    finally:
        archive.close()


def test_direct_and_buffered_appends_write_the_same_records(
    tmp_path: Path, index: SqlIndex, files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The direct-I/O append (from the receiver's page-aligned buffer) against the
    buffered one it replaces where the file system has no O_DIRECT: byte for byte."""
    import storage.staging as staging_module

    segments: dict[str, bytes] = {}
    for mode in ("direct", "buffered"):
        if mode == "buffered":
            monkeypatch.setattr(staging_module, "_O_DIRECT", 0)
        root = tmp_path / mode
        archive = _archive(root, index)
        journal = _journal(archive)
        assert journal._direct[0] is (mode == "direct")
        journal.idle_s = 3600
        journal.id = "0" * 32  # (the same ids and sequence numbers in both)
        try:
            for f in files:
                staged = _stage(archive, f)
                assert staged.body is not None
                ticket = journal.append(staged.key, staged.body, staged.dataset_offset,
                                        b'{"ae":"X"}', aligned=staged.aligned_body())
                assert ticket is not None
                journal.sync(ticket)
                journal.done(ticket)
                staged.release()
            seg = segment_path(journal.journals, journal.name, 0)
            segments[mode] = seg.read_bytes()[: journal._fill[0]]
            assert len(list(read_records(seg))) == len(files)
        finally:
            journal.id = ""  # (nothing of it is indexed: no write-out at close)
            archive.close()
    assert segments["direct"] == segments["buffered"]


def test_records_the_index_does_not_reference_are_never_written_out(
    tmp_path: Path, index: SqlIndex, files: list[Path]
) -> None:
    archive = _archive(tmp_path, index)
    journal = _journal(archive)
    try:
        kept = archive.accept(_stage(archive, files[0]))
        # Journaled and made durable, but never indexed (the index failed, or a crash
        # came before the row): not an original.
        orphan = _stage(archive, files[1])
        assert orphan.body is not None
        ticket = journal.append(orphan.key, orphan.body, orphan.dataset_offset,
                                aligned=orphan.aligned_body())
        assert ticket is not None
        journal.sync(ticket)
        journal.done(ticket)
        # Deleted while still journaled (as retention does: the rows, then the original
        # no row references): not written out either, and gone at once.
        deleted = archive.accept(_stage(archive, files[2]))
        with index.engine.begin() as conn:
            conn.execute(delete(instances).where(instances.c.blob_key == deleted.key))
        archive.originals.delete(deleted.key)
        with pytest.raises(NotFoundError):
            archive.originals.open(deleted.key)

        journal.checkpoint()
        names = {p.stem for p in _dcm_files(tmp_path / "originals")}
        assert names == {kept.key}
    finally:
        archive.close()


def _crash(archive: Archive) -> None:
    """What a crash leaves: the process gone (its lock with it), nothing written out."""
    journal = _journal(archive)
    for fd in journal._fds:
        if fd is not None:
            os.close(fd)
    journal._fds = [None] * len(journal._fds)
    assert journal._lock_fd is not None
    os.close(journal._lock_fd)
    journal._lock_fd = None
    journal._closed = True


def _lose_commit(index: SqlIndex, key: str) -> None:
    """What a power cut does to a commit made without a WAL flush: its rows are gone,
    its mark with them."""
    with index.engine.begin() as conn:
        uids = [r[0] for r in conn.execute(
            select(instances.c.sop_instance_uid).where(instances.c.blob_key == key))]
        conn.execute(delete(jobs).where(jobs.c.target.in_(uids)))
        conn.execute(delete(instances).where(instances.c.blob_key == key))
    journal_id, seq = _MARKS[key]
    with index.engine.begin() as conn:
        conn.execute(delete(journal_marks).where(
            (journal_marks.c.journal == journal_id) & (journal_marks.c.seq == seq)))


_MARKS: dict[str, tuple[str, int]] = {}
_BODIES: dict[str, bytes] = {}


def _accept_marked(archive: Archive, path: Path) -> str:
    """Accept ``path`` through the journal; its key (and its mark, noted)."""
    journal = _journal(archive)
    before = journal._seq
    staged = _stage(archive, path)
    assert staged.body is not None
    body = bytes(staged.body)
    acc = archive.accept(staged)
    assert journal._seq == before + 1  # journaled, not the file path
    _MARKS[acc.key] = (journal.id, journal._seq)
    _BODIES[acc.key] = body
    return acc.key


def test_a_crashed_process_journal_is_written_out_by_the_next(
    tmp_path: Path, index: SqlIndex, files: list[Path]
) -> None:
    archive = _archive(tmp_path, index)
    accepted = [archive.accept(_stage(archive, f)) for f in files]
    crashed = _journal(archive).directory
    _crash(archive)
    assert _dcm_files(tmp_path / "originals") == []

    again = _archive(tmp_path, index)
    try:
        assert _journal(again).directory == crashed  # taken over, segments reused
        assert len(_dcm_files(tmp_path / "originals")) == len(files)
        assert index.pending_originals() == []
        for acc in accepted:
            assert archive.originals.path(acc.key).is_file()
    finally:
        again.close()


def test_a_journaled_commit_takes_no_flush_of_the_index_until_the_checkpoint(
    tmp_path: Path, index: SqlIndex, files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = _archive(tmp_path, index)
    journal = _journal(archive)
    journal.idle_s = 3600
    flushes: list[int] = []
    real = index.sync_instances
    monkeypatch.setattr(index, "sync_instances", lambda: (flushes.append(1), real())[1])
    try:
        keys = [_accept_marked(archive, f) for f in files]
        assert flushes == []  # the record's fdatasync was the only flush
        assert index.journal_marks(journal.id) == {_MARKS[k][1] for k in keys}
        journal.checkpoint()
        assert flushes == [1]  # before the segment was let go
        assert index.journal_marks(journal.id) == set()  # written out: marks dropped
        seg = segment_path(journal.journals, journal.name, 0)
        assert list(read_records(seg)) == []  # the round's header erased
    finally:
        archive.close()


def test_a_commit_lost_to_a_power_cut_is_replayed_from_the_journal(
    tmp_path: Path, index: SqlIndex, files: list[Path]
) -> None:
    archive = _archive(tmp_path, index)
    keys = [_accept_marked(archive, f) for f in files]
    before = {s.sop_instance_uid: s for s in
              (index.get_instance(pydicom_uid(f)) for f in files)}
    _crash(archive)
    for key in keys[-2:]:  # the last two commits never reached the disk
        _lose_commit(index, key)
    assert not index.blob_referenced(keys[-1])

    again = _archive(tmp_path, index)
    try:
        for f, key in zip(files, keys, strict=True):
            uid = pydicom_uid(f)
            stored = index.get_instance(uid)  # indexed again, as it arrived
            assert stored.blob_key == key
            assert stored.received_at == before[uid].received_at
            assert again.originals.path(key).read_bytes() == _BODIES[key]
        assert len(_dcm_files(tmp_path / "originals")) == len(files)
        with index.engine.connect() as conn:  # and its instance job is there again
            targets = {r[0] for r in conn.execute(select(jobs.c.target))}
        assert {pydicom_uid(f) for f in files} <= targets
    finally:
        again.close()


def test_what_was_deleted_or_written_out_is_never_replayed(
    tmp_path: Path, index: SqlIndex, files: list[Path]
) -> None:
    archive = _archive(tmp_path, index)
    journal = _journal(archive)
    journal.idle_s = 3600
    # A round written out, then deleted (retention): its records stay in the segment
    # past where the next round ends, with no marks.
    old = [_accept_marked(archive, f) for f in files[:3]]
    journal.checkpoint()
    for key in old[1:]:
        with index.engine.begin() as conn:
            conn.execute(delete(instances).where(instances.c.blob_key == key))
        archive.originals.delete(key)
    # The next round: one record replayed (lost commit), one deleted after a durable
    # commit (its mark stays), one kept.
    lost, deleted, kept = (_accept_marked(archive, f) for f in files[3:6])
    with index.engine.begin() as conn:
        conn.execute(delete(instances).where(instances.c.blob_key == deleted))
    archive.originals.delete(deleted)
    _crash(archive)
    _lose_commit(index, lost)

    again = _archive(tmp_path, index)
    try:
        on_disk = {p.stem for p in _dcm_files(tmp_path / "originals")}
        assert on_disk == {old[0], lost, kept}
        assert index.blob_referenced(lost)
        assert not index.blob_referenced(deleted)
        assert not any(index.blob_referenced(k) for k in old[1:])
    finally:
        again.close()


def test_a_journal_directory_with_no_segment_is_not_taken_by_another_process(
    tmp_path: Path, index: SqlIndex
) -> None:
    # Another process starting at this moment: its directory made, not yet locked.
    starting = tmp_path / "originals" / ".journal" / "other-0"
    starting.mkdir(parents=True)
    (starting / "lock").touch()
    archive = _archive(tmp_path, index)
    try:
        assert not (starting / "clean").exists()  # neither adopted nor marked
        fd = os.open(starting / "lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # and free for its owner
        finally:
            os.close(fd)
    finally:
        archive.close()


def test_a_clean_stop_leaves_files_and_a_journal_not_read_again(
    tmp_path: Path, index: SqlIndex, files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = _archive(tmp_path, index)
    accepted = archive.accept(_stage(archive, files[0]))
    archive.close()
    assert archive.originals.path(accepted.key).is_file()
    assert (_journal(archive).directory / "clean").exists()
    assert not list(_journal(archive).directory.glob("seg-*"))  # disk given back

    import storage.journal as journal_module

    def no_scan(*args: object, **kwargs: object) -> Iterator[object]:
        raise AssertionError("a clean journal is not read again")

    monkeypatch.setattr(journal_module, "read_records", no_scan)
    again = _archive(tmp_path, index)
    try:
        assert not (_journal(again).directory / "clean").exists()  # in use again
    finally:
        monkeypatch.undo()
        again.close()


def test_torn_records_are_skipped(tmp_path: Path, index: SqlIndex, files: list[Path]) -> None:
    archive = _archive(tmp_path, index)
    journal = _journal(archive)
    try:
        good = archive.accept(_stage(archive, files[0]))
        torn = archive.accept(_stage(archive, files[1]))
        seg = segment_path(journal.journals, journal.name, 0)
        data = bytearray(seg.read_bytes())
        second = data.index(bytes.fromhex(torn.key)) - 4  # its header
        data[second + HEADER_BYTES + 500] ^= 0xFF  # a byte of the data set
        seg.write_bytes(bytes(data))
        assert [r.key for r in read_records(seg)] == [good.key]
        # The reader sees the damage too, and does not serve it.
        with pytest.raises(NotFoundError):
            archive.originals.open(torn.key)
    finally:
        archive.close()


def test_a_full_journal_declines_and_the_file_path_takes_over(
    tmp_path: Path, index: SqlIndex
) -> None:
    big = write_ct_series(tmp_path / "big", slices=8, rows=256, columns=256)  # ~130 KiB
    archive = _archive(tmp_path, index, mb=1)  # eight segments of 1 MiB: 7 each
    journal = _journal(archive)
    journal.idle_s = 3600  # no write-out during the test
    try:
        for f in big:
            archive.accept(_stage(archive, f))
        staged = [_stage(archive, f)
                  for f in write_ct_series(tmp_path / "more", slices=60, rows=256, columns=256)]
        accepted = [archive.accept(s) for s in staged]
        on_disk = {p.stem for p in _dcm_files(tmp_path / "originals")}
        assert on_disk  # some took the file path, at once
        assert all(archive.originals.exists(a.key) for a in accepted)
    finally:
        archive.close()
    assert len(_dcm_files(tmp_path / "originals")) == 68


def test_a_full_disk_keeps_records_journaled_until_space_returns(
    tmp_path: Path, index: SqlIndex, files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = _archive(tmp_path, index)
    journal = _journal(archive)
    journal.idle_s = 3600
    try:
        accepted = [archive.accept(_stage(archive, f)) for f in files[:3]]
        real = FileOriginalStore.write_final

        def full(self: FileOriginalStore, key: str, body: bytes) -> bool:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(FileOriginalStore, "write_final", full)
        with pytest.raises(OSError):
            journal.checkpoint()
        for acc in accepted:  # acknowledged, still there
            with archive.originals.open(acc.key) as fp:
                assert fp.read()
        monkeypatch.setattr(FileOriginalStore, "write_final", real)
        assert journal.checkpoint() == 3
        assert len(_dcm_files(tmp_path / "originals")) == 3
    finally:
        archive.close()


def test_a_location_naming_more_than_its_segment_is_not_read(
    tmp_path: Path, index: SqlIndex, files: list[Path]
) -> None:
    archive = _archive(tmp_path, index)
    try:
        acc = archive.accept(_stage(archive, files[0]))
        (where,) = index.journal_locations(acc.key)
        name, segment, offset, _length, dataset_offset = parse_location(where) or (
            "", 0, 0, 0, 0)
        with index.engine.begin() as conn:
            conn.execute(update(journal_marks).values(
                location=f"{name}/{segment}:{offset}:{1 << 40}:{dataset_offset}"))
        with pytest.raises(NotFoundError):  # neither read nor allocated for
            archive.originals.open(acc.key)
    finally:
        archive.close()


def test_other_processes_read_a_journaled_original_through_the_index(
    tmp_path: Path, index: SqlIndex, files: list[Path]
) -> None:
    archive = _archive(tmp_path, index)
    try:
        # Three originals from the same series, one deleted: every lookup must name
        # its own record and skip what no instance references any more.
        keys = [_accept_marked(archive, f) for f in files[:3]]
        with index.engine.begin() as conn:
            conn.execute(delete(instances).where(instances.c.blob_key == keys[1]))
        reader = FileOriginalStore(tmp_path / "originals", index=index)  # the API, the worker
        for key in (keys[0], keys[2]):
            with reader.open(key) as fp:
                assert fp.read() == _BODIES[key]
        assert index.journal_locations(keys[1]) == []
        assert not reader.exists(keys[1])
        locations = {k: index.journal_locations(k) for k in (keys[0], keys[2])}
        assert all(len(v) == 1 for v in locations.values())
        assert locations[keys[0]] != locations[keys[2]]
        assert index.pending_originals() == [(k, locations[k][0]) for k in (keys[0], keys[2])]
        # A store given no index sees files only.
        assert not FileOriginalStore(tmp_path / "originals").exists(keys[0])
        # A backup's reader writes them out as the files they are about to become.
        assert reader.write_out_pending() == 2
        for key in (keys[0], keys[2]):
            assert (tmp_path / "originals" / key[:2] / key[2:4] / f"{key}.dcm"
                    ).read_bytes() == _BODIES[key]
        # Deleting one original forgets its location only.
        reader.delete(keys[0])
        assert index.journal_locations(keys[0]) == []
        assert index.journal_locations(keys[2]) == locations[keys[2]]
    finally:
        archive.close()


def test_a_checkpoint_waits_for_the_records_still_being_indexed(
    tmp_path: Path, index: SqlIndex, files: list[Path]
) -> None:
    """A segment is written out only once every record in it has been indexed or given
    up (``done``): a record written out before its index row exists would be dropped,
    and its instance acknowledged with no file. The wake-up comes from the last
    ``done`` of the segment, not from every one (issue 19)."""
    archive = _archive(tmp_path, index)
    journal = _journal(archive)
    journal.idle_s = 3600  # no write-out but ours
    try:
        first = _stage(archive, files[0])
        accepted = archive.accept(first)  # indexed: written out by the checkpoint
        staged = _stage(archive, files[1])
        assert staged.body is not None
        tickets = [journal.append(staged.key, staged.body, staged.dataset_offset,
                                  aligned=staged.aligned_body())
                   for _ in range(2)]
        assert all(t is not None for t in tickets)
        finished = threading.Event()
        counted: list[int] = []

        def checkpoint() -> None:
            counted.append(journal.checkpoint())
            finished.set()

        thread = threading.Thread(target=checkpoint)
        thread.start()
        journal.done(tickets[0])  # type: ignore[arg-type]
        assert not finished.wait(0.5)  # one record still in flight
        journal.done(tickets[1])  # type: ignore[arg-type]
        assert finished.wait(10)
        thread.join()
        staged.release()
        assert counted == [3]  # read, and only the indexed one written out:
        assert {p.stem for p in _dcm_files(tmp_path / "originals")} == {accepted.key}
    finally:
        archive.close()
