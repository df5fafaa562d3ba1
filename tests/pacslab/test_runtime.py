"""pacslab.runtime: process-wide third-party globals set once, by the entry points."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from pydicom import config as pydicom_config
from pynetdicom import _config

from core.settings import DicomSettings
from tests.support import configured_runtime, preserved_runtime
from worklist.memory import InMemoryMppsRepository, InMemoryWorklist
from worklist.query import MatchOptions
from worklist.scp import build_ae, handlers


def test_receiver_process_globals_are_set_then_restored(tmp_path: Path) -> None:
    before = (tempfile.tempdir, pydicom_config.settings.reading_validation_mode,
              _config.STORE_RECV_CHUNKED_DATASET)
    with configured_runtime(receiver_staging=tmp_path):
        assert tempfile.gettempdir() == str(tmp_path)
        assert pydicom_config.settings.reading_validation_mode == pydicom_config.IGNORE
        assert _config.STORE_RECV_CHUNKED_DATASET is True
        assert _config.LOG_REQUEST_IDENTIFIERS is False
        assert _config.LOG_RESPONSE_IDENTIFIERS is False
        assert _config.PASS_CONTEXTVARS is True
        assert _config.LOG_HANDLER_LEVEL == "none"
    assert (tempfile.tempdir, pydicom_config.settings.reading_validation_mode,
            _config.STORE_RECV_CHUNKED_DATASET) == before


def test_without_a_receiver_only_logging_globals_are_set(tmp_path: Path) -> None:
    with preserved_runtime():
        tempfile.tempdir = None
        _config.STORE_RECV_CHUNKED_DATASET = False
        with configured_runtime():
            assert _config.LOG_REQUEST_IDENTIFIERS is False
            assert tempfile.tempdir is None
            assert _config.STORE_RECV_CHUNKED_DATASET is False


def test_building_the_worklist_scp_changes_no_global(monkeypatch: pytest.MonkeyPatch) -> None:
    # The leak of issue 15: constructors used to flip pynetdicom's globals.
    monkeypatch.setattr(_config, "LOG_REQUEST_IDENTIFIERS", True)
    monkeypatch.setattr(_config, "LOG_RESPONSE_IDENTIFIERS", True)
    monkeypatch.setattr(_config, "PASS_CONTEXTVARS", False)
    build_ae(DicomSettings())
    handlers(InMemoryWorklist(), InMemoryMppsRepository(), MatchOptions())
    assert _config.LOG_REQUEST_IDENTIFIERS is True
    assert _config.LOG_RESPONSE_IDENTIFIERS is True
    assert _config.PASS_CONTEXTVARS is False
