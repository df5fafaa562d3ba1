"""kill -9 during a live ASTM link: every acknowledged result survives, none twice.

A real ``python -m pacslab labs`` process serves an analyzer link over TCP. A
simulated analyzer (tests/ingest/labs/_sim_analyzer.py) sends one message per session,
each for its own specimen, and notes which messages were acknowledged (the ACK
of the frame carrying the L record). The process is killed with SIGKILL at a
random moment, twice, and restarted; the analyzer then sends again every message
it did not see acknowledged, as analyzers do. At the end every acknowledged
message's result is stored, and every specimen has exactly one stored version:
a message stored just before the kill (its ACK lost) and sent again is not
stored twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from core.settings import Settings
from pacslab.wiring import build_index
from storage.index.lab import SqlLabStore
from storage.lab import LabResultQuery
from tests.ingest.labs._sim_analyzer import Pipe, send_session
from tests.support import free_port, wait_until

MESSAGES = 60


def _message(i: int) -> list[bytes]:
    return [
        b"H|\\^&|||XN-VN\r",
        f"P|1||BN-{i:04d}\r".encode(),
        f"O|1|SPC-{i:04d}||^^^K|R\r".encode(),
        f"R|1|^^^K|{3 + (i % 20) / 10:.1f}|mmol/L|3.5-5.1|N||F\r".encode(),
        b"L|1|N\r",
    ]


def _start(data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSLAB_")}
    analyzer = {
        "name": "xn",
        "port": port,
        "reply_timeout_s": 1.0,
        "frame_timeout_s": 1.0,
        "busy_wait_s": 0.2,
    }
    env.update(
        PACSLAB_DATA_DIR=str(data_dir),
        PACSLAB_ANALYZERS=json.dumps([analyzer]),
        PACSLAB_LOG__LEVEL="WARNING",
    )
    return subprocess.Popen(
        [sys.executable, "-m", "pacslab", "labs"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _connect(port: int, timeout: float = 30.0) -> Pipe:
    def connected() -> Pipe | None:
        try:
            return Pipe(sock=socket.create_connection(("127.0.0.1", port), timeout=2))
        except OSError:
            return None

    try:
        pipe = wait_until(connected, timeout=timeout, message=f"nothing listens on {port}")
    except AssertionError as exc:
        raise OSError(str(exc)) from None  # the analyzer thread retries on OSError
    assert pipe is not None
    return pipe


class Analyzer:
    """Sends every message until acknowledged, reconnecting after a crash."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.acked: set[int] = set()
        self.stop = threading.Event()

    def run(self, todo: list[int]) -> None:
        queue = list(todo)
        while queue and not self.stop.is_set():
            try:
                pipe = _connect(self.port)
            except OSError:
                continue
            try:
                while queue and not self.stop.is_set():
                    i = queue[0]
                    if send_session(pipe, [_message(i)], reply_s=2).acked_messages == 1:
                        self.acked.add(i)
                        queue.pop(0)
            except (OSError, TimeoutError, ConnectionError):
                time.sleep(0.05)  # the LIS went away: reconnect and send it again
            finally:
                pipe.close()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_kill_9_during_a_live_link(settings: Settings) -> None:
    data_dir = settings.data_dir
    build_index(settings, migrate=True).close()
    port = free_port()
    analyzer = Analyzer(port)
    thread = threading.Thread(target=analyzer.run, args=(list(range(MESSAGES)),), daemon=True)
    rng = random.Random(18)
    proc = _start(data_dir, port)
    try:
        thread.start()
        for _ in range(2):
            # Kill mid-stream: after some messages went through, at a random moment.
            target = len(analyzer.acked) + rng.randint(5, 15)
            # (the kill happens either way: a slow start only moves it later)
            def reached(n: int = target) -> bool:
                return len(analyzer.acked) >= n

            with contextlib.suppress(AssertionError):
                wait_until(reached, timeout=60, interval=0.005)
            time.sleep(rng.uniform(0, 0.05))
            acked_before_kill = set(analyzer.acked)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            assert acked_before_kill, "no message went through before the kill"
            proc = _start(data_dir, port)
        thread.join(timeout=120)
        assert not thread.is_alive(), "the analyzer could not deliver every message"
    finally:
        analyzer.stop.set()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    assert analyzer.acked == set(range(MESSAGES))
    index = build_index(settings, migrate=False)
    try:
        store = SqlLabStore(index)
        results, _ = store.search_results(LabResultQuery(qc=None, limit=10_000))
        by_specimen: dict[str, int] = {}
        for r in results:
            by_specimen[r.specimen_id] = by_specimen.get(r.specimen_id, 0) + 1
        assert by_specimen == {f"SPC-{i:04d}": 1 for i in range(MESSAGES)}
        for r in results:
            assert len(store.result_history(r.observation_id)) == 1, r.specimen_id
    finally:
        index.close()
