"""Several workers sharing one queue on PostgreSQL (issue #8 §1): no job claimed twice.

Two separate processes (as on two machines) claim from the same database at once with
``FOR UPDATE SKIP LOCKED``, each marking its jobs done; every job is claimed exactly
once and none is left behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from core.instance import InstanceRecord
from core.settings import IndexSettings
from storage.abc import NewInstance
from storage.index.sql import SqlIndex

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parents[2]

_CLAIMER = """
import json, sys, time
from core.settings import IndexSettings
from storage.index.sql import SqlIndex
index = SqlIndex(IndexSettings(url=sys.argv[1], migrate=False))
name = sys.argv[2]
print("ready", flush=True)
sys.stdin.readline()  # start together
claimed = []
while True:
    jobs = index.claim_jobs(name, limit=int(sys.argv[3]))
    if not jobs:
        break
    claimed.extend(j.id for j in jobs)
    index.finish_jobs([(j.id, {"by": name}) for j in jobs])
print(json.dumps(claimed), flush=True)
index.close()
"""


def _record(i: int) -> InstanceRecord:
    return InstanceRecord(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid=f"1.2.9.{i}",
        study_instance_uid="1.2.9", series_instance_uid=f"1.2.9.0.{i % 7}",
        transfer_syntax_uid="1.2.840.10008.1.2.1", patient_id="P9", modality="CT",
        instance_number=i)


@pytest.mark.parametrize("batch", [1, 7])
def test_two_processes_never_claim_the_same_job(pg_url: str, batch: int) -> None:
    index = SqlIndex(IndexSettings(url=pg_url))
    total = 600
    now = datetime.now(UTC)
    items = [NewInstance(record=_record(i), blob_key=f"{i:064x}", size=1, calling_ae="CT",
                         received_at=now) for i in range(total)]
    for start in range(0, total, 100):
        index.add_instances(items[start:start + 100])
    assert index.counts()["jobs_pending"] == total

    procs = [subprocess.Popen([sys.executable, "-c", _CLAIMER, pg_url, f"w{n}", str(batch)],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
             for n in range(2)]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    claimed = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        claimed.append(json.loads(out.strip().splitlines()[-1]))

    a, b = (set(c) for c in claimed)
    assert len(a) == len(claimed[0]) and len(b) == len(claimed[1])
    assert not a & b, "a job was claimed by both workers"
    assert len(a | b) == total
    # both really worked the queue concurrently (not one after the other)
    assert a and b
    counts = index.counts()
    assert counts["jobs_done"] == total and counts.get("jobs_running", 0) == 0
    by = {j.result["by"] for j in index.get_jobs()}
    assert by == {"w0", "w1"}
    index.close()
