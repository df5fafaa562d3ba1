"""Wire the HTTP API of ``pacslab serve`` and ``pacslab api`` over uvicorn.

uvicorn has no header-read timeout: ``timeout_keep_alive`` only runs between
requests and is cancelled by every byte received, so a client that opens a
connection and sends nothing, or trickles a request head a byte at a time
(slowloris), holds it for ever — the testers kept 2,000 such connections. Neither
``limit_concurrency`` (it would refuse /health too) nor
``h11_max_incomplete_event_size`` (a size, not a time) helps, and an ASGI middleware
only runs once the head is parsed. So :class:`HeaderTimeoutProtocol` subclasses
uvicorn's h11 protocol with the deadline Go's ``ReadHeaderTimeout`` and hyper's
``header_read_timeout`` have: from the connection (or the first byte of a later
request on it) to the end of the request head, ``http.header_timeout_s``; then it
answers 408 (RFC 9110 15.5.9) and closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import h11
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from api.app import create_app
from core.settings import Settings
from pacslab.wiring import build_archive, build_index
from storage.originals import clear_staging

__all__ = [
    "HeaderTimeoutProtocol",
    "api_app",
    "header_timeout_protocol",
    "http_staging_name",
    "run_api",
    "uvicorn_config",
]

logger = logging.getLogger(__name__)

#: The GIL switch interval of the API's process (Python's default is 5 ms): see run_api.
API_SWITCH_INTERVAL_S = 0.0005


def http_staging_name(settings: Settings) -> str:
    """This API process's staging subdirectory (STOW-RS spools and parts): unique
    among the processes sharing one originals directory, the same after a restart."""
    return f"http-{socket.gethostname()}-{settings.http.port}"


@contextlib.contextmanager
def api_app(settings: Settings) -> Iterator[FastAPI]:
    """The application with its own index and archive, released on exit.

    A STOW-RS request cut off by a crash leaves its spool and parts in staging; they
    were never acknowledged (the client got no 200), so they are removed here, before
    this process accepts anything.
    """
    index = build_index(settings, migrate=False)
    archive = build_archive(
        settings, index, staging_name=http_staging_name(settings), journal=True
    )
    removed = clear_staging(archive.staging_dir())
    if removed:
        logger.warning("removed %d unacknowledged STOW-RS files from staging", removed)
    try:
        yield create_app(settings, index=index, archive=archive)
    finally:
        archive.close()
        index.close()


_TIMEOUT_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n"
                b"connection: close\r\n\r\n")


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for receiving each request head.

    Armed when the connection is made and at the first byte of each later request;
    disarmed once h11 has the whole head (its peer state leaves ``IDLE``), so slow
    uploads and long responses are not affected (bodies are bounded by the routes).
    """

    header_timeout_s: ClassVar[float] = 10.0
    #: Connections closed for a late head, and when that was last logged (per process).
    closed: ClassVar[int] = 0
    _logged: ClassVar[float] = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._head_deadline is None and self.conn.their_state is h11.IDLE:
            self._arm()  # the first byte of a new request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._head_deadline = self.loop.call_later(self.header_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _expired(self) -> None:
        self._head_deadline = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        cls = type(self)
        cls.closed += 1
        now = time.monotonic()
        if now - cls._logged > 60:
            # At most once a minute: a flood must not become a flood of log lines.
            cls._logged = now
            logger.warning("closed HTTP connections that sent no complete request head "
                           "within %.0f s (%d so far)", self.header_timeout_s, cls.closed)
        with contextlib.suppress(Exception):
            self.transport.write(_TIMEOUT_408)
        self.transport.close()


def header_timeout_protocol(seconds: float) -> type[HeaderTimeoutProtocol]:
    """A :class:`HeaderTimeoutProtocol` with its deadline (uvicorn builds one per connection)."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,),
                {"header_timeout_s": float(seconds)})


def uvicorn_config(settings: Settings, app: FastAPI) -> Any:
    """The ``uvicorn.Config`` of the API: our protocol class, timeouts, no access log."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=settings.http.host,
        port=settings.http.port,
        http=header_timeout_protocol(settings.http.header_timeout_s),
        timeout_keep_alive=settings.http.keep_alive_s,
        log_level=settings.log.level.lower(),
        access_log=False,
    )


def quiet_server(config: Any) -> Any:
    """A ``uvicorn.Server`` whose housekeeping tick (the Date header, the exit flag)
    comes once a second instead of ten times: the tick was most of an idle
    ``pacslab serve``'s remaining CPU once the worker stopped polling (issue 21).
    The Date header keeps uvicorn's one-second resolution, and SIGTERM/SIGINT wake
    the loop at once, so shutting down waits for no tick."""
    import uvicorn

    class QuietServer(uvicorn.Server):
        _wake: asyncio.Event | None = None
        _loop: asyncio.AbstractEventLoop | None = None

        async def main_loop(self) -> None:
            self._loop = asyncio.get_running_loop()
            self._wake = asyncio.Event()
            should_exit = await self.on_tick(0)
            while not should_exit:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 1.0)
                should_exit = await self.on_tick(0)  # 0: a multiple of 10, the date too

        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            loop, wake = self._loop, self._wake
            if loop is not None and wake is not None:
                loop.call_soon_threadsafe(wake.set)

    return QuietServer(config)


def run_api(settings: Settings) -> None:
    """Serve HTTP until SIGTERM or SIGINT (uvicorn handles both)."""
    with api_app(settings) as app:
        logger.info("HTTP on port %d; data in %s", settings.http.port, settings.data_dir)
        # What start-up built (FastAPI's routes and models, pydicom's dictionaries,
        # SQLAlchemy's tables) lives as long as the process: out of the cyclic
        # collector's reach, so that a full collection no longer walks it. Before,
        # one came every few QIDO-RS requests (each builds ~100 studies' JSON) and
        # took 50-300 ms on this machine: the QIDO p99 of issue 21. As the receivers
        # do (pacslab/dicom_process.py).
        gc.collect()
        gc.freeze()
        # The action log's writer thread appends each batch under SQLite's write lock,
        # and every statement it runs there gives up the GIL and waits to get it back:
        # up to the switch interval (5 ms) per statement, behind request threads
        # building JSON. The receivers' commits wait for that lock meanwhile. At 1 M
        # instances, with two clients querying (benchmarks/test_archive_scale.py,
        # SQLite, 2026-12-03, quiet 2-core machine): write p99 loaded / loaded_empty
        # 2.2, 2.1, 2.0 at 5 ms; 0.8, 0.7, 2.2 at 0.5 ms; 1.0 with the action log off.
        # This process only: the receivers and the worker keep the default.
        sys.setswitchinterval(API_SWITCH_INTERVAL_S)
        quiet_server(uvicorn_config(settings, app)).run()
