"""kill -9 the lab watcher while it ingests 1,000 files: after restart, each exactly once.

A real ``python -m pacslab labs`` process (its own session, so ``os.killpg`` takes
it and nothing else) is killed with SIGKILL at a random moment, twice, then
restarted until the inbox is empty. Then every file is in ``processed/`` with a
summary, the journal holds 1,000 hashes, each with exactly its two results, and no
file was taken for a duplicate of itself.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.settings import Settings
from pacslab.wiring import build_index
from storage.index.lab import SqlLabStore
from tests.support import wait_until

pytestmark = pytest.mark.slow

FILES = 1000


def _oru(i: int) -> bytes:
    segments = [
        f"MSH|^~\\&|CHEM|LAB|LIS|HOSP|20240315081500||ORU^R01|CTL{i:05d}|P|2.5.1",
        f"PID|1||PAT{i % 37:04d}^^^HOSP^MR",
        f"OBR|1|PL{i:05d}|SPEC{i:05d}|24326-1^Electrolytes^LN",
        f"OBX|1|NM|2823-3^Potassium^LN||{3 + (i % 20) / 10:.1f}|mmol/L|3.5-5.1||||F",
        f"OBX|2|NM|2951-2^Sodium^LN||{130 + i % 15}|mmol/L|135-145||||F",
    ]
    return ("\r".join(segments) + "\r").encode("ascii")


def _env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSLAB_")}
    env.update(
        PACSLAB_DATA_DIR=str(data_dir),
        PACSLAB_INGEST__LAB_STABLE_S="0",
        PACSLAB_INGEST__LAB_RESCAN_S="0.2",
        PACSLAB_LOG__LEVEL="WARNING",
    )
    return env


def _start(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "pacslab", "labs"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _processed(processed: Path) -> int:
    return sum(1 for p in processed.iterdir() if p.name.endswith(".summary.json"))


def _waiting(inbox: Path) -> int:
    return sum(1 for p in inbox.iterdir() if p.is_file())


def test_kill_9_while_ingesting_1000_files(tmp_path: Path) -> None:
    data = tmp_path / "data"
    inbox = data / "inbox" / "lab" / "auto"
    processed = inbox / "processed"
    processed.mkdir(parents=True)
    for i in range(FILES):
        (inbox / f"r{i:04d}.hl7").write_bytes(_oru(i))
    env = _env(data)
    seed = int(os.environ.get("LAB_CRASH_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    # Liveness bounds (a hung inbox must fail the test, not hang it), not a speed
    # check: on a loaded 2-core machine 1,000 files with two restarts can take >50 s.
    deadline = time.monotonic() + 120

    kills = []
    for _ in range(2):
        proc = _start(env)
        # A random moment: after a random number of files, or a random time at start-up.
        target = min(FILES - 1, _processed(processed) + rng.randint(0, 350))
        while _processed(processed) < target and proc.poll() is None:
            assert time.monotonic() < deadline, f"ingest stalled (seed {seed})"
            time.sleep(rng.uniform(0, 0.01))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        kills.append(_processed(processed))

    proc = _start(env)
    try:
        wait_until(
            lambda: not _waiting(inbox),
            timeout=120,
            message=lambda: (
                f"{_waiting(inbox)} files still waiting (seed {seed}, killed at {kills})"
            ),
        )
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)

    settings = Settings(data_dir=data)
    index = build_index(settings, migrate=False)
    try:
        per_file = SqlLabStore(index).count_results()
        assert len(per_file) == FILES, f"seed {seed}, killed at {kills}"
        assert set(per_file.values()) == {2}, f"seed {seed}, killed at {kills}"
        states = [SqlLabStore(index).file_state(sha) for sha in per_file]
        odd = [
            (s.name, s.status, s.duplicates) if s is not None else None
            for s in states
            if s is None or (s.status, s.duplicates) != ("filed", 0)
        ]
        assert odd == [], f"seed {seed}, killed at {kills}"
    finally:
        index.close()
    filed = sorted(p.name for p in processed.iterdir() if p.name.endswith(".hl7"))
    assert filed == [f"r{i:04d}.hl7" for i in range(FILES)]
    assert _processed(processed) == FILES
    assert not any((inbox / "rejected").iterdir())
