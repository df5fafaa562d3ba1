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


# -- Unknown names are refused (issue 13 item 12) ------------------------------------

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize(("name", "hint"), [
    ("PACSLAB_DICOM__PROT", "PACSLAB_DICOM__PORT"),
    ("PACSLAB_DICON__PORT", "PACSLAB_DICOM__PORT"),  # a wrong section name
    ("PACSLAB_DATA_DIRR", "PACSLAB_DATA_DIR"),
    ("PACSLAB_HTTP_PORT", "PACSLAB_HTTP__PORT"),  # one underscore instead of two
    ("PACSLAB_DICOM__PORT__X", "PACSLAB_DICOM__PORT"),  # below a leaf
    ("PACSLAB_LAB__PROFILES__COBAS__FROMAT", "PACSLAB_LAB__PROFILES__COBAS__FORMAT"),
])
def test_unknown_env_variable_refused(monkeypatch: pytest.MonkeyPatch, settings: Settings,
                                      name: str, hint: str) -> None:
    from core.settings import UnknownSettingError

    monkeypatch.setenv(name, "1")
    with pytest.raises(UnknownSettingError) as info:
        Settings()
    assert str(info.value) == f"unknown setting {name} (did you mean {hint}?)"


def test_documented_and_suite_variables_stay_valid(monkeypatch: pytest.MonkeyPatch,
                                                   settings: Settings) -> None:
    """Every PACSLAB_ name the README or the code base uses is a setting or allowed."""
    import re

    from core.settings import check_unknown_settings

    root = README.parent
    texts = [README.read_text()]
    for folder in ("api", "benchmarks", "core", "ingest", "pacslab", "processing", "storage",
                   "tests", "worklist"):
        texts += [p.read_text(errors="replace") for p in (root / folder).rglob("*.py")]
    names = {m for t in texts for m in re.findall(r"\bPACSLAB_[A-Z][A-Z0-9_]*[A-Z0-9]\b", t)}
    names -= {"PACSLAB_DICOM__PROT", "PACSLAB_DICON__PORT", "PACSLAB_DATA_DIRR",
              "PACSLAB_HTTP_PORT", "PACSLAB_DICOM__PORT__X",
              "PACSLAB_LAB__PROFILES__COBAS__FROMAT", "PACSLAB_NO_SUCH_THING"}  # this file's
    assert {"PACSLAB_DATA_DIR", "PACSLAB_DICOM__PORT", "PACSLAB_HTTP__PORT",
            "PACSLAB_INDEX__URL", "PACSLAB_DASK__SCHEDULER", "PACSLAB_CONFIG",
            "PACSLAB_TEST_POSTGRES_URL", "PACSLAB_FAULT_TRIALS",
            "PACSLAB_LOAD_SECONDS"} <= names
    for name in sorted(names):
        check_unknown_settings({name: "1"})  # raises on the first unknown one


@pytest.mark.parametrize(("suffix", "text", "message"), [
    (".toml", '[dicom]\nprot = 104\n', "unknown setting 'dicom.prot' in {} "
     "(did you mean dicom.port?)"),
    (".toml", '[dicomm]\nport = 104\n', "unknown setting 'dicomm' in {} (did you mean dicom?)"),
    (".yaml", "http:\n  port: 9000\n  hots: x\n", "unknown setting 'http.hots' in {} "
     "(did you mean http.host?)"),
    (".yaml", "lab:\n  profiles:\n    cobas:\n      fromat: astm\n",
     "unknown setting 'lab.profiles.cobas.fromat' in {} (did you mean lab.profiles.cobas.format?)"),
])
def test_unknown_config_file_key_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                         settings: Settings, suffix: str, text: str,
                                         message: str) -> None:
    from core.settings import UnknownSettingError

    cfg = tmp_path / f"pacslab{suffix}"
    cfg.write_text(text)
    monkeypatch.setenv("PACSLAB_CONFIG", str(cfg))
    with pytest.raises(UnknownSettingError) as info:
        Settings()
    assert str(info.value) == message.format(cfg)


def test_free_form_sections_take_any_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                         settings: Settings) -> None:
    # dict settings hold data, not setting names: their keys are not checked.
    cfg = tmp_path / "pacslab.toml"
    cfg.write_text('[storage.storage_options]\nendpoint_url = "http://127.0.0.1:9"\n'
                   '[lab.critical."2823-3"]\nlow = 2.8\n')
    monkeypatch.setenv("PACSLAB_CONFIG", str(cfg))
    monkeypatch.setenv("PACSLAB_LAB__PROFILES__COBAS__FORMAT", "astm")
    s = Settings()
    assert s.storage.storage_options == {"endpoint_url": "http://127.0.0.1:9"}
    assert s.lab.profiles["cobas"].format == "astm"


@pytest.mark.parametrize("command", [["audit", "verify"], ["serve"]])
def test_every_command_refuses_an_unknown_variable(tmp_path: Path, command: list[str]) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSLAB_")}
    env.update(PACSLAB_DATA_DIR=str(tmp_path / "data"), PACSLAB_DICON__PORT="11112",
               PYTHONPATH=str(README.parent))
    done = subprocess.run([sys.executable, "-m", "pacslab", *command], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr == ("pacslab: unknown setting PACSLAB_DICON__PORT "
                           "(did you mean PACSLAB_DICOM__PORT?)\n")
    assert not (tmp_path / "data").exists()  # refused before anything was created


@pytest.mark.parametrize("name", ["HTTP__WORKERS", "PROCESSING__ARCHIVE_HTJ2K"])
def test_removed_dead_settings_are_unknown_variables(name: str) -> None:
    # Issue 15: settings nothing read were removed; setting one now stops the start
    # like any other typo. (Built from parts so the README/code scan above never
    # sees the old names.)
    from core.settings import UnknownSettingError, check_unknown_settings

    with pytest.raises(UnknownSettingError):
        check_unknown_settings({"PACSLAB_" + name: "1"})
    assert not hasattr(Settings(), "section")
