"""Half-open HTTP connections are closed (issue 14 item 7): the slowloris shape.

The real uvicorn server of ``pacslab api`` (:func:`pacslab.api_process.uvicorn_config`)
on a loopback port, with a 1 s header deadline. Clients that connect and send nothing,
send part of a request head, or trickle it a byte at a time must all be answered 408
and closed, while ``/health`` keeps answering on other connections meanwhile.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from core.settings import Settings
from tests.support import free_port, wait_until

HALF_OPEN = 60


@pytest.fixture
def server(settings: Settings) -> Iterator[int]:
    import uvicorn

    from api.app import create_app
    from pacslab.api_process import uvicorn_config
    from pacslab.wiring import build_index

    port = free_port()
    cfg = settings.model_copy(update={"http": settings.http.model_copy(update={
        "host": "127.0.0.1", "port": port, "header_timeout_s": 1.0})})
    build_index(cfg, migrate=True).close()
    app = create_app(cfg)
    srv = uvicorn.Server(uvicorn_config(cfg, app))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    wait_until(lambda: srv.started, timeout=20, message="uvicorn did not start")
    yield port
    srv.should_exit = True
    thread.join(timeout=10)
    app.state.audit.close()


def _health(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def _closed(s: socket.socket) -> bytes:
    """Everything the server sent until it closed (bounded by the socket timeout)."""
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    return data


def test_half_open_connections_are_closed(server: int) -> None:
    socks = []
    for i in range(HALF_OPEN):
        s = socket.create_connection(("127.0.0.1", server), timeout=15)
        if i % 3 == 1:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # head never finished
        elif i % 3 == 2:
            s.sendall(b"GET /heal")
        socks.append(s)
    trickle = socket.create_connection(("127.0.0.1", server), timeout=15)
    # /health answers while they are all held open.
    assert _health(server).startswith(b"HTTP/1.1 200")
    # A trickler sending a byte every 0.1 s is not saved by being busy: the deadline
    # runs from the connection, not from the last byte.
    head = b"GET /health HTTP/1.1\r\nX-Slow: " + b"a" * 200
    sent = 0
    try:
        for byte in head:
            trickle.sendall(bytes([byte]))
            sent += 1
            time.sleep(0.1)
    except OSError:
        pass  # closed under us: what we want
    assert sent < len(head)
    assert _closed(trickle).startswith(b"HTTP/1.1 408")
    for s in socks:
        assert _closed(s).startswith(b"HTTP/1.1 408")  # then EOF: closed
        s.close()
    trickle.close()
    assert _health(server).startswith(b"HTTP/1.1 200")


def test_kept_alive_connection_serves_requests_after_the_deadline(server: int) -> None:
    """The deadline covers each request head, not the connection's life."""
    with socket.create_connection(("127.0.0.1", server), timeout=10) as s:
        for _ in range(3):
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = b""
            while b"}" not in reply:  # the JSON body's end (recv may split head and body)
                chunk = s.recv(65536)
                assert chunk, reply
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 200")
            time.sleep(0.6)  # 1.8 s in all: past the 1 s head deadline, within keep-alive
