"""``pacslab serve`` runs its job worker in a process of its own (issue 21).

The worker used to be a thread of the API's process, where its Python work and the
API's shared one GIL while it held the index's write lock. Here the whole service
runs; its worker process is killed, comes back, and processes what DCMTK's
``storescu`` then sends, under the claim name of the embedded worker; the service's
SIGTERM stops it with the rest.
"""

from __future__ import annotations

import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from core.synthetic import write_ct_series
from tests.support import env_for

pytestmark = [pytest.mark.network, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]


def _until(check: Callable[[], object], timeout_s: float, what: str) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _worker_children(service: psutil.Process) -> list[psutil.Process]:
    """The service's worker processes: started by multiprocessing's spawn (the DICOM
    receivers are forks, with the parent's command line)."""
    found = []
    for child in service.children(recursive=False):
        try:
            if any("spawn_main" in part for part in child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, str]]]:
    env = env_for(tmp_path / "data")
    env.update(PACSLAB_AUTH__ENABLED="false", PACSLAB_ORDERS__MLLP_PORT="0",
               PACSLAB_PROCESSING__SERIES_QUIET_S="1",
               PACSLAB_PROCESSING__INSTANCE_DEFER_S="0.5")
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "pacslab", "serve"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=log)
    try:
        port = int(env["PACSLAB_HTTP__PORT"])

        def healthy() -> bool:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _until(healthy, 90, "pacslab serve to answer /health")
        yield proc, env
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def _jobs(data_dir: Path) -> list[tuple[str, str, str]]:
    uri = f"file:{data_dir / 'index.db'}?mode=ro"
    with sqlite3.connect(uri, uri=True, timeout=10) as conn:
        return [(k, s, c) for k, s, c in
                conn.execute("SELECT kind, status, claimed_by FROM jobs ORDER BY id")]


def test_the_worker_is_a_process_of_its_own_restarted_when_killed(
    service: tuple[subprocess.Popen[bytes], dict[str, str]], tmp_path: Path
) -> None:
    proc, env = service
    parent = psutil.Process(proc.pid)
    first = _worker_children(parent)
    assert len(first) == 1, "one worker process"
    assert first[0].pid != proc.pid

    first[0].send_signal(signal.SIGKILL)
    second = _until(lambda: [p for p in _worker_children(parent) if p.pid != first[0].pid],
                    30, "the supervisor to start the worker again")
    assert isinstance(second, list) and len(second) == 1

    files = write_ct_series(tmp_path / "ct", slices=3, accession_number="WP0001")
    sent = subprocess.run(["storescu", "-aec", "PACSLAB", "127.0.0.1",
                           env["PACSLAB_DICOM__PORT"], *map(str, files)],
                          capture_output=True, text=True, timeout=60)
    assert sent.returncode == 0, sent.stderr

    data_dir = Path(env["PACSLAB_DATA_DIR"])

    def processed() -> list[tuple[str, str, str]] | None:
        jobs = _jobs(data_dir)
        kinds = sorted(k for k, s, _ in jobs if s == "done")
        return jobs if kinds == ["instance"] * 3 + ["series"] else None

    jobs = _until(processed, 90, "the restarted worker to process the series")
    assert isinstance(jobs, list)
    # Claimed by the embedded worker of this host, the name it takes its claims back by.
    assert {c for _, _, c in jobs} == {f"{socket.gethostname()}-embedded"}

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=40) == 0
    assert not second[0].is_running()
    log = (tmp_path / "serve.log").read_text()
    assert "worker process" in log and "exited" in log  # the kill, seen and logged
    assert "did not stop" not in log  # the second one stopped when asked


@pytest.mark.parametrize("same_parent", [True, False], ids=["parent-alive", "parent-gone"])
def test_a_child_whose_parent_is_gone_before_it_asks_to_die_with_it_exits(
    same_parent: bool,
) -> None:
    """A spawned worker takes a second to reach ``die_with_parent``; a parent that died
    meanwhile sent no PR_SET_PDEATHSIG signal. One benchmark run left such a worker
    running (re-parented to init) for minutes. Here the "parent" pid is the real one,
    or one that is not this process's parent any more."""
    code = ("import os, sys\nfrom pacslab.runtime import die_with_parent\n"
            "die_with_parent(os.getppid() if sys.argv[1] == 'yes' else os.getppid() + 100000)\n"
            "print('still running')\n")
    out = subprocess.run([sys.executable, "-c", code, "yes" if same_parent else "no"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert ("still running" in out.stdout) is same_parent
