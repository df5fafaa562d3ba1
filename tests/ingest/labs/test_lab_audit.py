"""Lab file drops append to the action log: ingested, rejected and duplicate (issue 7 §2).

Real analyzer captures from ``tests/data/lab`` (origin and license of each in
``tests/data/lab/SOURCES.md``) go through the watcher as ``pacslab labs`` wires it;
the log must name the profile as the agent, the file's hash as the resource, each
patient only by keyed reference, and still verify afterwards.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from lab_support import LabRig, lab_settings, make_rig

from core.audit import ChainedEntry, patient_key
from core.settings import Settings
from storage.audit import AuditLog
from storage.lab import LabResultQuery, StoredLabResult

#: Captures with results: the inbox each goes to.
INGESTED = {
    "astm/immucor_galileo_result.astm": "auto",
    "astm/biorad_ihcom_bloodtype_two_patients.astm": "auto",
    "hl7/hapi_oml_o21_oul_r22_multi_v251.hl7": "auto",
    "files/roche_cobas_c111_export_semicolon.csv": "cobas",
}
#: Captures the lab inbox refuses (orders and acknowledgements, not results).
REJECTED = ["hl7/cdc_natus_ack_v251.hl7", "hl7/cdc_epic_orm_o01_v23.hl7"]


@pytest.fixture
def rig(settings: Settings) -> Iterator[LabRig]:
    yield from make_rig(lab_settings(settings))


def _log(rig: LabRig) -> AuditLog:
    audit = next(iter(rig.watcher.inboxes.values())).service.audit
    assert audit is not None
    assert audit.flush()
    return audit


def _file_results(rig: LabRig, sha: str) -> list[StoredLabResult]:
    found = rig.store.search_results(
        LabResultQuery(qc=None, limit=10_000, current_only=False))[0]
    return [r for r in found if r.file_sha256 == sha]


def test_every_filed_lab_file_is_logged(rig: LabRig) -> None:
    for rel, profile in INGESTED.items():
        rig.drop(rel, profile)
    for rel in REJECTED:
        rig.drop(rel)
    # The same bytes again under another name: filed as a duplicate, not ingested.
    rig.drop("astm/immucor_galileo_result.astm", name="galileo_again.astm")
    outcomes = {o.name: o for o in rig.run()}
    assert {n: o.status for n, o in outcomes.items()} == {
        **{Path(rel).name: "ingested" for rel in INGESTED},
        **{Path(rel).name: "rejected" for rel in REJECTED},
        "galileo_again.astm": "duplicate",
    }
    log = _log(rig)
    entries = [e for e in log.entries() if e.event_type == "lab.file"]
    by_file: dict[str, list[ChainedEntry]] = {}
    for e in entries:
        by_file.setdefault(e.resource, []).append(e)
    secret = next(iter(rig.watcher.inboxes.values())).service.patient_secret
    stored_patients: set[str] = set()

    for rel, profile in INGESTED.items():
        outcome = outcomes[Path(rel).name]
        logged = [e for e in by_file[f"LabFile/{outcome.sha256}"]
                  if e.outcome_desc != "duplicate: not ingested"]
        results = _file_results(rig, outcome.sha256)
        per_patient = Counter(r.patient_id for r in results if r.patient_id and not r.is_qc)
        stored_patients |= set(per_patient)
        for e in logged:
            assert (e.action, e.outcome, e.outcome_desc) == ("C", "0", "ingested")
            assert (e.agent, e.agent_type) == (profile, "system")
            assert e.source == f"inbox/lab/{profile}"
            assert e.correlation_id == outcome.sha256[:12]  # the file's id in the logs
        # One entry per patient of the file, each with that patient's results.
        expected = {patient_key(secret, pid): n for pid, n in per_patient.items()} or {
            "": len(results)}
        assert {e.patient_key: json.loads(e.detail)["results"] for e in logged} == expected
        assert len(logged) == len(expected)

    assert len(stored_patients) >= 3  # the captures hold several distinct patients
    for rel in REJECTED:
        outcome = outcomes[Path(rel).name]
        (e,) = by_file[f"LabFile/{outcome.sha256}"]
        assert (e.action, e.outcome, e.patient_key) == ("C", "4", "")
        assert e.outcome_desc == "rejected: Unparseable lab message"
        reason = json.loads((rig.inbox() / "rejected" / f"{Path(rel).name}.error.json")
                            .read_text())
        assert json.loads(e.detail)["where"] == reason["where"]
    duplicate = outcomes["galileo_again.astm"]
    assert duplicate.sha256 == outcomes["immucor_galileo_result.astm"].sha256
    dup_entries = [e for e in by_file[f"LabFile/{duplicate.sha256}"]
                   if e.outcome_desc.startswith("duplicate")]
    assert [(e.outcome, e.patient_key) for e in dup_entries] == [("0", "")]

    # Identifiers and names of the stored results never appear in the log.
    results = rig.store.search_results(LabResultQuery(qc=None, limit=10_000))[0]
    hashes = ("prev_hash", "hash", "patient_key", "resource", "correlation_id")
    text = "\n".join(json.dumps({k: v for k, v in e.as_dict().items() if k not in hashes},
                                ensure_ascii=False) for e in entries)
    for plain in {r.patient_id for r in results} | {r.patient_name for r in results}:
        if plain.strip():
            assert plain.strip() not in text, plain
    assert log.verify() == []
    env = {"PACSLAB_DATA_DIR": str(rig.settings.data_dir), "PATH": "/usr/bin:/bin"}
    verified = subprocess.run([sys.executable, "-m", "pacslab", "audit", "verify"], env=env,
                              capture_output=True, text=True, cwd=Path(__file__).parents[3],
                              check=False)
    assert verified.returncode == 0, verified.stdout + verified.stderr
