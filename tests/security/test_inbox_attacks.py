"""Issue 14.2: the lab and order inboxes touch only regular files inside themselves.

Each test is an attack a tester ran: a symlink to a file outside (an HL7 result, a
key), a FIFO, a device node, a socket, a directory, odd names, an oversize file. The
drop folder must never read (nor hash) anything outside, never block, set each odd
entry aside once with a reason, and keep memory bounded.

Real captures: ``tests/data/lab`` and ``tests/data/orders`` (see their SOURCES.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import stat
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.settings import Settings
from pacslab.labs import build_lab_watcher
from pacslab.wiring import build_index
from storage.dropfolder import DropFolder, DropLimits, _read_bounded
from storage.index.lab import SqlLabStore
from storage.lab import LabResultQuery

DATA = Path(__file__).resolve().parents[1] / "data"
LAB_HL7 = DATA / "lab" / "hl7" / "cdc_oracle_oru_r01_v23_refrange_flags.hl7"  # 3 results
LAB_ASTM = DATA / "lab" / "astm" / "immucor_galileo_result.astm"  # 14 results
ORDER = DATA / "orders" / "hl7" / "cdc_orm_o01_v251_order_linked.hl7"


def _lab_settings(settings: Settings, **ingest: Any) -> Settings:
    lab = type(settings.lab).model_validate(
        {"profiles": {"auto": {}, "second": {"format": "hl7v2"}}}
    )
    return settings.model_copy(update={
        "lab": lab,
        "ingest": settings.ingest.model_copy(update={"lab_stable_s": 0.0, **ingest}),
    })


@contextlib.contextmanager
def _rig(settings: Settings) -> Iterator[tuple[Any, SqlLabStore]]:
    build_index(settings, migrate=True).close()
    watcher, release = build_lab_watcher(settings, use_events=False)
    index = build_index(settings, migrate=False)
    try:
        yield watcher, SqlLabStore(index)
    finally:
        watcher.stop()
        release()
        index.close()


def _results(store: SqlLabStore) -> int:
    return store.search_results(LabResultQuery(qc=None, current_only=False))[1]


def _all_text(folder: Path) -> str:
    """Every regular file under ``folder`` (reasons, summaries), as text."""
    out = []
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            out.append(path.read_bytes().decode("utf-8", "replace"))
    return "\n".join(out)


def _secret(tmp_path: Path) -> Path:
    """Stands for the token signing key: a file outside every inbox."""
    key = tmp_path / "outside" / "token.key"
    key.parent.mkdir(parents=True, exist_ok=True)
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot-a-real-key-but-secret\n")
    key.chmod(0o600)
    return key


# ------------------------------------------------------------------------ lab inbox


def test_lab_symlinks_are_set_aside_never_followed(settings: Settings, tmp_path: Path) -> None:
    key = _secret(tmp_path)
    outside = tmp_path / "outside" / "result.hl7"
    outside.write_bytes(LAB_HL7.read_bytes())
    custom = _lab_settings(settings)
    inbox = custom.lab_inbox / "auto"
    with _rig(custom) as (watcher, store):
        (inbox / "r.hl7").symlink_to(outside)
        (inbox / "k.hl7").symlink_to(key)
        outcomes = watcher.run_until_idle()
        assert sorted((o.name, o.status) for o in outcomes) == [
            ("k.hl7", "rejected"), ("r.hl7", "rejected")]
        assert _results(store) == 0  # the HL7 outside never became results
        for name in ("r.hl7", "k.hl7"):
            moved = inbox / "rejected" / name
            assert moved.is_symlink()  # the link itself was moved
            reason = json.loads((inbox / "rejected" / f"{name}.error.json").read_text())
            assert reason["kind"] == "symlink" and "never followed" in reason["reason"]
        text = _all_text(inbox)
        for target in (key, outside):
            digest = hashlib.sha256(target.read_bytes()).hexdigest()
            assert digest[:12] not in text  # neither read nor hashed
        assert "not-a-real-key" not in text
        assert outside.read_bytes() == LAB_HL7.read_bytes() and key.exists()
        # Once: nothing is left to retry.
        assert watcher.run_until_idle() == []


@pytest.mark.timeout(60)
def test_lab_fifo_never_blocks_another_profile(settings: Settings) -> None:
    custom = _lab_settings(settings)
    with _rig(custom) as (watcher, store):
        fifo = custom.lab_inbox / "auto" / "pipe.hl7"
        os.mkfifo(fifo)
        (custom.lab_inbox / "second" / "r.hl7").write_bytes(LAB_HL7.read_bytes())
        outcomes = {o.name: o for o in watcher.run_until_idle(timeout_s=20)}
        assert outcomes["r.hl7"].status == "ingested" and _results(store) == 3
        assert outcomes["pipe.hl7"].status == "rejected"
        moved = custom.lab_inbox / "auto" / "rejected" / "pipe.hl7"
        assert stat.S_ISFIFO(os.lstat(moved).st_mode)


def test_lab_device_socket_and_directory_are_set_aside(settings: Settings) -> None:
    custom = _lab_settings(settings)
    inbox = custom.lab_inbox / "auto"
    with _rig(custom) as (watcher, _store):
        kinds = {"dir.hl7": "directory", "sock.hl7": "socket"}
        (inbox / "dir.hl7").mkdir()
        (inbox / "dir.hl7" / "inner.hl7").write_bytes(LAB_HL7.read_bytes())
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(inbox / "sock.hl7"))
            try:
                os.mknod(inbox / "null.hl7", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
                kinds["null.hl7"] = "device"
            except PermissionError:
                pass  # not root: no device node to test with
            outcomes = watcher.run_until_idle()
        assert {o.name: o.status for o in outcomes} == dict.fromkeys(kinds, "rejected")
        for name, kind in kinds.items():
            reason = json.loads((inbox / "rejected" / f"{name}.error.json").read_text())
            assert reason["kind"] == kind
        assert (inbox / "rejected" / "dir.hl7" / "inner.hl7").exists()  # kept, not read
        assert watcher.run_until_idle() == []


def test_lab_odd_names_are_rejected_once(settings: Settings) -> None:
    custom = _lab_settings(settings, lab_abandoned_s=0.5)
    inbox = custom.lab_inbox / "auto"
    with _rig(custom) as (watcher, store):
        raw = LAB_HL7.read_bytes()
        names = [
            b"r\xff\xfe.hl7",  # not UTF-8
            b"a" * 240 + b".hl7",  # 244 bytes: a suffix would overflow NAME_MAX
            b"b" * 251,  # 251 bytes
            b"..x",
            b".x",
            b"line\nbreak.hl7",
        ]
        old = os.path.getmtime(LAB_HL7) - 3600
        for name in names:
            path = os.path.join(os.fsencode(inbox), name)
            with open(path, "wb") as fp:
                fp.write(raw)
            os.utime(path, (old, old))  # the dot-files: abandoned long ago
        first = watcher.run_until_idle()
        assert len(first) == len(names)
        assert {o.status for o in first} == {"rejected"}
        assert _results(store) == 0
        left = [e for e in os.listdir(os.fsencode(inbox)) if e not in (b"processed", b"rejected")]
        assert left == []
        reasons = sorted((inbox / "rejected").glob("*.error.json"))
        assert len(reasons) == len(names)
        for report in reasons:
            body = json.loads(report.read_text())
            assert body["reason"] and len(report.name.encode()) <= 255
        # Rescans find nothing more to do: each was rejected once.
        assert watcher.run_until_idle() == [] and watcher.run_until_idle() == []
        assert len(list((inbox / "rejected").glob("*.error.json"))) == len(names)


def _vm_hwm_kib() -> int | None:
    """Peak RSS (VmHWM) after resetting it; None where /proc cannot reset it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def test_lab_oversize_file_is_rejected_with_memory_bounded(settings: Settings) -> None:
    """A 256 MiB file with a 1 MiB limit: rejected unread; RSS grows < 32 MiB."""
    custom = _lab_settings(settings, lab_max_bytes=1024 * 1024)
    inbox = custom.lab_inbox / "auto"
    with _rig(custom) as (watcher, store):
        big = inbox / "big.hl7"
        with big.open("wb") as fp:
            fp.write(LAB_HL7.read_bytes())
            fp.truncate(256 * 1024 * 1024)  # sparse: cheap on disk, huge to read
        before = _vm_hwm_kib()
        tracemalloc.start()
        try:
            (outcome,) = watcher.run_until_idle()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        after = _vm_hwm_kib()
        assert outcome.status == "rejected" and _results(store) == 0
        reason = json.loads((inbox / "rejected" / "big.hl7.error.json").read_text())
        assert reason["kind"] == "large" and "1048576" in reason["reason"]
        assert peak < 8 * 1024 * 1024
        if before is not None and after is not None:
            assert after - before < 32 * 1024


def test_reads_stop_at_the_limit_whatever_the_size_said() -> None:
    """The bound holds while reading: an endless source gives limit + 1 bytes."""
    fd = os.open("/dev/zero", os.O_RDONLY)
    try:
        assert len(_read_bounded(fd, 3 * 1024 * 1024)) == 3 * 1024 * 1024 + 1
    finally:
        os.close(fd)


def test_a_symlink_swapped_in_after_the_look_is_not_opened(tmp_path: Path) -> None:
    """TOCTOU: the entry is a regular file at lstat, a symlink at open: O_NOFOLLOW."""
    key = _secret(tmp_path)
    drops = DropFolder(tmp_path / "inbox", DropLimits(stable_s=0, two_looks=False))
    (drops.folder / "a.hl7").write_bytes(b"MSH|x\r")
    seen = os.lstat(drops.folder / "a.hl7")
    (drops.folder / "a.hl7").unlink()
    (drops.folder / "a.hl7").symlink_to(key)
    assert drops._read_complete("a.hl7", seen) is None
    assert "not-a-real-key" not in _all_text(drops.folder)


# ---------------------------------------------------------------------- order inbox


@pytest.fixture
def order_inbox(tmp_path: Path) -> Iterator[tuple[Any, Any, Path]]:
    from core.settings import IndexSettings, OrdersSettings
    from services.orders import OrderService
    from storage.index.orders import SqlOrderStore
    from storage.index.sql import SqlIndex
    from worklist.orders.intake import Hl7OrderIntake
    from worklist.orders.watcher import OrderInbox

    index = SqlIndex(IndexSettings(url=f"sqlite:///{tmp_path}/index.db"))
    service = OrderService(SqlOrderStore(index), OrdersSettings())
    folder = tmp_path / "inbox" / "orders"
    inbox = OrderInbox(folder, Hl7OrderIntake(service), stable_s=0,
                       limits=DropLimits(max_bytes=1024 * 1024, abandoned_s=0.5))
    yield inbox, service, folder
    index.close()


def test_order_symlinks_and_fifo_are_never_read(
    order_inbox: tuple[Any, Any, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    inbox, service, folder = order_inbox
    key = _secret(tmp_path)
    outside = tmp_path / "outside" / "order.hl7"
    outside.write_bytes(ORDER.read_bytes())
    (folder / "order.hl7").symlink_to(outside)
    (folder / "key.hl7").symlink_to(key)
    os.mkfifo(folder / "pipe.hl7")
    (folder / "DOE_JANE_19800101.hl7").write_bytes(b"not hl7 at all\r")
    with caplog.at_level(logging.DEBUG):
        moved = inbox.scan()
    assert sorted(p.name for p in moved) == [
        "DOE_JANE_19800101.hl7", "key.hl7", "order.hl7", "pipe.hl7"]
    assert service.store.find(placer="4560411583") is None  # the order outside: not read
    rejected = folder / "rejected"
    assert (rejected / "order.hl7").is_symlink() and (rejected / "key.hl7").is_symlink()
    assert stat.S_ISFIFO(os.lstat(rejected / "pipe.hl7").st_mode)
    for name in ("order.hl7", "key.hl7", "pipe.hl7", "DOE_JANE_19800101.hl7"):
        assert json.loads((rejected / f"{name}.error.json").read_text())["reason"]
    text = _all_text(folder)
    for target in (key, outside):
        assert hashlib.sha256(target.read_bytes()).hexdigest()[:12] not in text
    # Logs carry hashes and counts, never file names (they may hold patient data).
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for name in ("DOE_JANE", "order.hl7", "key.hl7", "pipe.hl7"):
        assert name not in logged
    assert inbox.scan() == []


def test_order_odd_names_and_oversize_are_rejected_once(
    order_inbox: tuple[Any, Any, Path],
) -> None:
    inbox, service, folder = order_inbox
    raw = ORDER.read_bytes()
    old = os.path.getmtime(ORDER) - 3600
    names = [b"o\xff.hl7", b"c" * 244, b"..x", b".x"]
    for name in names:
        path = os.path.join(os.fsencode(folder), name)
        with open(path, "wb") as fp:
            fp.write(raw)
        os.utime(path, (old, old))
    with (folder / "big.hl7").open("wb") as fp:
        fp.write(raw)
        fp.truncate(64 * 1024 * 1024)
    moved = inbox.scan()
    assert len(moved) == len(names) + 1
    assert service.store.find(placer="4560411583") is None
    assert len(list((folder / "rejected").glob("*.error.json"))) == len(names) + 1
    assert json.loads((folder / "rejected" / "big.hl7.error.json").read_text())["kind"] == "large"
    assert inbox.scan() == [] and inbox.scan() == []


def test_order_reason_is_written_before_the_move(
    order_inbox: tuple[Any, Any, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash between the reason and the move leaves the file in the inbox, with
    its reason already durable; the next scan files it. Never a rejected file
    without its reason."""
    import storage.dropfolder as dropfolder

    inbox, _service, folder = order_inbox
    (folder / "bad.hl7").write_bytes(b"MSH|^~\\&|A|B|C|D|20260101||ACK|1|P|2.5.1\r")

    def crash(src: Any, dst: Any) -> None:
        raise KeyboardInterrupt  # stands for SIGKILL between the reason and the move

    monkeypatch.setattr(dropfolder.os, "rename", crash)  # type: ignore[attr-defined]
    with pytest.raises(KeyboardInterrupt):
        inbox.scan()
    monkeypatch.undo()
    assert (folder / "bad.hl7").exists()
    assert (folder / "rejected" / "bad.hl7.error.json").exists()
    assert not (folder / "rejected" / "bad.hl7").exists()
    inbox.drops.retry("bad.hl7")
    (moved,) = inbox.scan()
    assert moved == folder / "rejected" / "bad.hl7"
    report = json.loads((folder / "rejected" / "bad.hl7.error.json").read_text())
    assert report["messages"][0]["ack"] == "AR"
