"""Several receivers, one archive (issue #8 §4).

Two ``pacslab dicom`` processes (each with its forked receiver children) listen on
different ports and share one PostgreSQL index and one originals directory. The same
study is sent to both at once by four DCMTK ``storescu`` processes. Every C-STORE is
answered with success, and the archive holds each instance exactly once: one index
row of version 1, one processing job, one original.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import dcmread

from core.settings import IndexSettings
from core.synthetic import write_ct_series
from storage.index.sql import SqlIndex
from tests.support import dcmtk, free_port, run_dcmtk, wait_until

pytestmark = [pytest.mark.network, pytest.mark.postgres]


def start_receiver(env: dict[str, str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "pacslab", "dicom"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    port = env["PACSLAB_DICOM__PORT"]
    def answers() -> bool:
        if run_dcmtk(["echoscu", "127.0.0.1", port], nodelay=True).returncode == 0:
            return True
        assert proc.poll() is None, "pacslab dicom did not start (it exited)"
        return False

    try:
        wait_until(answers, timeout=30, interval=0.1, message="pacslab dicom did not start")
    except AssertionError:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc


def receiver_env(data_dir: Path, index_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSLAB_")}
    env.update(PACSLAB_DATA_DIR=str(data_dir), PACSLAB_INDEX__URL=index_url,
               PACSLAB_DICOM__HOST="127.0.0.1", PACSLAB_DICOM__PORT=str(free_port()),
               PACSLAB_DICOM__WORKERS="2", PACSLAB_LOG__LEVEL="WARNING")
    return env


def test_same_study_to_two_receivers_at_once(tmp_path: Path, pg_url: str) -> None:
    study = "1.2.826.0.1.3680043.8.498.77.9.1"
    axial = write_ct_series(tmp_path / "study" / "axial", slices=50, rows=64, columns=64,
                            study_instance_uid=study)
    scout = write_ct_series(tmp_path / "study" / "thin", slices=30, rows=48, columns=48,
                            study_instance_uid=study)
    files = axial + scout
    uids = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}

    data = tmp_path / "data"
    envs = [receiver_env(data, pg_url) for _ in range(2)]
    procs = [start_receiver(env) for env in envs]
    try:
        senders = [
            subprocess.Popen([dcmtk("storescu"), "+sd", "+r", "-aet", f"CT{n}", "127.0.0.1",
                              env["PACSLAB_DICOM__PORT"], str(tmp_path / "study")],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "TCP_NODELAY": "1"})
            for n, env in enumerate([*envs, *envs])
        ]
        for sender in senders:
            out, _ = sender.communicate(timeout=180)
            # storescu exits non-zero if any C-STORE was not a success
            assert sender.returncode == 0, out[-3000:]
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    index = SqlIndex(IndexSettings(url=pg_url, migrate=False))
    counts = index.counts()
    assert counts["instances"] == len(files) == len(uids), counts
    assert (counts["patients"], counts["studies"], counts["series"]) == (1, 1, 2)
    assert counts["jobs_pending"] == len(files), "one processing job per instance"
    for uid in uids:
        versions = index.instance_versions(uid)
        assert [v.version for v in versions] == [1], uid
    originals = [p for p in (data / "originals").rglob("*.dcm") if ".staging" not in p.parts]
    assert len(originals) == len(files)
    leftovers = [p for p in (data / "originals" / ".staging").rglob("*") if p.is_file()]
    assert leftovers == []
    index.close()
