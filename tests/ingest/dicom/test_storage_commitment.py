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
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from core.settings import QueryRetrieveSettings, RemoteAE, Settings
from tests.ingest.dicom.qr_data import CT, MR, Study, build, store
from tests.support import Receiver, free_port

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
    inst = receiver.index.get_instance(corrupt)  # type: ignore[attr-defined]
    path = receiver.service.archive.originals.path(inst.blob_key)  # type: ignore[attr-defined]
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # one byte of Pixel Data rots on disk
    path.chmod(0o644)
    path.write_bytes(bytes(raw))
    return {"good": good, "corrupt": corrupt, "other": other}


def commit(receiver: Receiver, mode: str, scu_port: int, spec: dict[str, object]
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


def test_pure_parse_refuses_missing_transaction() -> None:
    from core.errors import InvalidDatasetError
    from services.commitment import parse_request

    with pytest.raises(InvalidDatasetError):
        parse_request(Dataset())
