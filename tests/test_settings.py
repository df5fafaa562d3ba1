from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from core.settings import Settings


def test_defaults_follow_data_dir(settings: Settings) -> None:
    assert Settings().dicom.port == 11112  # the fixture uses a free port instead
    assert settings.dicom.ae_title == "PACSLAB"
    assert settings.http.port == 8000
    assert settings.index.url == f"sqlite:///{(settings.data_dir / 'index.db').as_posix()}"
    assert settings.storage.originals_dir == settings.data_dir / "originals"
    assert settings.dask.scheduler == ""


def test_env_nested(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PACSLAB_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("PACSLAB_DICOM__PORT", "4242")
    monkeypatch.setenv("PACSLAB_DICOM__ALLOWED_CALLING_AES", '["CT1","MR2"]')
    monkeypatch.setenv("PACSLAB_DASK__SCHEDULER", "tcp://10.0.0.1:8786")
    s = Settings()
    assert s.dicom.port == 4242
    assert s.dicom.allowed_calling_aes == ["CT1", "MR2"]
    assert s.dask.scheduler == "tcp://10.0.0.1:8786"
    assert s.index.url.endswith(f"{tmp_path.as_posix()}/index.db")


def test_config_file_toml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = tmp_path / "pacslab.toml"
    cfg.write_text('[dicom]\nae_title = "ARCHIVE"\nport = 104\n')
    monkeypatch.setenv("PACSLAB_CONFIG", str(cfg))
    monkeypatch.setenv("PACSLAB_DICOM__PORT", "2104")  # env beats file
    s = Settings()
    assert s.dicom.ae_title == "ARCHIVE"
    assert s.dicom.port == 2104


def test_config_file_yaml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = tmp_path / "pacslab.yaml"
    cfg.write_text("http:\n  port: 9000\n")
    monkeypatch.setenv("PACSLAB_CONFIG", str(cfg))
    assert Settings().http.port == 9000


@pytest.mark.parametrize("bad", ["", "A" * 17, "BAD\\AE"])
def test_bad_ae_title_refused(bad: str) -> None:
    with pytest.raises(ValidationError):
        Settings(dicom={"ae_title": bad})


def test_tls_needs_cert_and_key(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        Settings(dicom={"tls_cert": tmp_path / "c.pem"})


@pytest.mark.parametrize("bad", ["", "embedded", "a/b", "x" * 33])
def test_bad_worker_name_refused(bad: str) -> None:
    # 'embedded' would share (and, restarting, take back) pacslab serve's job claims.
    with pytest.raises(ValidationError):
        Settings(processing={"worker_name": bad})
