"""Fixtures for processing tests: synthetic CT series and pydicom's test files."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from core.synthetic import write_ct_series


def _testdata(name: str) -> str:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not in the installed pydicom-data")
    return str(path)


@pytest.fixture
def testdata() -> Callable[[str], str]:
    """Path of a pydicom/pydicom-data test file, never downloading (no network)."""
    return _testdata


@pytest.fixture
def ct_paths(tmp_path: Path) -> list[Path]:
    """A 40-slice 96×80 synthetic CT series, in shuffled arrival order."""
    paths = write_ct_series(tmp_path / "ct", slices=40, rows=96, columns=80)
    random.Random(3).shuffle(paths)
    return paths
