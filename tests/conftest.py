"""Shared fixtures: a ``settings(tmp_path)`` with everything under a temporary data dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.settings import Settings

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    # The environment of the developer's shell must not leak into tests.
    import os

    for key in list(os.environ):
        if key.startswith("PACSLAB_"):
            monkeypatch.delenv(key)
    return Settings(data_dir=tmp_path / "data")
