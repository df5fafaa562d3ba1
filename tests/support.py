"""Helpers shared by test modules: DCMTK peers, ports, an in-process receiver.

Imported as ``tests.support`` (the repository root is on ``sys.path``): a plain
``from conftest import …`` is ambiguous once several conftest.py files exist.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.settings import Settings

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env_for(data_dir: Path) -> dict[str, str]:
    """Environment for a ``pacslab`` subprocess on free loopback ports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSLAB_")}
    env.update(PACSLAB_DATA_DIR=str(data_dir), PACSLAB_DICOM__PORT=str(free_port()),
               PACSLAB_HTTP__PORT=str(free_port()), PACSLAB_DICOM__HOST="127.0.0.1",
               PACSLAB_HTTP__HOST="127.0.0.1")
    return env


@dataclass
class Receiver:
    settings: Settings
    port: int
    index: object
    service: object
