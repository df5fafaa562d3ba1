"""Issues 13.11 and 14.9: MLLP answers an oversize message, bounds slow and unknown senders.

The peer is python-hl7's ``mllp_send`` (the ``hl7`` package's console script), which
sends each message and waits for its ACK: before the fix an oversize message closed
the connection without an answer and the sender's engine retried it forever.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.settings import IndexSettings, OrdersSettings
from services.orders import OrderService
from storage.index.orders import SqlOrderStore
from storage.index.sql import SqlIndex
from worklist.orders.intake import Hl7OrderIntake
from worklist.orders.mllp import Deframer, MllpServer, Oversize, frame

ORDERS = Path(__file__).resolve().parents[1] / "data" / "orders" / "hl7"
ORDER = ORDERS / "cdc_orm_o01_v251_order_linked.hl7"  # control id 20231561137…
LIMIT = 64 * 1024

pytestmark = pytest.mark.network


def _mllp_send() -> str:
    found = shutil.which("mllp_send") or str(Path(sys.executable).parent / "mllp_send")
    if not Path(found).exists():
        pytest.skip("python-hl7's mllp_send is not installed (pip install hl7)")
    return found


@pytest.fixture
def intake(tmp_path: Path) -> Iterator[Hl7OrderIntake]:
    index = SqlIndex(IndexSettings(url=f"sqlite:///{tmp_path}/index.db"))
    yield Hl7OrderIntake(OrderService(SqlOrderStore(index), OrdersSettings()))
    index.close()


def _segments(ack: bytes) -> dict[str, list[str]]:
    text = ack.strip(b"\x0b\x1c\r\n").decode()
    return {s[:3]: s.split("|") for s in text.replace("\n", "\r").split("\r") if s}


def _order(placer: str, nte: int = 0) -> bytes:
    """The real CDC ORM^O01 with its placer number changed, and ``nte`` bytes of note."""
    raw = ORDER.read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r").rstrip(b"\r")
    raw = raw.replace(b"4560411583", placer.encode())
    if nte:
        raw += b"\rNTE|1||" + b"x" * nte
    return raw + b"\r"


def _send(
    tool: str, port: int, message: bytes, tmp_path: Path
) -> subprocess.CompletedProcess[bytes]:
    # mllp_send reads stdin as text on Python 3 (and fails): give it a file.
    path = tmp_path / "message.hl7"
    path.write_bytes(message)
    return subprocess.run(
        [tool, "--loose", "-f", str(path), "-p", str(port), "127.0.0.1"],
        capture_output=True, timeout=30, check=False,
    )


def test_oversize_message_gets_an_ar_ack_from_mllp_send(
    intake: Hl7OrderIntake, tmp_path: Path
) -> None:
    """An oversize order, then a normal one in the same session: AR with ERR, then AA."""
    tool = _mllp_send()
    server = MllpServer(intake, "127.0.0.1", 0, max_message=LIMIT).start()
    try:
        stream = tmp_path / "two.hl7"
        stream.write_bytes(_order("BIG1", nte=4 * LIMIT) + b"\r\n" + _order("SMALL1"))
        proc = subprocess.run(
            [tool, "--loose", "-f", str(stream), "-p", str(server.port), "127.0.0.1"],
            capture_output=True, timeout=60, check=False,
        )
        assert proc.returncode == 0, proc.stderr.decode()
        acks = [a for a in proc.stdout.split(b"\n") if a.strip()]
        assert len(acks) == 2, proc.stdout
        big, small = _segments(acks[0]), _segments(acks[1])
        assert big["MSA"][1] == "AR"
        assert big["MSA"][2] == _segments(_order("BIG1"))["MSH"][9]  # MSH-10 echoed
        assert big["ERR"][3].startswith("207^")
        assert "exceeds the limit of 65536 bytes" in big["ERR"][8]
        assert small["MSA"][1] == "AA"  # the connection went on
        assert intake.service.store.find(placer="BIG1") is None
        assert intake.service.store.find(placer="SMALL1") is not None
    finally:
        server.stop()


def test_oversize_drain_keeps_memory_bounded(intake: Hl7OrderIntake) -> None:
    """32 MiB through a 64 KiB limit: the server never holds much more than the limit."""
    server = MllpServer(intake, "127.0.0.1", 0, max_message=LIMIT).start()
    tracemalloc.start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(b"\x0b" + _order("HUGE")[:-1])
            chunk = b"y" * (1024 * 1024)
            for _ in range(32):
                sock.sendall(chunk)
            sock.sendall(b"\r\x1c\r")
            ack = b""
            while not ack.endswith(b"\x1c\r"):
                data = sock.recv(65536)
                assert data, "closed without an ACK"
                ack += data
            sock.sendall(frame(_order("AFTER")))
            after = b""
            while not after.endswith(b"\x1c\r"):
                data = sock.recv(65536)
                assert data, "closed after the oversize message"
                after += data
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        server.stop()
    assert _segments(ack)["MSA"][1] == "AR"
    assert _segments(after)["MSA"][1] == "AA"
    assert peak < 8 * 1024 * 1024  # not 32 MiB: the rest was discarded as it came


def test_disallowed_source_is_closed_without_reading(
    intake: Hl7OrderIntake, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """Allow-list bound to another network; 127.0.0.1 connects and is refused."""
    tool = _mllp_send()
    server = MllpServer(intake, "127.0.0.1", 0, allowed_sources=["10.99.0.0/16"]).start()
    try:
        with caplog.at_level(logging.WARNING, logger="worklist.orders.mllp"), \
                socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            with contextlib.suppress(OSError):  # the server may have closed already
                sock.sendall(frame(_order("DENIED")))
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                data = b""
            assert data == b""  # closed, no ACK
        proc = _send(tool, server.port, _order("DENIED2"), tmp_path)
        assert b"MSA" not in proc.stdout
        assert intake.service.store.find(placer="DENIED") is None
        assert intake.service.store.find(placer="DENIED2") is None
        refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert refused and all("127.0.0.1" in m for m in refused)
    finally:
        server.stop()


def test_allowed_source_is_served_and_open_listener_warns(
    intake: Hl7OrderIntake, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    tool = _mllp_send()
    with caplog.at_level(logging.WARNING, logger="worklist.orders.mllp"):
        server = MllpServer(intake, "127.0.0.1", 0, allowed_sources=["127.0.0.0/8"]).start()
        open_server = MllpServer(intake, "127.0.0.1", 0).start()
    try:
        proc = _send(tool, server.port, _order("OK1"), tmp_path)
        assert proc.returncode == 0, proc.stderr.decode()
        assert _segments(proc.stdout)["MSA"][1] == "AA"
        warnings = [r.getMessage() for r in caplog.records]
        assert sum("accepts connections from anyone" in m for m in warnings) == 1
    finally:
        server.stop()
        open_server.stop()


def test_slow_sender_is_cut_off(intake: Hl7OrderIntake) -> None:
    """Slowloris: a byte every 0.1 s keeps the idle timer alive, not the message one."""
    server = MllpServer(
        intake, "127.0.0.1", 0, idle_timeout_s=30, message_timeout_s=0.5
    ).start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            closed = False
            deadline = time.monotonic() + 20
            for byte in (b"\x0b" + _order("SLOW") * 100):
                if time.monotonic() > deadline:
                    break
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    closed = True
                    break
                time.sleep(0.1)
                sock.setblocking(False)
                try:
                    if sock.recv(1) == b"":
                        closed = True
                        break
                except BlockingIOError:
                    pass
                except OSError:
                    closed = True
                    break
                finally:
                    sock.setblocking(True)
            assert closed, "a never-ending message kept the connection"
        assert intake.service.store.find(placer="SLOW") is None
    finally:
        server.stop()


def test_deframer_reports_oversize_once_and_resynchronises() -> None:
    d = Deframer(max_message=10, drain_bytes=1000)
    events = list(d.events(b"\x0bMSH|" + b"z" * 20))
    assert len(events) == 1 and isinstance(events[0], Oversize)
    assert events[0].head.startswith(b"MSH|")
    assert list(d.events(b"z" * 50 + b"\x1c")) == []
    assert list(d.events(b"\r" + frame(b"ok"))) == [b"ok"]  # end block split across reads
    assert len(list(d.events(b"\x0b" + b"q" * 20))) == 1
    with pytest.raises(ValueError, match="drain budget"):
        list(d.events(b"q" * 2000))
