"""Helpers shared by test modules: DCMTK peers, ports, an in-process receiver.

Imported as ``tests.support`` (the repository root is on ``sys.path``): a plain
``from conftest import …`` is ambiguous once several conftest.py files exist.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from core.settings import Settings

_T = TypeVar("_T")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def dcmtk(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"DCMTK {tool} not installed (Debian package dcmtk; ./run test installs it)")
    return path


def run_dcmtk(args: list[str], *, nodelay: bool = False, timeout: float = 120
              ) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK tool; ``nodelay`` sets TCP_NODELAY=1 (the Debian build leaves Nagle on)."""
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    if nodelay:
        env["TCP_NODELAY"] = "1"
    return subprocess.run([dcmtk(args[0]), *args[1:]], capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)


_HANDED_OUT: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_SENDING = re.compile(r"I: Sending file: (.+)$")
_RESPONSE = re.compile(r"Received Store Response \((.+?)\)")


def storescu_responses(lines: Iterable[str]) -> Iterator[tuple[Path | None, str]]:
    """What ``storescu -v`` reports, response by response: the file it was sending (the
    last "Sending file" line not yet answered, None if there is none) and the status
    text in the parentheses of "Received Store Response (…)", e.g. ``"Success"``."""
    current: Path | None = None
    for line in lines:
        line = line.rstrip()
        if (m := _SENDING.search(line)) is not None:
            current = Path(m.group(1).strip()).resolve()
        elif (m := _RESPONSE.search(line)) is not None:
            yield current, m.group(1)
            current = None


def free_port() -> int:
    """A loopback TCP port that is free now, below the kernel's ephemeral range.

    ``bind(0)`` answers from the ephemeral range, where any outgoing connection made
    before the server binds the port (by the service starting up: its Dask cluster,
    its database client, a test's own client) can take it, and the server then fails
    to start (``pacslab serve`` exited 3 in one CI run). Below the range a port is
    only taken by an explicit bind. Ports are not handed out twice in one session.
    """
    low = _ephemeral_low()
    for _ in range(1000):
        port = random.randint(10_000, low - 1)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free loopback port below the ephemeral range")


def env_for(data_dir: Path) -> dict[str, str]:
    """Environment for a ``pacslab`` subprocess on free loopback ports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSLAB_")}
    env.update(PACSLAB_DATA_DIR=str(data_dir), PACSLAB_DICOM__PORT=str(free_port()),
               PACSLAB_HTTP__PORT=str(free_port()), PACSLAB_DICOM__HOST="127.0.0.1",
               PACSLAB_HTTP__HOST="127.0.0.1",
               # A small original journal: its segments are zero-filled at start.
               PACSLAB_STORAGE__JOURNAL_MB="16")
    return env


@dataclass
class Receiver:
    settings: Settings
    port: int
    index: object
    service: object


#: The process-wide globals :func:`pacslab.runtime.configure_runtime` sets.
_PYNETDICOM_GLOBALS = ("LOG_REQUEST_IDENTIFIERS", "LOG_RESPONSE_IDENTIFIERS", "PASS_CONTEXTVARS",
                       "STORE_RECV_CHUNKED_DATASET", "LOG_HANDLER_LEVEL")


@contextlib.contextmanager
def preserved_runtime() -> Iterator[None]:
    """Put pynetdicom's, pydicom's and tempfile's process-wide globals back on exit, so
    a receiver or SCP started by one test (its entry point runs
    ``pacslab.runtime.configure_runtime``) leaves nothing behind for the next."""
    from pydicom import config as pydicom_config
    from pynetdicom import _config

    saved = {name: getattr(_config, name) for name in _PYNETDICOM_GLOBALS}
    validation = pydicom_config.settings.reading_validation_mode
    tempdir = tempfile.tempdir
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(_config, name, value)
        pydicom_config.settings.reading_validation_mode = validation
        tempfile.tempdir = tempdir


@contextlib.contextmanager
def configured_runtime(receiver_staging: Path | None = None) -> Iterator[None]:
    """``pacslab.runtime.configure_runtime`` as a process entry point runs it, undone on
    exit (:func:`preserved_runtime`)."""
    from pacslab.runtime import configure_runtime

    with preserved_runtime():
        configure_runtime(receiver_staging=receiver_staging)
        yield


def wait_until(predicate: Callable[[], _T], *, timeout: float = 10.0, interval: float = 0.05,
               message: str | Callable[[], str] = "condition not reached in time",
               sleep: Callable[[float], object] = time.sleep) -> _T:
    """Call ``predicate`` until it returns something truthy, and return that.

    A liveness bound for something converging in another thread or process, not a
    timing assertion: ``timeout`` only limits how long a failing test hangs. After it,
    AssertionError with ``message`` (a callable is called then, to say what is left).
    ``sleep`` waits ``interval`` seconds between calls: a browser test passes
    :func:`page_sleep` so that Playwright delivers the page's events meanwhile.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(message() if callable(message) else message)
        sleep(interval)


def page_sleep(page: Any) -> Callable[[float], object]:
    """A ``sleep`` for :func:`wait_until` that lets a Playwright page deliver its
    events (the sync API runs event handlers only inside its own calls)."""
    return lambda seconds: page.wait_for_timeout(seconds * 1000)


@contextlib.contextmanager
def serving(app: object, *, lifespan: str = "off") -> Iterator[str]:
    """An ASGI ``app`` under uvicorn in a thread on a free loopback port, for real HTTP
    clients (browsers, npm clients); yields ``http://127.0.0.1:<port>``.

    ``lifespan="on"`` runs the app's start-up and shut-down (``create_app`` closes
    its own index and stores there).
    """
    import threading

    import uvicorn

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,  # type: ignore[arg-type]
                                        log_level="warning", access_log=False,
                                        lifespan=lifespan))  # type: ignore[arg-type]
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()

    def started() -> bool:
        assert thread.is_alive(), "uvicorn exited"
        return bool(srv.started)

    wait_until(started, timeout=20, message="uvicorn did not start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
