"""Filing lab results (services/lab_results.py): one use case for every edge.

The inbox watcher and the analyzer links both file through
:class:`LabResultService`; what differs is only the :class:`LabSource` (the action
log's ``lab.file``/``lab.link`` and its agent and origin). A result of another
patient's specimen and test is held, logged and announced whichever way it came.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.audit import AuditEntry, patient_key
from core.settings import IndexSettings
from ingest.labs.parsers import parse
from services.lab_results import LabResultService, LabSource
from storage.index.lab import SqlLabStore
from storage.index.sql import SqlIndex
from storage.lab import StoredLabResult

#: ORU^R01 for patient 1300974, placer 4560411583; a real capture (CDC, tests/data/lab).
RESULT = Path(__file__).resolve().parents[1] / "data" / "lab" / "hl7" / (
    "cdc_oru_r01_v251_result_linked.hl7")
SECRET = b"k" * 32


class _Log:
    """The part of the action log the service uses."""

    def __init__(self) -> None:
        self.entries: list[AuditEntry] = []

    def record(self, entry: AuditEntry) -> None:
        self.entries.append(entry)


@pytest.fixture
def index(tmp_path: Path) -> Iterator[SqlIndex]:
    index = SqlIndex(IndexSettings(url=f"sqlite:///{tmp_path}/index.db"))
    yield index
    index.close()


def _service(index: SqlIndex, log: _Log, announced: list[StoredLabResult],
             **kwargs: Any) -> LabResultService:
    return LabResultService(
        SqlLabStore(index), audit=log, patient_secret=SECRET,  # type: ignore[arg-type]
        announce=lambda results: announced.extend(results), **kwargs)


def _file(service: LabResultService, raw: bytes, source: LabSource) -> Any:
    sha = hashlib.sha256(raw).hexdigest()
    filing = service.file(parse(raw), sha256=sha, name="r.hl7", fmt="hl7v2", source=source)
    service.publish(filing)
    return filing


def test_a_link_and_an_inbox_file_alike_but_for_their_source(index: SqlIndex) -> None:
    log, announced = _Log(), list[StoredLabResult]()
    service = _service(index, log, announced)
    raw = RESULT.read_bytes()
    first = _file(service, raw, LabSource.link("xn"))
    assert not first.outcome.duplicate and first.outcome.results >= 1
    assert first.filed_summary["new_versions"] == 0
    assert first.filed_summary["held_for_review"] == 0
    (entry,) = log.entries
    assert (entry.event_type, entry.agent, entry.source) == ("lab.link", "xn", "link/xn")
    assert entry.resource == f"LabFile/{first.sha256}"
    assert entry.patient_key == patient_key(SECRET, "1300974")
    assert json.loads(entry.detail)["analyzer"] == "xn"
    assert service.store.file_state(first.sha256) is not None  # journaled as link:xn

    # The same bytes again: a duplicate, nothing logged or announced.
    log.entries.clear()
    again = _file(service, raw, LabSource.inbox("auto", "auto"))
    assert again.outcome.duplicate and log.entries == []

    # Re-sent in other bytes through an inbox: a new version, logged as lab.file.
    _file(service, raw + b"\r", LabSource.inbox("auto", "auto", analyzer="cobas"))
    (entry,) = log.entries
    assert (entry.event_type, entry.agent, entry.source) == ("lab.file", "auto", "inbox/lab/auto")
    assert json.loads(entry.detail)["analyzer"] == "cobas"
    assert json.loads(entry.detail)["new_versions"] >= 1


def test_another_patients_specimen_is_held_logged_and_announced_from_a_link(
    index: SqlIndex,
) -> None:
    log, announced = _Log(), list[StoredLabResult]()
    service = _service(index, log, announced)
    raw = RESULT.read_bytes()
    _file(service, raw, LabSource.inbox("auto", "auto"))
    assert announced == []  # nothing critical, nothing held
    other = raw.replace(b"1300974^^^Baptist East^MR", b"7700001^^^Baptist East^MR")
    assert other != raw
    log.entries.clear()
    filing = _file(service, other, LabSource.link("xn"))
    assert filing.filed_summary["held_for_review"] == len(filing.outcome.conflicts) >= 1
    held = [e for e in log.entries if e.outcome == "4"]
    assert len(held) == len(filing.outcome.conflicts)
    assert {e.event_type for e in held} == {"lab.link"}
    assert {e.patient_key for e in held} == {patient_key(SECRET, "7700001")}
    assert [r.observation_id for r in announced] == [
        r.observation_id for r in filing.outcome.conflicts]
