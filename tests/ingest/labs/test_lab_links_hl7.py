"""HL7 LAW over MLLP (issue 18.2): results in with ACKs, OML^O33 orders out.

The analyzer side is played by python-hl7's ``mllp_send`` (results, and it prints
the ACKs it gets) and by an MLLP listener of ours standing in for the analyzer's
order receiver; the order download it receives is read with python-hl7's parser,
not ours.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from core.settings import AnalyzerSettings, Settings
from pacslab.labs import build_analyzer_links
from pacslab.wiring import build_index
from services.analyzers import REGISTRY
from storage.index.lab import SqlLabStore
from storage.lab import LabResultQuery, StoredLabResult
from tests.ingest.labs.test_lab_links import lab_order
from tests.support import free_port

#: Real peers over loopback sockets (the astm package, python-hl7's mllp_send).
pytestmark = pytest.mark.network

REAL_ORU = Path(__file__).resolve().parents[2] / "data" / "lab" / "hl7"
OUL_R22 = (
    "MSH|^~\\&|COBAS-VN|KHOA XN|pacslab|LIS|20260301090000+0700||OUL^R22^OUL_R22|OUL-0001|P|2.5.1"
    "|||NE|AL||UNICODE UTF-8|||LAB-29^IHE\r"
    "PID|1||BN-0009^^^^PI||Phạm^Thị Hồng||19800101|F\r"
    "SPM|1|S-HL7-1||SER\r"
    "OBR|1|S-HL7-1-1||2823-3^Kali^LN\r"
    "ORC|SC|S-HL7-1-1\r"
    "OBX|1|NM|2823-3^Kali^LN||6,9|mmol/L|3,5-5,1|HH|||F|||20260301085500\r"
    "OBX|2|NM|2951-2^Natri^LN||139|mmol/L|135-145|N|||F|||20260301085500\r"
)


def _mllp_send() -> str:
    found = shutil.which("mllp_send") or str(Path(sys.executable).parent / "mllp_send")
    if not Path(found).exists():
        pytest.skip("python-hl7's mllp_send is not installed (pip install hl7)")
    return found


def _send(port: int, messages: list[bytes], tmp_path: Path) -> list[dict[str, list[str]]]:
    path = tmp_path / "batch.hl7"
    path.write_bytes(b"\r\n".join(m.rstrip(b"\r") + b"\r" for m in messages))
    proc = subprocess.run(
        [_mllp_send(), "--loose", "-f", str(path), "-p", str(port), "127.0.0.1"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    acks = [a for a in proc.stdout.split(b"\n") if a.strip()]
    out = []
    for ack in acks:
        text = ack.strip(b"\x0b\x1c\r\n").decode()
        out.append({s[:3]: s.split("|") for s in text.replace("\n", "\r").split("\r") if s})
    return out


class AnalyzerListener:
    """The analyzer's MLLP order receiver: keeps each message, answers ``code``."""

    def __init__(self, code: str = "AA") -> None:
        self.code = code
        self.port = free_port()
        self.received: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", self.port))
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                buf = b""
                while b"\x1c\r" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
                message = buf[buf.find(b"\x0b") + 1 : buf.find(b"\x1c\r")]
                self.received.append(message)
                control = message.split(b"\r", 1)[0].split(b"|")[9]
                ack = b"MSH|^~\\&|ANALYZER||pacslab||20260301||ORL^O34^ORL_O34|A1|P|2.5.1\r"
                ack += b"MSA|" + self.code.encode() + b"|" + control + b"\r"
                conn.sendall(b"\x0b" + ack + b"\x1c\r")

    def close(self) -> None:
        self.sock.close()


def _rig(settings: Settings, **analyzer: Any) -> Generator[tuple[Settings, Any], None, None]:
    section = AnalyzerSettings(
        **{
            "name": "cobas",
            "protocol": "hl7-mllp",
            "port": free_port(),
            "reply_timeout_s": 2.0,
            **analyzer,
        }
    )
    settings = settings.model_copy(update={"analyzers": [section]})
    build_index(settings, migrate=True).close()
    shells, release = build_analyzer_links(settings)
    for shell in shells:
        shell.start()
    try:
        yield settings, shells[0]
    finally:
        for shell in shells:
            shell.stop()
        release()


@pytest.fixture
def listener() -> Iterator[AnalyzerListener]:
    one = AnalyzerListener()
    yield one
    one.close()


@pytest.fixture
def rig(settings: Settings, listener: AnalyzerListener) -> Iterator[tuple[Settings, Any]]:
    yield from _rig(settings, order_port=listener.port)


def _results(settings: Settings) -> list[StoredLabResult]:
    index = build_index(settings, migrate=False)
    try:
        return SqlLabStore(index).search_results(LabResultQuery(qc=None, limit=100))[0]
    finally:
        index.close()


def test_results_in_over_mllp_send_are_stored_then_acked(
    rig: tuple[Settings, Any], tmp_path: Path
) -> None:
    settings, shell = rig
    real = (REAL_ORU / "cdc_oru_r01_v251_result_linked.hl7").read_bytes()
    order = (REAL_ORU / "hl7apy_oml_o33_v25_multi_specimen.hl7").read_bytes()
    acks = _send(shell.address[1], [OUL_R22.encode("utf-8"), real, order], tmp_path)
    assert [a["MSA"][1] for a in acks] == ["AA", "AA", "AR"]
    assert acks[0]["MSA"][2] == "OUL-0001"
    assert acks[0]["MSH"][8] == "ACK^R22^ACK"
    results = _results(settings)
    kali = next(r for r in results if r.specimen_id == "S-HL7-1" and r.test_code == "2823-3")
    assert (kali.value, kali.is_critical, kali.patient_name) == (6.9, True, "Phạm^Thị Hồng")
    assert len(results) > 2  # the OUL^R22's two OBX and the real ORU^R01's
    status = REGISTRY.get("cobas")
    assert status is not None and status.rejected == 1 and status.results_stored == len(results)
    # The same message again (the analyzer missed our ACK): AA, stored once.
    again = _send(shell.address[1], [OUL_R22.encode("utf-8")], tmp_path)
    assert again[0]["MSA"][1] == "AA"
    assert len(_results(settings)) == len(results)


def test_storage_failure_answers_ae(
    rig: tuple[Settings, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise OSError("disk full")

    monkeypatch.setattr(SqlLabStore, "ingest_file", broken)
    _, shell = rig
    acks = _send(shell.address[1], [OUL_R22.encode("utf-8")], tmp_path)
    assert acks[0]["MSA"][1] == "AE"


def test_order_download_oml_o33_read_by_python_hl7(
    rig: tuple[Settings, Any], listener: AnalyzerListener
) -> None:
    import hl7

    settings, _ = rig
    with TestClient(create_app(settings)) as client:
        assert client.post("/fhir/ServiceRequest", json=lab_order("S-OML-1")).status_code == 201
        r = client.post("/admin/analyzers/cobas/orders", json={"specimen_id": "S-OML-1"})
        assert r.status_code == 202, r.text
    (raw,) = listener.received
    message = hl7.parse(raw.decode("utf-8"))
    assert str(message.segment("MSH")[9]) == "OML^O33^OML_O33"
    assert str(message.segment("MSH")[18]) == "UNICODE UTF-8"
    assert str(message.segment("PID")[5]) == "TRẦN^THỊ^LAN"  # family^given^middle
    assert str(message.segment("SPM")[2]) == "S-OML-1"
    assert str(message.segment("OBR")[4]).startswith("2823-3^")
    status = REGISTRY.get("cobas")
    assert status is not None and status.messages_sent == 1


def test_order_download_refused_by_the_analyzer_is_an_error(
    settings: Settings,
) -> None:
    refusing = AnalyzerListener(code="AR")
    rigs = _rig(settings, order_port=refusing.port)
    settings, _ = next(rigs)
    try:
        with TestClient(create_app(settings)) as client:
            assert client.post("/fhir/ServiceRequest", json=lab_order("S-OML-2")).status_code == 201
            r = client.post("/admin/analyzers/cobas/orders", json={"specimen_id": "S-OML-2"})
            assert r.status_code == 507
            assert r.headers["content-type"] == "application/problem+json"
    finally:
        rigs.close()
        refusing.close()


def test_law_work_order_query_answered_with_the_fhir_order(
    rig: tuple[Settings, Any], tmp_path: Path
) -> None:
    settings, shell = rig
    with TestClient(create_app(settings)) as client:
        assert client.post("/fhir/ServiceRequest", json=lab_order("S-QBP-1")).status_code == 201

    def qbp(specimen: str, control: str) -> bytes:
        return (
            f"MSH|^~\\&|COBAS-VN|KHOA XN|pacslab|LIS|20260301090000||QBP^Q11^QBP_Q11|{control}|P"
            "|2.5.1|||NE|AL||UNICODE UTF-8|||LAB-27^IHE\r"
            f"QPD|WOS^Work Order Step^IHE_LABTF|Q-{control}|{specimen}\r"
            "RCP|I||R\r"
        ).encode()

    found, missing = _send(shell.address[1], [qbp("S-QBP-1", "Q1"), qbp("S-NONE", "Q2")], tmp_path)
    assert (found["MSH"][8], found["MSA"][1], found["MSA"][2]) == ("RSP^K11^RSP_K11", "AA", "Q1")
    assert found["QAK"][1:3] == ["Q-Q1", "OK"]
    assert found["SPM"][2] == "S-QBP-1"
    assert found["OBR"][4].startswith("2823-3^")
    assert missing["QAK"][1:3] == ["Q-Q2", "NF"]
    assert "OBR" not in missing
