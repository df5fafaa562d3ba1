"""Fault-injection helpers (issue #8 §5): a ``pacslab dicom`` service, load senders and
the figures each fault test reports at the end of the run."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support import dcmtk, run_dcmtk, storescu_responses, wait_until

ROOT = Path(__file__).resolve().parents[2]

#: name -> figures, printed by pytest_terminal_summary (the closing note's numbers).
FIGURES: dict[str, dict[str, Any]] = {}


def report(name: str, **figures: Any) -> None:
    FIGURES[name] = figures


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config
                            ) -> None:
    if not FIGURES:
        return
    terminalreporter.section("fault injection figures")
    for name, figures in sorted(FIGURES.items()):
        terminalreporter.write_line(f"{name}: " + ", ".join(f"{k}={v}" for k, v in
                                                            figures.items()))


@dataclass
class Acknowledged:
    """What the senders were told: SOP Instance UIDs acknowledged with success."""

    uids: set[str] = field(default_factory=set)
    errors: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, uid: str) -> None:
        with self.lock:
            self.uids.add(uid)

    def error(self, kind: str) -> None:
        with self.lock:
            self.errors[kind] += 1


def storescu_once(port: int, folder: Path, uid_of: dict[Path, str], acked: Acknowledged,
                  *, aet: str = "STORESCU", timeout: float = 60) -> int:
    """Send ``folder`` once with storescu -v; record each success; return its exit code."""
    proc = subprocess.Popen([dcmtk("storescu"), "-v", "-aet", aet, "-to", "10", "-ta", "10",
                             "-td", "10", "+sd", "127.0.0.1", str(port), str(folder)],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "TCP_NODELAY": "1"})
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    for current, status in storescu_responses(proc.stderr):
        if status == "Success" and current is not None:
            acked.add(uid_of[current])
        else:
            acked.error(f"store status {status}")
        if time.monotonic() > deadline:
            proc.kill()
    code = proc.wait(timeout=30)
    if code != 0:
        acked.error("storescu association failed")
    return code


def start_service(env: dict[str, str], *, timeout: float = 30) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "pacslab", "dicom"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)

    def answers() -> bool:
        if proc.poll() is not None:
            raise AssertionError("pacslab dicom exited before answering C-ECHO")
        port = env["PACSLAB_DICOM__PORT"]
        return run_dcmtk(["echoscu", "-to", "2", "127.0.0.1", port], nodelay=True,
                         timeout=10).returncode == 0

    try:
        wait_until(answers, timeout=timeout, message="pacslab dicom did not start")
    except AssertionError:
        with_suppressed_kill(proc)
        raise
    return proc


def with_suppressed_kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def start_pacslab(command: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """``pacslab <command>`` in its own process group (killed with it), not waited for."""
    return subprocess.Popen([sys.executable, "-m", "pacslab", command], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def wait_http(proc: subprocess.Popen[bytes], port: int | str, *, timeout: float = 60) -> None:
    """Until ``GET /health`` answers 200 (a liveness bound, not a timing assertion)."""
    import httpx

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError("pacslab api exited before answering /health")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(healthy, timeout=timeout, message="pacslab api did not start")
    except AssertionError:
        with_suppressed_kill(proc)
        raise
