"""The ``pacslab`` command as an operator uses it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import env_for


def test_help_lists_the_commands() -> None:
    out = subprocess.run([sys.executable, "-m", "pacslab", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for command in ("serve", "demo", "dicom", "labs", "worker", "api"):
        assert command in out


@pytest.mark.network
def test_demo_sends_a_ct_series_end_to_end(tmp_path: Path) -> None:
    env = env_for(tmp_path / "data")
    result = subprocess.run([sys.executable, "-m", "pacslab", "demo", "--exit", "--slices",
                             "100"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "100 of 100 slices stored" in result.stdout
    # the service really stored them: originals on disk and an index entry each
    originals = list((tmp_path / "data" / "originals").rglob("*.dcm"))
    assert len(originals) == 100
    # no patient data in the service's logs
    assert "NGUYEN" not in result.stderr and "SYN0001" not in result.stderr


def test_metrics_and_health_shape(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app
    from core.settings import Settings
    from pacslab.wiring import build_index

    settings = Settings(data_dir=tmp_path / "data", auth={"enabled": False})
    build_index(settings, migrate=True).close()
    with TestClient(create_app(settings)) as client:
        assert client.get("/health").json()["status"] == "ok"
        text = client.get("/metrics").text
        assert "pacslab_instances 0" in text
