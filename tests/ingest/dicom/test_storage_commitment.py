"""Storage Commitment Push Model SCP (PS3.4 J) against pynetdicom as the commitment SCU.

The SCU (``commit_scu.py``, its own process) asks about a stored instance, an
unknown one, one whose stored original was corrupted on disk and one named with the
wrong SOP Class; the N-EVENT-REPORT must commit only the first and list the others
with their Failure Reasons, on the same association and, when the SCU has released
it, on a new one to the AE configured for its title.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from core.settings import QueryRetrieveSettings, RemoteAE, Settings
from storage.index.schema import jobs
from tests.ingest.dicom.qr_data import CT, MR, Study, build, store
from tests.support import Receiver, free_port, wait_until

pytestmark = pytest.mark.network

SCU_AE = "COMMITSCU"
SCU = Path(__file__).with_name("commit_scu.py")


@pytest.fixture
def scu_port() -> int:
    return free_port()


@pytest.fixture
def settings(settings: Settings, scu_port: int) -> Settings:
    qr = QueryRetrieveSettings(destinations={SCU_AE: RemoteAE(host="127.0.0.1", port=scu_port)})
    return settings.model_copy(update={"qr": qr})


@pytest.fixture
def stored(receiver: Receiver) -> dict[str, str]:
    study = Study("SC001", "PHAM^VAN C", "20240501", "A5001", [("CT", CT, 3)])
    store(receiver.port, build(study))
    good, corrupt, other = study.sop_uids[0]
    # Rot only once the receiver's journal is written out: its write-out replaces a file
    # that is not the journaled content (storage/journal.py), and one that ran after the
    # damage (~1 s after the last instance, the SCU still starting on a loaded machine)
    # healed it, so the report committed the "corrupt" instance too (seen in CI).
    index: Any = receiver.index
    wait_until(lambda: not index.pending_originals(), timeout=60,
               message="the receiver's journal was not written out")
    inst = receiver.index.get_instance(corrupt)  # type: ignore[attr-defined]
    path = receiver.service.archive.originals.path(inst.blob_key)  # type: ignore[attr-defined]
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # one byte of Pixel Data rots on disk
    path.chmod(0o644)
    path.write_bytes(bytes(raw))
    return {"good": good, "corrupt": corrupt, "other": other}


def commit(receiver: Receiver, mode: str, scu_port: int, spec: Mapping[str, object]
           ) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, str(SCU), str(receiver.port), mode, str(scu_port), SCU_AE,
         json.dumps(spec)],
        capture_output=True, text=True, timeout=90, check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _spec(uids: dict[str, str], unknown: str) -> dict[str, object]:
    return {
        "transaction": str(generate_uid()),
        "references": [[CT, uids["good"]], [CT, unknown], [CT, uids["corrupt"]],
                       [MR, uids["other"]]],
    }


@pytest.mark.parametrize("mode", ["same", "new"])
def test_commitment_report(receiver: Receiver, stored: dict[str, str], scu_port: int,
                           mode: str) -> None:
    unknown = str(generate_uid())
    spec = _spec(stored, unknown)
    report = commit(receiver, mode, scu_port, spec)
    assert report["status"] == 0x0000
    assert "error" not in report, report
    assert report["type"] == 2  # failures exist (PS3.4 Table J.3-2)
    assert report["transaction"] == spec["transaction"]
    assert report["committed"] == [stored["good"]]
    assert report["failed"] == {unknown: 0x0112, stored["corrupt"]: 0x0110,
                                stored["other"]: 0x0119}


def test_all_committed_is_event_type_1(receiver: Receiver, stored: dict[str, str],
                                       scu_port: int) -> None:
    spec = {"transaction": str(generate_uid()), "references": [[CT, stored["good"]]]}
    report = commit(receiver, "same", scu_port, spec)
    assert report["type"] == 1 and report["failed"] == {}


def test_malformed_request_is_refused(receiver: Receiver, scu_port: int) -> None:
    spec: dict[str, object] = {"transaction": str(generate_uid()), "references": []}
    assert commit(receiver, "same", scu_port, spec)["status"] == 0x0120
    spec = {"transaction": str(generate_uid()), "references": [[CT, "1.2.3"]], "action": 7}
    assert commit(receiver, "same", scu_port, spec)["status"] == 0x0123


def test_owed_report_is_delivered_after_a_restart(
    receiver: Receiver, stored: dict[str, str], scu_port: int, settings: Settings
) -> None:
    """The SCU leaves before its report and comes back once the receiver gave up:
    the request kept in the index is reported by a worker built afresh (a restart)."""
    from pacslab.worker_process import build_worker
    from storage.index.qr import COMMIT_JOB, commitment_request

    unknown = str(generate_uid())
    spec = {"transaction": str(generate_uid()),
            "references": [[CT, stored["good"]], [CT, unknown]]}
    assert commit(receiver, "away", scu_port, spec)["status"] == 0x0000
    index: Any = receiver.index
    uid = str(spec["transaction"])

    def owed() -> Any:
        return next(j for j in index.get_jobs(target=uid) if j.kind == COMMIT_JOB)

    assert owed().status == "pending"  # kept before the N-ACTION was answered
    wait_until(lambda: "receiver:" in _job_error(index, owed().id), timeout=30,
               message="the receiver did not give up")
    listener = subprocess.Popen(
        [sys.executable, str(SCU), str(receiver.port), "listen", str(scu_port), SCU_AE, "{}"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert listener.stdout is not None
        assert "listening" in listener.stdout.readline()
        with index.write() as conn:  # the grace period is over
            conn.execute(update(jobs).where(jobs.c.id == owed().id).values(not_before=0))
        worker = build_worker(settings, name="restarted")
        worker.run_once()
        report = json.loads(listener.communicate(timeout=60)[0].strip().splitlines()[-1])
    finally:
        listener.kill()
    assert "error" not in report, report
    assert report["transaction"] == uid and report["type"] == 2
    assert report["committed"] == [stored["good"]]
    assert report["failed"] == {unknown: 0x0112}
    assert owed().status == "done"
    assert commitment_request(index, uid) is None


def test_dead_lettered_report_is_retried_from_the_admin_api(
    receiver: Receiver, client: Any, stored: dict[str, str], scu_port: int,
    settings: Settings,
) -> None:
    """The SCU stays away until the worker's tries run out: the report is dead-lettered
    with its last error; once the SCU listens again an admin retries it through the
    API and the worker delivers it on a new association, decided again."""
    from pacslab.worker_process import build_worker
    from storage.index.qr import COMMIT_JOB

    settings = settings.model_copy(update={"qr": settings.qr.model_copy(update={
        "commit_max_attempts": 2, "commit_retry_base_s": 0.01})})
    unknown = str(generate_uid())
    spec: dict[str, object] = {
        "transaction": str(generate_uid()),
        "references": [[CT, stored["good"]], [CT, unknown], [MR, stored["other"]]],
    }
    assert commit(receiver, "away", scu_port, spec)["status"] == 0x0000
    index: Any = receiver.index
    uid = str(spec["transaction"])

    def owed() -> Any:
        return next(j for j in index.get_jobs(target=uid) if j.kind == COMMIT_JOB)

    wait_until(lambda: "receiver:" in _job_error(index, owed().id), timeout=30,
               message="the receiver did not give up")
    with index.write() as conn:  # the grace period is over
        conn.execute(update(jobs).where(jobs.c.id == owed().id).values(not_before=0))
    worker = build_worker(settings, name="commit-dlq")
    wait_until(lambda: worker.run_once() == 0 and owed().status == "failed", timeout=30,
               message="the report was not dead-lettered")
    dead = client.get("/admin/commitment/jobs", params={"status": "failed"}).json()
    assert [(d["id"], d["transaction_uid"], d["calling_ae"], d["attempts"])
            for d in dead] == [(owed().id, uid, SCU_AE, 2)]
    assert f"{SCU_AE} at 127.0.0.1:{scu_port} took no N-EVENT-REPORT" in dead[0]["last_error"]
    assert 'pacslab_commit_jobs{status="failed"} 1' in client.get("/metrics").text
    worker.run_once()
    assert owed().status == "failed"  # nothing runs it until someone asks
    listener = subprocess.Popen(
        [sys.executable, str(SCU), str(receiver.port), "listen", str(scu_port), SCU_AE, "{}"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert listener.stdout is not None
        assert "listening" in listener.stdout.readline()
        assert client.post(f"/admin/commitment/jobs/{owed().id}/retry").status_code == 202
        assert worker.run_once() == 1
        report = json.loads(listener.communicate(timeout=60)[0].strip().splitlines()[-1])
    finally:
        listener.kill()
    assert "error" not in report, report
    assert report["transaction"] == uid and report["type"] == 2
    assert report["committed"] == [stored["good"]]
    assert report["failed"] == {unknown: 0x0112, stored["other"]: 0x0119}
    assert owed().status == "done"
    assert client.get("/admin/commitment").json()["jobs"]["failed"] == 0


def _job_error(index: Any, job_id: int) -> str:
    with index.read() as conn:
        return str(conn.execute(select(jobs.c.error).where(jobs.c.id == job_id)).scalar())


def test_pure_parse_refuses_missing_transaction() -> None:
    from core.errors import InvalidDatasetError
    from services.commitment import parse_request

    with pytest.raises(InvalidDatasetError):
        parse_request(Dataset())
