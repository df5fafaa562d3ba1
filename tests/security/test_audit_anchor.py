"""The action log is anchored outside the database (issue 14 item 5).

Whoever can write the database can drop the append-only triggers, rewrite entries and
recompute the chain, or cut the tail and move the head. These tests do exactly that
and run the real ``pacslab audit verify`` as a subprocess: it must say TAMPERED.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from core.audit import GENESIS, AuditEntry, entry_hash, is_keyed, keyed_hash
from core.settings import Settings
from storage.audit import AuditLog, CheckpointFile
from storage.backup import backup, verify

ROOT = Path(__file__).resolve().parents[2]


def _entry(i: int) -> AuditEntry:
    return AuditEntry(action="R", event_type="rest", outcome="0", agent=f"user{i % 3}",
                      agent_type="user", resource=f"/dicomweb/studies/1.2.{i}")


def _write(settings: Settings, n: int, start: int = 0) -> AuditLog:
    from pacslab.wiring import build_index

    index = build_index(settings, migrate=True)
    log = AuditLog(index.engine, settings.audit, url=index.url)
    for i in range(start, start + n):
        log.record(_entry(i))
    assert log.flush()
    log.close()
    return log


@pytest.fixture
def log(settings: Settings) -> AuditLog:
    return _write(settings, 10)


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSLAB_")}
    env.update(PACSLAB_DATA_DIR=str(settings.data_dir), PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "pacslab", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def _rechain(engine: Engine, *, key: bytes | None, edit_seq: int,
             keep_upto: int | None = None) -> None:
    """Rewrite entry ``edit_seq`` and recompute every hash and the head, as an attacker
    with write access to the database (and, if ``key`` is given, the chain key) would."""
    with engine.begin() as conn:
        conn.execute(text("DROP TRIGGER IF EXISTS audit_events_no_update"))
        conn.execute(text("DROP TRIGGER IF EXISTS audit_events_no_delete"))
        rows = [dict(r) for r in conn.execute(
            text("SELECT * FROM audit_events ORDER BY seq")).mappings()]
        if keep_upto is not None:
            rows = rows[:keep_upto]
        prev = GENESIS
        for row in rows:
            if row["seq"] == edit_seq:
                row["agent"] = "nobody"
            row["prev_hash"] = prev
            row["hash"] = keyed_hash(row, key) if key is not None else entry_hash(row)
            prev = row["hash"]
            conn.execute(text("UPDATE audit_events SET agent=:agent, prev_hash=:prev_hash, "
                              "hash=:hash WHERE seq=:seq"), row)
        conn.execute(text("UPDATE audit_head SET seq=:seq, hash=:hash WHERE id=1"),
                     {"seq": rows[-1]["seq"], "hash": rows[-1]["hash"]})


def test_the_chain_is_keyed_and_checkpointed(log: AuditLog, settings: Settings) -> None:
    assert all(is_keyed(e.hash) for e in log.entries())
    key_file = settings.audit.chain_key_file
    assert key_file is not None and key_file.stat().st_mode & 0o777 == 0o600
    assert settings.audit.checkpoint_file is not None
    checkpoints, bad = CheckpointFile(settings.audit.checkpoint_file).read(log.key)
    assert bad == [] and checkpoints[0].keyed_from == 1
    assert (checkpoints[-1].seq, checkpoints[-1].hash) == log.head()
    done = _cli(settings, "audit", "verify")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "intact: 10 entries" in done.stdout


def test_rechained_without_the_key_is_detected(log: AuditLog, settings: Settings) -> None:
    _rechain(log.engine, key=None, edit_seq=3)
    done = _cli(settings, "audit", "verify")
    assert done.returncode == 1
    assert ("TAMPERED edited at entry 1: entry 1 was edited and re-hashed without the chain "
            "key") in done.stdout
    assert "TAMPERED rechained at entry 10" in done.stdout


def test_rechained_with_the_key_is_detected_by_the_checkpoints(
        log: AuditLog, settings: Settings) -> None:
    assert log.key is not None
    _rechain(log.engine, key=log.key, edit_seq=3)  # an insider who also stole the key
    done = _cli(settings, "audit", "verify")
    assert done.returncode == 1
    assert ("TAMPERED rechained at entry 10: entry 10 is not the one checkpointed"
            in done.stdout)


def test_cut_tail_with_moved_head_is_detected(log: AuditLog, settings: Settings) -> None:
    with log.engine.begin() as conn:
        conn.execute(text("DROP TRIGGER IF EXISTS audit_events_no_delete"))
        conn.execute(text("DELETE FROM audit_events WHERE seq > 7"))
        h7 = conn.execute(text("SELECT hash FROM audit_events WHERE seq = 7")).scalar_one()
        conn.execute(text("UPDATE audit_head SET seq=7, hash=:h WHERE id=1"), {"h": h7})
    done = _cli(settings, "audit", "verify")
    assert done.returncode == 1
    assert "TAMPERED truncated at entry 8: entries 8..10 were removed from the end" in done.stdout


def test_forged_or_removed_checkpoints_are_reported(log: AuditLog, settings: Settings) -> None:
    cp_file = settings.audit.checkpoint_file
    assert cp_file is not None
    forged = {"seq": 3, "hash": "0" * 64, "keyed_from": 1, "at": "", "mac": "00" * 32}
    with cp_file.open("a") as fp:
        fp.write(json.dumps(forged) + "\n")
    done = _cli(settings, "audit", "verify")
    assert done.returncode == 1
    assert "was not written with the chain key" in done.stdout
    cp_file.unlink()
    done = _cli(settings, "audit", "verify")
    assert done.returncode == 1
    assert "TAMPERED checkpoint at entry 0: no checkpoint in" in done.stdout


def test_rechained_unkeyed_with_the_checkpoints_removed_is_detected(
        log: AuditLog, settings: Settings) -> None:
    """The whole log recomputed as plain SHA-256 and the checkpoint file deleted:
    nothing keyed is left, but a chain key without any checkpoint gives it away."""
    _rechain(log.engine, key=None, edit_seq=3)
    assert settings.audit.checkpoint_file is not None
    settings.audit.checkpoint_file.unlink()
    done = _cli(settings, "audit", "verify")
    assert done.returncode == 1
    assert "although the chain key exists" in done.stdout


def test_start_up_anchors_before_the_first_entry(settings: Settings) -> None:
    """``pacslab`` commands that start services record where keying begins at once."""
    from pacslab.cli import _prepare

    _prepare(settings)
    assert settings.audit.checkpoint_file is not None
    key = settings.audit.chain_key_file
    assert key is not None
    checkpoints, bad = CheckpointFile(settings.audit.checkpoint_file).read(key.read_bytes())
    assert bad == [] and [(c.seq, c.keyed_from) for c in checkpoints] == [(0, 1)]
    _prepare(settings)  # a restart adds no second switch
    assert len(CheckpointFile(settings.audit.checkpoint_file).lines()) == 1


def test_unkeyed_entries_of_an_older_version_are_kept_and_anchored(settings: Settings) -> None:
    legacy = settings.audit.model_copy(update={"chain_key_file": None})
    _write(settings.model_copy(update={"audit": legacy}), 5)  # the version before keying
    log = _write(settings, 5, start=5)
    entries = list(log.entries())
    assert [is_keyed(e.hash) for e in entries] == [False] * 5 + [True] * 5
    assert settings.audit.checkpoint_file is not None
    checkpoints, _ = CheckpointFile(settings.audit.checkpoint_file).read(log.key)
    assert (checkpoints[0].seq, checkpoints[0].keyed_from) == (5, 6)  # the switch
    done = _cli(settings, "audit", "verify")
    assert done.returncode == 0, done.stdout
    assert "5 entries predate the chain key" in done.stdout
    # Re-chaining the old part breaks the first keyed entry's (keyed) link to it.
    _rechain(log.engine, key=None, edit_seq=2, keep_upto=5)
    done = _cli(settings, "audit", "verify")
    assert done.returncode == 1 and "at entry 5" in done.stdout


def test_missing_or_exposed_key_refuses(log: AuditLog, settings: Settings) -> None:
    key_file = settings.audit.chain_key_file
    assert key_file is not None
    key_file.chmod(0o644)
    for args in (("audit", "verify"), ("token", "--scopes", "admin")):
        done = _cli(settings, *args)
        assert done.returncode == 2
        assert done.stderr == (f"pacslab: audit chain key {key_file} is accessible to others "
                               f"(mode 644): chmod 600 {key_file}\n")
    key = key_file.read_bytes()
    key_file.unlink()
    done = _cli(settings, "audit", "verify")
    assert done.returncode == 2
    assert "is missing but" in done.stderr and "restore keys/audit-chain.key" in done.stderr
    assert not key_file.exists()  # no new key was made up
    done = _cli(settings, "token", "--scopes", "admin")  # every command that starts services
    assert done.returncode == 2 and not key_file.exists()
    key_file.write_bytes(key)
    key_file.chmod(0o600)
    assert _cli(settings, "audit", "verify").returncode == 0


def test_backup_keeps_the_checkpoints_and_verifies_them(log: AuditLog, settings: Settings,
                                                        tmp_path: Path) -> None:
    backup(settings, tmp_path / "b")
    assert (tmp_path / "b" / "audit" / "checkpoints.jsonl").is_file()
    assert verify(tmp_path / "b") == []
    _rechain(log.engine, key=None, edit_seq=4)
    backup(settings, tmp_path / "b2")
    problems = verify(tmp_path / "b2")
    assert any("re-hashed without the chain key" in p for p in problems)
    assert any("is not the one checkpointed" in p for p in problems)


def test_fhir_search_with_an_impossible_date_is_400(client: object, token: object) -> None:
    """Found by schemathesis: ``date=2026-13-45`` matched the pattern and raised (500)."""
    from fastapi.testclient import TestClient

    from tests.security._support import bearer

    assert isinstance(client, TestClient) and callable(token)
    r = client.get("/fhir/AuditEvent", params={"date": "ge2026-13-45"},
                   headers=bearer(token("admin")))
    assert r.status_code == 400
    assert r.json()["resourceType"] == "OperationOutcome"
