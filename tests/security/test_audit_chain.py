"""The action log: every action is logged; any edit, removal or swap is detected (issue 7 §2)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError

from core.audit import AuditEntry, ChainedEntry, verify_chain
from core.settings import Settings
from storage.audit import AuditLog
from tests.security._support import bearer


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


@pytest.mark.network
def test_c_store_is_logged_with_the_ae_title(receiver, tmp_path: Path) -> None:
    from core.synthetic import write_ct_series
    from tests.support import run_dcmtk

    write_ct_series(tmp_path / "ct", slices=5, rows=32, columns=32)
    result = run_dcmtk(["storescu", "-aet", "CT_ROOM_1", "+sd", "127.0.0.1",
                        str(receiver.port), str(tmp_path / "ct")], nodelay=True)
    assert result.returncode == 0, result.stderr
    service = receiver.service
    assert service.audit.flush()
    entries = [e for e in service.audit.entries() if e.event_type == "dicom.c-store"]
    assert len(entries) == 5
    assert {e.agent for e in entries} == {"CT_ROOM_1"}
    assert all(e.patient_key and e.outcome == "0" for e in entries)
    assert service.audit.verify() == []
