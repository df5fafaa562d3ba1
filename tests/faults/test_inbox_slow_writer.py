"""Issue 14.1: a file written slowly, without a temporary name, is never filed partly.

A writer thread writes a real capture in parts and pauses longer than the quiet
window between them (the testers' case: 3 of 12 results filed, the rest lost). The
inbox must file nothing until the file is complete, then file all of it once; or,
if it stays incomplete, reject it with a reason. A file that changes while being
read is read again, never filed as first read.

Real captures: ``tests/data/lab`` (see SOURCES.md there).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.settings import Settings
from ingest.labs.watcher import FileOutcome, LabWatcher
from pacslab.labs import build_lab_watcher
from pacslab.wiring import build_index
from storage.index.lab import SqlLabStore
from storage.lab import LabResultQuery
from tests.support import wait_until

LAB = Path(__file__).resolve().parents[1] / "data" / "lab"
GALILEO = LAB / "astm" / "immucor_galileo_result.astm"  # one H…L message, 14 results
ORACLE = LAB / "hl7" / "cdc_oracle_oru_r01_v23_refrange_flags.hl7"  # 3 results
EPIC = LAB / "hl7" / "cdc_epic_oru_r01_v23_nte_dualcoding.hl7"  # 3 results
WINDOW = 0.2  # lab_stable_s
PAUSE = 0.5  # longer than the window


@contextlib.contextmanager
def _rig(settings: Settings, **ingest: Any) -> Iterator[tuple[LabWatcher, SqlLabStore, Path]]:
    custom = settings.model_copy(update={
        "ingest": settings.ingest.model_copy(update={"lab_stable_s": WINDOW, **ingest}),
    })
    build_index(custom, migrate=True).close()
    watcher, release = build_lab_watcher(custom, use_events=False)
    index = build_index(custom, migrate=False)
    try:
        yield watcher, SqlLabStore(index), custom.lab_inbox / "auto"
    finally:
        watcher.stop()
        release()
        index.close()


def _results(store: SqlLabStore) -> int:
    return store.search_results(LabResultQuery(qc=None, current_only=False))[1]


def _slow_write(
    path: Path, parts: list[bytes], *, keep_open: bool, done: threading.Event
) -> threading.Thread:
    def write() -> None:
        # ``done`` is set as the last part is written: from then on the file is
        # complete and may be filed.
        if keep_open:
            with path.open("wb") as fp:
                for i, part in enumerate(parts):
                    if i:
                        time.sleep(PAUSE)
                    fp.write(part)
                    fp.flush()
                done.set()
        else:
            for i, part in enumerate(parts):
                if i:
                    time.sleep(PAUSE)
                if i == len(parts) - 1:
                    done.set()
                with path.open("ab") as fp:  # closed between parts: no writer to see
                    fp.write(part)

    thread = threading.Thread(target=write)
    thread.start()
    return thread


def _watch_while_writing(
    watcher: LabWatcher, store: SqlLabStore, done: threading.Event
) -> list[FileOutcome]:
    """Poll like the service does until the writer is done; nothing may be filed."""
    seen: list[FileOutcome] = []

    def written() -> bool:
        if done.is_set():
            return True
        watcher.rescan()
        seen.extend(watcher.poll())
        assert _results(store) == 0, "results filed from a file still being written"
        return False

    wait_until(written, timeout=60, interval=0.02, message="the writer did not finish")
    return seen


def _cut(raw: bytes, n: int) -> list[bytes]:
    """``n`` parts at arbitrary (not record-aligned) offsets."""
    step = len(raw) // n + 1
    return [raw[i : i + step] for i in range(0, len(raw), step)]


@pytest.mark.timeout(60)
def test_astm_written_slowly_is_filed_once_complete(settings: Settings) -> None:
    with _rig(settings) as (watcher, store, inbox):
        done = threading.Event()
        thread = _slow_write(inbox / "slow.astm", _cut(GALILEO.read_bytes(), 4),
                             keep_open=False, done=done)
        assert _watch_while_writing(watcher, store, done) == []
        thread.join()
        outcomes = watcher.run_until_idle()
        assert [(o.name, o.status, o.results) for o in outcomes] == [("slow.astm", "ingested", 14)]
        assert _results(store) == 14


@pytest.mark.timeout(60)
def test_hl7_batch_written_message_by_message_waits_for_its_trailer(settings: Settings) -> None:
    """Parts end exactly between messages (the worst case): the BTS/FTS decides."""
    messages = [ORACLE.read_bytes().replace(b"\n", b"\r"), EPIC.read_bytes().replace(b"\n", b"\r")]
    parts = [b"FHS|^~\\&|LIS\rBHS|^~\\&|LIS\r", *messages, b"BTS|2\rFTS|1\r"]
    with _rig(settings) as (watcher, store, inbox):
        done = threading.Event()
        thread = _slow_write(inbox / "batch.hl7", parts, keep_open=False, done=done)
        assert _watch_while_writing(watcher, store, done) == []
        thread.join()
        (outcome,) = watcher.run_until_idle()
        assert (outcome.status, outcome.results) == ("ingested", 6)


@pytest.mark.timeout(60)
def test_plain_hl7_held_open_by_its_writer_is_not_read(settings: Settings) -> None:
    """No end marker in plain HL7: the open write descriptor (kernel lease) decides."""
    parts = [ORACLE.read_bytes(), EPIC.read_bytes()]
    with _rig(settings) as (watcher, store, inbox):
        done = threading.Event()
        thread = _slow_write(inbox / "open.hl7", parts, keep_open=True, done=done)
        assert _watch_while_writing(watcher, store, done) == []
        thread.join()
        (outcome,) = watcher.run_until_idle()
        assert (outcome.status, outcome.results) == ("ingested", 6)


@pytest.mark.timeout(60)
def test_file_that_stays_incomplete_is_rejected_with_its_reason(settings: Settings) -> None:
    raw = GALILEO.read_bytes()
    cut = raw[: raw.rfind(b"\nL|")]  # the writer died before the L record
    with _rig(settings, lab_incomplete_s=0.5) as (watcher, store, inbox):
        (inbox / "dead.astm").write_bytes(cut)
        def polled() -> list[FileOutcome]:
            watcher.rescan()
            return watcher.poll()

        outcomes = wait_until(polled, timeout=20, message="the incomplete file was kept")
        assert [(o.name, o.status) for o in outcomes] == [("dead.astm", "rejected")]
        assert _results(store) == 0  # never filed as complete
        reason = json.loads((inbox / "rejected" / "dead.astm.error.json").read_text())
        assert reason["kind"] == "incomplete" and "L (terminator) record" in reason["reason"]
        assert (inbox / "rejected" / "dead.astm").read_bytes() == cut


def test_file_changed_while_being_read_is_read_again(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer appends a second message while the first read is being parsed."""
    import ingest.labs.watcher as lab_watcher

    first, second = ORACLE.read_bytes(), EPIC.read_bytes()
    original = lab_watcher.parse_file  # type: ignore[attr-defined]
    calls: list[int] = []

    def parse_while_writer_appends(raw: bytes, profile: Any) -> Any:
        calls.append(len(raw))
        if len(calls) == 1:
            with (inbox / "grow.hl7").open("ab") as fp:
                fp.write(second)
        return original(raw, profile)

    monkeypatch.setattr(lab_watcher, "parse_file", parse_while_writer_appends)
    with _rig(settings, lab_stable_s=0.0) as (watcher, store, inbox):
        (inbox / "grow.hl7").write_bytes(first)
        outcomes = watcher.run_until_idle()
        assert [(o.status, o.results) for o in outcomes] == [("ingested", 6)]
        assert calls == [len(first), len(first) + len(second)]
        assert _results(store) == 6  # the first read (3 results) was never committed
        body = json.loads((inbox / "processed" / "grow.hl7.summary.json").read_text())
        assert body["results"] == 6


def test_order_file_changed_while_being_read_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worklist.orders.watcher as order_watcher
    from core.settings import IndexSettings, OrdersSettings
    from services.orders import OrderService
    from storage.index.orders import SqlOrderStore
    from storage.index.sql import SqlIndex
    from worklist.orders.intake import Hl7OrderIntake

    order = (LAB.parent / "orders" / "hl7" / "cdc_orm_o01_v251_order_linked.hl7").read_bytes()
    folder = tmp_path / "orders"
    original = order_watcher.split_batch  # type: ignore[attr-defined]
    calls: list[int] = []

    def split_while_writer_finishes(raw: bytes) -> list[bytes]:
        calls.append(len(raw))
        if len(calls) == 1:
            (folder / "o.hl7").write_bytes(order)
        return original(raw)

    monkeypatch.setattr(order_watcher, "split_batch", split_while_writer_finishes)
    index = SqlIndex(IndexSettings(url=f"sqlite:///{tmp_path}/index.db"))
    try:
        service = OrderService(SqlOrderStore(index), OrdersSettings())
        inbox = order_watcher.OrderInbox(folder, Hl7OrderIntake(service), stable_s=0)
        (folder / "o.hl7").write_bytes(order[:60])  # read while only its start was there
        assert inbox.scan() == []  # changed: nothing applied, nothing filed
        assert service.store.find(placer="4560411583") is None
        (moved,) = inbox.scan()
        assert moved == folder / "processed" / "o.hl7" and calls == [60, len(order)]
        assert service.store.find(placer="4560411583") is not None
    finally:
        index.close()


def test_a_file_that_keeps_failing_is_set_aside_not_retried_forever(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug on one file (here: the parser raising) never loops forever nor blocks others."""
    import ingest.labs.watcher as lab_watcher

    original = lab_watcher.parse_file  # type: ignore[attr-defined]

    def parse(raw: bytes, profile: Any) -> Any:
        if b"SONIC" in raw:  # only the Oracle capture trips the "bug"
            raise RuntimeError("a bug")
        return original(raw, profile)

    monkeypatch.setattr(lab_watcher, "parse_file", parse)
    with _rig(settings, lab_stable_s=0.0) as (watcher, store, inbox):
        (inbox / "bug.hl7").write_bytes(ORACLE.read_bytes())
        (inbox / "fine.hl7").write_bytes(EPIC.read_bytes())
        outcomes: list[FileOutcome] = []
        for _ in range(5):  # each rescan offers the failing file again
            outcomes += watcher.run_until_idle()
        assert sorted((o.name, o.status) for o in outcomes) == [
            ("bug.hl7", "rejected"), ("fine.hl7", "ingested")]
        reason = json.loads((inbox / "rejected" / "bug.hl7.error.json").read_text())
        assert reason["kind"] == "failed" and "after 3 tries" in reason["reason"]
        assert _results(store) == 3
