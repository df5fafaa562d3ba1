"""The action log: every action is logged; any edit, removal or swap is detected (issue 7 §2)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError

from core.audit import AuditEntry, ChainedEntry, verify_chain
from core.settings import Settings
from storage.audit import AuditLog
from tests.security._support import bearer

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _entry(i: int) -> AuditEntry:
    return AuditEntry(action="R", event_type="rest", outcome="0", agent=f"user{i % 3}",
                      agent_type="user", resource=f"/dicomweb/studies/1.2.{i}",
                      patient_key=f"{i:032x}")


@pytest.fixture
def log(settings: Settings) -> AuditLog:
    from pacslab.wiring import build_index

    index = build_index(settings, migrate=True)
    audit = AuditLog(index.engine, settings.audit, url=index.url)
    for i in range(10):
        audit.record(_entry(i))
    assert audit.flush()
    return audit


def _attack(engine: Engine, *statements: str) -> None:
    # Whoever tampers with the file can drop the append-only triggers first.
    with engine.begin() as conn:
        conn.execute(text("DROP TRIGGER IF EXISTS audit_events_no_update"))
        conn.execute(text("DROP TRIGGER IF EXISTS audit_events_no_delete"))
        for stmt in statements:
            conn.execute(text(stmt))


def test_intact_log_verifies(log: AuditLog) -> None:
    assert log.head()[0] == 10  # type: ignore[index]
    assert log.verify() == []


def test_database_refuses_update_and_delete(log: AuditLog) -> None:
    for stmt in ("UPDATE audit_events SET agent='x' WHERE seq=3",
                 "DELETE FROM audit_events WHERE seq=3"):
        with pytest.raises(DBAPIError), log.engine.begin() as conn:
            conn.execute(text(stmt))


def test_edited_entry_is_named(log: AuditLog) -> None:
    _attack(log.engine, "UPDATE audit_events SET agent='someone-else' WHERE seq=4")
    problems = log.verify()
    assert [(p.kind, p.seq) for p in problems] == [("edited", 4)]


def test_edited_and_rehashed_entry_is_named(log: AuditLog) -> None:
    from core.audit import entry_hash

    rows = list(log.entries())
    forged = rows[5].as_dict() | {"outcome": "8"}
    forged_hash = entry_hash(forged)
    _attack(log.engine, f"UPDATE audit_events SET outcome='8', hash='{forged_hash}' WHERE seq=6")
    problems = log.verify()
    assert problems and problems[0].kind == "edited" and problems[0].seq == 6


def test_removed_entry_is_named(log: AuditLog) -> None:
    _attack(log.engine, "DELETE FROM audit_events WHERE seq=7")
    problems = log.verify()
    assert [(p.kind, p.seq) for p in problems] == [("removed", 7)]


def test_removed_tail_is_detected(log: AuditLog) -> None:
    _attack(log.engine, "DELETE FROM audit_events WHERE seq >= 9")
    assert [(p.kind, p.seq) for p in log.verify()] == [("truncated", 9)]


def test_swapped_entries_are_named(log: AuditLog) -> None:
    # Exchange the content of entries 3 and 4 (keeping their positions).
    cols = [c for c in ChainedEntry.__dataclass_fields__ if c != "seq"]
    sets = ", ".join(f"{c} = (SELECT {c} FROM audit_events b WHERE b.seq = "
                     f"CASE audit_events.seq WHEN 3 THEN 4 ELSE 3 END)" for c in cols)
    _attack(log.engine, "CREATE TEMP TABLE t AS SELECT * FROM audit_events",
            f"UPDATE audit_events SET {sets.replace('audit_events b', 't b')} "
            "WHERE seq IN (3, 4)")
    problems = log.verify()
    assert {p.kind for p in problems} == {"reordered"}
    assert {p.seq for p in problems} >= {3, 4}
    assert "entry 3 was moved: it was written after entry 4" in [p.message for p in problems]


def test_pure_verify_on_a_reordered_list(log: AuditLog) -> None:
    rows = list(log.entries())
    rows[2], rows[3] = rows[3], rows[2]
    import dataclasses

    renumbered = [dataclasses.replace(r, seq=i + 1) for i, r in enumerate(rows)]
    assert {p.kind for p in verify_chain(renumbered, log.head())} >= {"reordered"}


def test_cli_audit_verify(log: AuditLog, settings: Settings) -> None:
    env = {"PACSLAB_DATA_DIR": str(settings.data_dir), "PATH": "/usr/bin:/bin"}
    ok = subprocess.run([sys.executable, "-m", "pacslab", "audit", "verify"], env=env,
                        capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert ok.returncode == 0, ok.stderr
    assert "intact: 10 entries" in ok.stdout
    _attack(log.engine, "UPDATE audit_events SET resource='/x' WHERE seq=2")
    bad = subprocess.run([sys.executable, "-m", "pacslab", "audit", "verify"], env=env,
                         capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert bad.returncode == 1
    assert "TAMPERED edited at entry 2" in bad.stdout


def test_http_reads_and_refusals_are_logged_without_phi(
        client: TestClient, app: FastAPI, token: Callable[..., str]) -> None:
    client.get("/fhir/AuditEvent?patient=urn:hospital|PID-123&agent=x",
               headers=bearer(token("admin", subject="auditor")))
    client.get("/metrics")  # refused: no token
    assert app.state.audit.flush()
    entries = list(app.state.audit.entries())
    assert [(e.agent, e.outcome_desc) for e in entries] == [("auditor", "HTTP 200"),
                                                           ("anonymous", "HTTP 401")]
    first = entries[0]
    assert first.patient_key and "PID-123" not in first.as_dict().__repr__()
    assert '"query":["agent","patient"]' in first.detail
    # the FHIR search finds it by patient, agent and date
    found = client.get("/fhir/AuditEvent", params={"patient": "urn:hospital|PID-123",
                                                   "date": f"ge{first.recorded[:10]}"},
                       headers=bearer(token("admin"))).json()
    assert [e["resource"]["id"] for e in found["entry"]] == ["1"]
    assert found["entry"][0]["resource"]["resourceType"] == "AuditEvent"
    by_agent = client.get("/fhir/AuditEvent", params={"agent": "anonymous"},
                          headers=bearer(token("admin"))).json()
    assert [e["resource"]["outcome"] for e in by_agent["entry"]] == ["4"]


@pytest.fixture
def entries_wait_for_the_association(settings: Settings) -> None:
    """Summaries open for ten minutes: in these tests only the end of the association
    can have written them (ingest/store_audit.py)."""
    settings.audit.store_summary_s = 600


def _store_entries(service: Any) -> list[ChainedEntry]:
    assert service.audit.flush()
    return [e for e in service.audit.entries() if e.event_type == "dicom.c-store"]


@pytest.mark.network
def test_c_store_is_one_entry_per_association_and_study(
    entries_wait_for_the_association: None, receiver: Any, tmp_path: Path
) -> None:
    """PS3.15 A.5.3 DICOM Instances Transferred: what an association stored of a study
    is one entry (its SOP Classes and counts), written when the association ends; a
    refused instance keeps an entry of its own, with its status."""
    import pydicom
    from pydicom.uid import generate_uid

    from core.synthetic import write_ct_series
    from tests.support import run_dcmtk, wait_until

    paths = write_ct_series(tmp_path / "ct", slices=5, rows=32, columns=32)
    study = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    # Another patient's study in the same association: an entry of its own, with its
    # own count and patient reference.
    other_paths = write_ct_series(tmp_path / "other", slices=2, rows=32, columns=32,
                                  patient_id="SYN0002", accession_number="ACC0002")
    other = str(pydicom.dcmread(other_paths[0], stop_before_pixels=True).StudyInstanceUID)
    result = run_dcmtk(["storescu", "-aet", "CT_ROOM_1", "+sd", "127.0.0.1",
                        str(receiver.port), str(tmp_path / "ct"), str(tmp_path / "other")],
                       nodelay=True)
    assert result.returncode == 0, result.stderr
    service = receiver.service
    # storescu may exit on the A-RELEASE-RP before the receiver has closed its end and
    # written the association's entries: wait for them (not for longer than needed).
    wait_until(lambda: len(_store_entries(service)) >= 2, message="no entries at release")
    associated = _store_entries(service)
    assert len(associated) == 2
    by_study = {e.resource: e for e in associated}
    entry, second = by_study[f"Study/{study}"], by_study[f"Study/{other}"]
    assert (entry.agent, entry.agent_type, entry.outcome, entry.outcome_desc,
            entry.resource) == ("CT_ROOM_1", "ae", "0", "0x0000 stored", f"Study/{study}")
    assert json.loads(entry.detail) == {"study_instance_uid": study, "instances": 5,
                                        "sop_classes": {CT_IMAGE_STORAGE: 5}}
    assert json.loads(second.detail) == {"study_instance_uid": other, "instances": 2,
                                         "sop_classes": {CT_IMAGE_STORAGE: 2}}
    assert entry.patient_key and second.patient_key and entry.patient_key != second.patient_key
    assert entry.correlation_id == second.correlation_id not in ("", "-")

    # A second association: the same five again (duplicates) and one whose pixel data
    # is shorter than Rows × Columns says (refused, PS3.5 8.1.1).
    bad = pydicom.dcmread(paths[0])
    bad.SOPInstanceUID = generate_uid()
    bad.file_meta.MediaStorageSOPInstanceUID = bad.SOPInstanceUID
    bad.Rows = 64
    (tmp_path / "bad").mkdir()
    bad.save_as(tmp_path / "bad" / "short.dcm", enforce_file_format=True)
    run_dcmtk(["storescu", "-aet", "CT_ROOM_1", "+sd", "127.0.0.1", str(receiver.port),
               str(tmp_path / "ct"), str(tmp_path / "bad")], nodelay=True)
    wait_until(lambda: len(_store_entries(service)) >= 4, message="no entries at release")
    later = _store_entries(service)
    assert later[:2] == associated
    by_resource = {e.resource: e for e in later[2:]}
    assert set(by_resource) == {f"Study/{study}", f"Instance/{bad.SOPInstanceUID}"}
    again, refused = by_resource[f"Study/{study}"], by_resource[f"Instance/{bad.SOPInstanceUID}"]
    assert again.outcome_desc == "0x0000 duplicate"
    assert json.loads(again.detail)["instances"] == 5
    assert refused.outcome != "0" and not refused.outcome_desc.startswith("0x0000")
    assert json.loads(refused.detail) == {"sop_class_uid": CT_IMAGE_STORAGE}
    assert again.correlation_id == refused.correlation_id != entry.correlation_id
    assert service.audit.verify() == []


@pytest.mark.network
def test_c_store_entries_when_a_pynetdicom_association_is_released_or_aborted(
    entries_wait_for_the_association: None, receiver: Any, tmp_path: Path
) -> None:
    """Associations pynetdicom serves (here: a User Identity item, PS3.7 D.3.3.7) write
    their entries on EVT_RELEASED and EVT_ABORTED."""
    from pynetdicom import AE
    from pynetdicom.pdu_primitives import UserIdentityNegotiation
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    from core.synthetic import write_ct_series
    from tests.support import wait_until

    paths = write_ct_series(tmp_path / "ct", slices=3, rows=32, columns=32)
    ae = AE(ae_title="MODALITY_X")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(CTImageStorage)
    identity = UserIdentityNegotiation()
    identity.user_identity_type = 1
    identity.primary_field = b"technologist"
    service = receiver.service

    assoc = ae.associate("127.0.0.1", receiver.port, ext_neg=[identity])
    assert assoc.is_established
    for path in paths[:2]:
        assert assoc.send_c_store(path).Status == 0x0000
    assoc.release()
    (released,) = wait_until(lambda: _store_entries(service), message="no entry at release")
    assert (released.agent, json.loads(released.detail)["instances"]) == ("MODALITY_X", 2)

    assoc = ae.associate("127.0.0.1", receiver.port, ext_neg=[identity])
    assert assoc.is_established
    assert assoc.send_c_store(paths[2]).Status == 0x0000
    assoc.abort()
    wait_until(lambda: len(_store_entries(service)) == 2, message="no entry at abort")
    _, aborted = _store_entries(service)
    assert json.loads(aborted.detail)["instances"] == 1
    assert aborted.correlation_id != released.correlation_id


def test_flush_waits_for_the_batch_being_written(settings: Settings) -> None:
    """flush() returns once every entry queued before it is in the log, including the
    ones the writer thread has already taken and is writing (it returned at once then,
    and a C-MOVE test found its entry missing after the flush)."""
    import threading

    from pacslab.wiring import build_index

    index = build_index(settings, migrate=True)
    audit = AuditLog(index.engine, settings.audit, url=index.url)
    writing, release = threading.Event(), threading.Event()
    real = audit.append

    def slow_append(entries: list[AuditEntry]) -> list[ChainedEntry]:
        writing.set()
        release.wait(30)
        return real(entries)

    audit.append = slow_append  # type: ignore[method-assign]
    audit.record(_entry(1))
    assert writing.wait(30)  # taken from the queue, not written yet
    flushed: list[bool] = []
    flusher = threading.Thread(target=lambda: flushed.append(audit.flush()))
    flusher.start()
    flusher.join(0.5)
    assert flushed == []  # still waiting: the entry is not in the log
    release.set()
    flusher.join(30)
    assert flushed == [True]
    assert [e.resource for e in audit.entries()] == ["/dicomweb/studies/1.2.1"]
