"""Fixtures for the lab parser tests: the files under ``tests/data/lab/``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

LAB_DATA = Path(__file__).resolve().parents[2] / "data" / "lab"


@pytest.fixture
def lab_file() -> Callable[[str], bytes]:
    """Read ``tests/data/lab/<name>`` as bytes."""

    def read(name: str) -> bytes:
        return (LAB_DATA / name).read_bytes()

    return read
