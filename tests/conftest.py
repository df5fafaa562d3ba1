"""Shared fixtures: ``settings(tmp_path)``, an in-process DICOM receiver, DCMTK helpers."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# PostgreSQL fixtures (a throwaway server per session when the binaries exist).
from conftest_pg import pg_server, pg_url  # noqa: F401

# A local S3-compatible server (moto) when moto[server] and s3fs are installed.
from conftest_s3 import s3_bucket, s3_endpoint  # noqa: F401

from core.settings import Settings

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    # The environment of the developer's shell must not leak into tests.
    for key in list(os.environ):
        if key.startswith("PACSLAB_"):
            monkeypatch.delenv(key)
    return Settings(data_dir=tmp_path / "data", dicom={"port": 0, "host": "127.0.0.1"})


def dcmtk(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"DCMTK {tool} not installed (Debian package dcmtk; .ci/run installs it)")
    return path


def run_dcmtk(args: list[str], *, nodelay: bool = False, timeout: float = 120
              ) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK tool; ``nodelay`` sets TCP_NODELAY=1 (the Debian build leaves Nagle on)."""
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    if nodelay:
        env["TCP_NODELAY"] = "1"
    return subprocess.run([dcmtk(args[0]), *args[1:]], capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)


@dataclass
class Receiver:
    settings: Settings
    port: int
    index: object
    service: object


@pytest.fixture
def receiver(settings: Settings) -> Iterator[Receiver]:
    """A DICOM receiver in this process on a free loopback port (STYLE.md §7)."""
    from ingest.dicom.scp import bind_listener
    from pacslab.dicom_process import run_receiver
    from pacslab.wiring import build_index

    build_index(settings, migrate=True).close()
    listener = bind_listener("127.0.0.1", 0)
    port = listener.getsockname()[1]
    stop = threading.Event()
    started: dict[str, object] = {}
    thread = threading.Thread(target=run_receiver, args=(listener, settings, stop),
                              kwargs={"started": started}, daemon=True)
    thread.start()
    for _ in range(100):
        if "service" in started:
            break
        threading.Event().wait(0.05)
    assert "service" in started, "receiver did not start"
    index = build_index(settings, migrate=False)
    yield Receiver(settings, port, index, started["service"])
    stop.set()
    thread.join(timeout=10)
    listener.close()
    index.close()  # type: ignore[attr-defined]
