"""Live ASTM E1381 analyzer links against real peers (issue 18).

Peers: the PyPI ``astm`` implementation (as ``astm-2025``, see the fixture), the
real captures of ``/work/shared/data/lab/astm`` (copied to ``tests/data/lab``)
replayed frame by frame by a simulated analyzer over TCP and over a ``socat``
pseudo-terminal pair, and a host query for a specimen ordered through FHIR.
Timers are shortened to fractions of a second so every test is bounded.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tty
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from core.settings import AnalyzerSettings, Settings
from ingest.labs.parsers import astm as astm_parser
from pacslab.labs import build_analyzer_links
from pacslab.wiring import build_index
from services.analyzers import REGISTRY, LinkStatus
from storage.index.lab import SqlLabStore
from storage.lab import LabResultQuery, StoredLabResult
from tests.ingest.labs._sim_analyzer import (
    ACK,
    NAK,
    Pipe,
    messages_of,
    receive_session,
    send_session,
)
from tests.support import free_port, wait_until

#: Real peers over loopback sockets (the astm package, python-hl7's mllp_send).
pytestmark = pytest.mark.network

CAPTURES = Path(__file__).resolve().parents[2] / "data" / "lab" / "astm"
ASTM_CAPTURES = (
    "immucor_galileo_result.astm",
    "biorad_ihcom_bloodtype_two_patients.astm",
    "abbott_architect_multi_message.astm",
)
FAST = {"reply_timeout_s": 1.0, "frame_timeout_s": 0.6, "busy_wait_s": 0.3, "reconnect_s": 0.2}
K_MESSAGE = [
    b"H|\\^&|||XN-VN\r",
    b"P|1||BN-0001\r",
    b"O|1|S-VN-1||^^^K|R\r",
    b"R|1|^^^K|7,85|mmol/L|3,5-5,1|H||F\r",
    b"L|1|N\r",
]


@dataclass
class LinkRig:
    settings: Settings
    shells: list[Any]
    store: SqlLabStore

    @property
    def status(self) -> LinkStatus:
        status = REGISTRY.get(self.settings.analyzers[0].name)
        assert status is not None
        return status

    def port(self) -> int:
        return int(self.shells[0].address[1])

    def results(self) -> list[StoredLabResult]:
        return self.store.search_results(LabResultQuery(qc=None, limit=1000))[0]

    def connect(self) -> Pipe:
        return Pipe(sock=socket.create_connection(("127.0.0.1", self.port()), timeout=5))


def _rig(settings: Settings, **analyzer: Any) -> Generator[LinkRig, None, None]:
    section = AnalyzerSettings(**{"name": "xn", "port": free_port(), **FAST, **analyzer})
    settings = settings.model_copy(update={"analyzers": [section]})
    build_index(settings, migrate=True).close()
    shells, release = build_analyzer_links(settings)
    for shell in shells:
        shell.start()
    index = build_index(settings, migrate=False)
    try:
        yield LinkRig(settings, shells, SqlLabStore(index))
    finally:
        for shell in shells:
            shell.stop()
        release()
        index.close()


@pytest.fixture
def rig(settings: Settings) -> Iterator[LinkRig]:
    yield from _rig(settings, test_codes={"K": "2823-3"})


# -- the PyPI astm package as the peer ---------------------------------------------------


@pytest.fixture
def astm_peer() -> Any:
    """The ``astm`` package (E1381/E1394 client and server by A. Shorin).

    PyPI ``astm`` 0.5.0 does not install on Python 3.11 (its setup.py imports
    ``collections.Iterable``); ``astm-2025`` is the same code re-uploaded for
    Python 3, but its asyncore fork still calls the Python 2 builtin ``buffer``
    when it writes, and its codec recurses forever on ``str`` fields. We give it
    the one-line ``buffer`` it expects and ``bytes`` fields; its protocol logic
    (ENQ, framing, checksums, ACK/NAK handling, EOT) runs unchanged.
    """
    asynclib = pytest.importorskip("astm.asynclib")
    asynclib.buffer = lambda data, offset, size: bytes(data[offset : offset + size])
    return asynclib


def test_astm_package_as_analyzer_sends_results(rig: LinkRig, astm_peer: Any) -> None:
    from astm.client import Client

    def emitter() -> Iterator[list[Any]]:
        yield [b"H", b"\\^&", None, None, b"XN-350"]
        yield [b"P", b"1", None, b"BN-1"]
        yield [b"O", b"1", b"S-1", None, [None, None, None, b"K"]]
        yield [b"R", b"1", [None, None, None, b"K"], b"7,85", b"mmol/L", None, b"HH", None, b"F"]
        yield [b"R", b"2", [None, None, None, b"NA"], b"139", b"mmol/L", None, None, None, b"F"]
        yield [b"L", b"1", b"N"]

    Client(emitter, "127.0.0.1", rig.port(), timeout=5, flow_map=None)
    astm_peer.loop(0.05, count=100)
    wait_until(lambda: len(rig.results()) == 2, timeout=5)
    by_code = {r.test_code: r for r in rig.results()}
    assert (by_code["K"].value, by_code["K"].loinc, by_code["K"].is_critical) == (
        7.85,
        "2823-3",
        True,
    )
    assert by_code["NA"].value == 139
    assert rig.status.messages_received == 1 and rig.status.results_stored == 2


def test_astm_package_as_server_receives_an_order_download(
    settings: Settings, astm_peer: Any
) -> None:
    from astm.server import BaseRecordsDispatcher, Server

    got: list[list[Any]] = []

    class Collect(BaseRecordsDispatcher):  # type: ignore[misc]
        def _default_handler(self, record: list[Any]) -> None:
            got.append(record)

    server = Server("127.0.0.1", 0, dispatcher=Collect, timeout=5)
    port = server.socket.getsockname()[1]
    client = TestClient(create_app(settings))
    rigs = _rig(settings, link="tcp-client", port=port, test_codes={"K": "2823-3"})
    rig = next(rigs)
    try:
        with client:
            assert client.post("/fhir/ServiceRequest", json=lab_order("S-DL-1")).status_code == 201
        assert REGISTRY.download("xn", "S-DL-1") is True
        assert REGISTRY.download("xn", "S-NOTHING") is False
        def ended() -> bool:
            if any(r[0] == "L" for r in got):
                return True
            astm_peer.loop(0.05, count=1)
            return False

        wait_until(ended, timeout=5, interval=0, message=lambda: f"order download: {got}")
        kinds = [r[0] for r in got]
        assert kinds == ["H", "P", "O", "L"]
        order = got[2]
        assert order[2] == "S-DL-1"
        assert order[4] == [None, None, None, "K"]
        wait_until(lambda: rig.status.messages_sent == 1, timeout=5)
    finally:
        rigs.close()
        server.close()


# -- real captures replayed by a simulated analyzer ---------------------------------------------


def test_real_captures_replayed_over_tcp(rig: LinkRig) -> None:
    expected = 0
    for name in ASTM_CAPTURES:
        raw = (CAPTURES / name).read_bytes()
        expected += len(astm_parser.parse(raw).observations)
        pipe = rig.connect()
        try:
            transcript = send_session(pipe, messages_of(raw), reply_s=2)
        finally:
            pipe.close()
        assert set(transcript.replies) == {ACK}
        assert transcript.acked_messages == len(messages_of(raw))
    wait_until(lambda: len(rig.results()) == expected, timeout=5)
    assert rig.status.errors == 0


def test_nak_on_bad_checksum_then_resent_frame_stored_once(rig: LinkRig) -> None:
    pipe = rig.connect()
    try:
        transcript = send_session(pipe, [K_MESSAGE], reply_s=2, corrupt={1, 4})
    finally:
        pipe.close()
    assert transcript.replies.count(NAK) == 2
    assert transcript.acked_messages == 1
    wait_until(lambda: len(rig.results()) == 1, timeout=5)
    assert rig.results()[0].value == 7.85


def test_receiver_timeout_discards_partial_message_then_link_recovers(rig: LinkRig) -> None:
    pipe = rig.connect()
    try:
        pipe.write(b"\x05")
        assert pipe.read_byte(2) == ACK
        pipe.write(b"\x021H|\\^&\r\x03")  # a frame cut off before its checksum
        wait_until(lambda: "receiver timeout" in rig.status.last_error, timeout=5)
        transcript = send_session(pipe, [K_MESSAGE], reply_s=2)
    finally:
        pipe.close()
    assert transcript.acked_messages == 1
    wait_until(lambda: len(rig.results()) == 1, timeout=5)


def test_storage_failure_is_nak_and_the_repeat_is_stored_once(
    rig: LinkRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = SqlLabStore.ingest_file
    calls = {"n": 0}

    def flaky(self: SqlLabStore, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("disk full")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SqlLabStore, "ingest_file", flaky)
    pipe = rig.connect()
    try:
        transcript = send_session(pipe, [K_MESSAGE], reply_s=2)
    finally:
        pipe.close()
    # The L frame was refused once (not stored), then acknowledged when stored.
    assert transcript.replies[-2:] == [NAK, ACK]
    assert len(rig.results()) == 1
    assert "message not stored" in rig.status.last_error


def test_unparseable_message_is_kept_and_acknowledged(rig: LinkRig) -> None:
    pipe = rig.connect()
    try:
        transcript = send_session(pipe, [[b"H|\r", b"L|1\r"]], reply_s=2)
    finally:
        pipe.close()
    assert transcript.acked_messages == 1
    rejected = rig.settings.data_dir / "links" / "xn" / "rejected"
    wait_until(lambda: len(list(rejected.glob("*.error.json"))) == 1, timeout=5)
    assert rig.status.rejected == 1


def test_pacslab_as_client_of_an_analyzer_that_listens(settings: Settings) -> None:
    """link: tcp-client: the analyzer is the TCP server (many Sysmex/Mindray setups)."""
    server = socket.create_server(("127.0.0.1", free_port()))
    server.settimeout(10)
    rigs = _rig(settings, link="tcp-client", port=server.getsockname()[1])
    rig = next(rigs)
    try:
        conn, _ = server.accept()
        pipe = Pipe(sock=conn)
        try:
            raw = (CAPTURES / ASTM_CAPTURES[0]).read_bytes()
            transcript = send_session(pipe, messages_of(raw), reply_s=2)
            assert transcript.acked_messages == len(messages_of(raw))
        finally:
            pipe.close()
        expected_results = len(astm_parser.parse(raw).observations)
        wait_until(lambda: len(rig.results()) == expected_results, timeout=5)
        # The analyzer went away: pacslab reconnects on its own.
        conn2, _ = server.accept()
        conn2.close()
    finally:
        rigs.close()
        server.close()


# -- host query ---------------------------------------------------------------------------


def lab_order(placer: str, loinc: str = "2823-3") -> dict[str, Any]:
    return {
        "resourceType": "ServiceRequest",
        "contained": [
            {
                "resourceType": "Patient",
                "id": "p",
                "identifier": [{"system": "urn:oid:1.2.3.4", "value": "BN-77"}],
                "name": [{"family": "TRẦN", "given": ["THỊ", "LAN"]}],
                "gender": "female",
                "birthDate": "1975-05-06",
            }
        ],
        "identifier": [
            {
                "type": {
                    "coding": [
                        {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "PLAC"}
                    ]
                },
                "value": placer,
            }
        ],
        "status": "active",
        "intent": "order",
        "priority": "stat",
        "code": {"coding": [{"system": "http://loinc.org", "code": loinc, "display": "Kali"}]},
        "subject": {"reference": "#p"},
    }


def test_host_query_answered_with_the_fhir_order(rig: LinkRig) -> None:
    with TestClient(create_app(rig.settings)) as client:
        r = client.post("/fhir/ServiceRequest", json=lab_order("S-HQ-7"))
        assert r.status_code == 201, r.text
    query = [
        [
            b"H|\\^&|||XN-VN\r",
            b"Q|1|^S-HQ-7||^^^ALL||||||||O\r",
            b"Q|2|^S-UNKNOWN||^^^ALL||||||||O\r",
            b"L|1|N\r",
        ]
    ]
    pipe = rig.connect()
    try:
        assert send_session(pipe, query, reply_s=2).acked_messages == 1
        texts = receive_session(pipe, wait_s=5)
    finally:
        pipe.close()
    records = [t.decode("latin-1").rstrip("\r") for t in texts]
    assert [r[0] for r in records] == ["H", "P", "O", "L"]
    order = records[2].split("|")
    assert (order[2], order[4], order[5], order[25]) == ("S-HQ-7", "^^^K", "S", "O")
    assert records[1].split("|")[3] == "BN-77"
    assert records[3] == "L|1|N"
    assert rig.status.messages_sent == 1


def test_host_query_without_orders_says_no_information(rig: LinkRig) -> None:
    pipe = rig.connect()
    try:
        send_session(pipe, [[b"H|\\^&\r", b"Q|1|^S-NONE||^^^ALL\r", b"L|1|N\r"]], reply_s=2)
        texts = receive_session(pipe, wait_s=5, nak_first=1)  # and one NAK: resent
    finally:
        pipe.close()
    assert [t[:1] for t in texts] == [b"H", b"L"]
    assert texts[-1] == b"L|1|I\r"


def test_lis_gives_up_after_six_retransmissions(rig: LinkRig) -> None:
    pipe = rig.connect()
    try:
        send_session(pipe, [[b"H|\\^&\r", b"Q|1|^S-NONE||^^^ALL\r", b"L|1|N\r"]], reply_s=2)
        assert pipe.read_byte(3) == 0x05
        pipe.write(bytes((ACK,)))
        frames = 0
        while True:
            byte = pipe.read_byte(3)
            assert byte is not None
            if byte == 0x04:
                break
            if byte == 0x02:
                assert pipe.read_frame(2) is not None
                frames += 1
                pipe.write(bytes((NAK,)))
    finally:
        pipe.close()
    assert frames == 7  # the first transmission and six retransmissions (§6.5.1.2)
    wait_until(lambda: "refused" in rig.status.last_error, timeout=5)


# -- serial, over a socat pseudo-terminal pair ------------------------------------------------


@pytest.fixture
def pty_pair(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    socat = shutil.which("socat")
    if socat is None:
        pytest.skip("socat is not installed")
    a, b = tmp_path / "ttyLIS", tmp_path / "ttyANALYZER"
    proc = subprocess.Popen(
        [socat, f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: a.exists() and b.exists(), timeout=5)
        yield a, b
    finally:
        proc.terminate()
        proc.wait(timeout=5)


def test_real_capture_over_serial_pty(settings: Settings, pty_pair: tuple[Path, Path]) -> None:
    lis, analyzer = pty_pair
    rigs = _rig(settings, link="serial", device=str(lis), port=0)
    rig = next(rigs)
    fd = os.open(analyzer, os.O_RDWR | os.O_NOCTTY)
    tty.setraw(fd)
    pipe = Pipe(fd=fd)
    try:
        wait_until(lambda: rig.status.connected, timeout=5)
        # Timeout path first: a frame cut off, then silence past the 0.6 s frame timer.
        pipe.write(b"\x05")
        assert pipe.read_byte(2) == ACK
        pipe.write(b"\x021H|\\^&\r")
        wait_until(lambda: "receiver timeout" in rig.status.last_error, timeout=5)
        raw = (CAPTURES / ASTM_CAPTURES[2]).read_bytes()
        transcript = send_session(pipe, messages_of(raw), reply_s=2, corrupt={3})
        assert transcript.acked_messages == len(messages_of(raw))
        assert transcript.replies.count(NAK) == 1
        expected = len(astm_parser.parse(raw).observations)
        wait_until(lambda: len(rig.results()) == expected, timeout=5)
    finally:
        pipe.close()
        rigs.close()


# -- configuration and state in the API and /metrics ------------------------------------------


def test_api_and_metrics_show_the_link_state(rig: LinkRig) -> None:
    with TestClient(create_app(rig.settings)) as client:
        before = client.get("/admin/analyzers").json()["analyzers"]
        assert [(a["name"], a["config"]["link"], a["status"]["connected"]) for a in before] == [
            ("xn", "tcp-server", False)
        ]
        pipe = rig.connect()
        try:
            send_session(pipe, [K_MESSAGE], reply_s=2)
            wait_until(lambda: rig.status.results_stored == 1, timeout=5)
            one = client.get("/admin/analyzers/xn").json()
            assert one["status"]["connected"] is True
            assert one["status"]["last_message_at"] is not None
            assert one["config"]["test_codes"] == {"K": "2823-3"}
            text = client.get("/metrics").text
            assert 'pacslab_analyzer_connected{analyzer="xn"} 1' in text
            assert 'pacslab_analyzer_results_stored_total{analyzer="xn"} 1' in text
            assert 'pacslab_analyzer_messages_received_total{analyzer="xn"} 1' in text
        finally:
            pipe.close()
        assert client.get("/admin/analyzers/nope").status_code == 404
        r = client.post("/admin/analyzers/xn/orders", json={"specimen_id": "S-NONE"})
        assert r.status_code == 404
        assert client.post("/admin/analyzers/xn/orders", json={}).status_code in (400, 422)


# -- hostile or broken peers ----------------------------------------------------------------


def test_a_new_connection_takes_over_from_a_silent_one(rig: LinkRig) -> None:
    silent = rig.connect()
    try:
        wait_until(lambda: rig.status.connected, timeout=5)
        pipe = rig.connect()
        try:
            assert send_session(pipe, [K_MESSAGE], reply_s=2).acked_messages == 1
        finally:
            pipe.close()
        with pytest.raises(ConnectionError):
            silent.read_byte(2)  # the old connection was closed
    finally:
        silent.close()
    wait_until(lambda: len(rig.results()) == 1, timeout=5)


def test_idle_connection_is_closed(settings: Settings) -> None:
    rigs = _rig(settings, idle_timeout_s=0.3)
    rig = next(rigs)
    try:
        pipe = rig.connect()
        try:
            with pytest.raises(ConnectionError):
                pipe.read_byte(5)
        finally:
            pipe.close()
    finally:
        rigs.close()


def test_source_not_allowed_is_refused(settings: Settings) -> None:
    rigs = _rig(settings, allowed_sources=["10.0.0.0/8"])
    rig = next(rigs)
    try:
        pipe = rig.connect()
        try:
            pipe.write(b"\x05")
            with pytest.raises(ConnectionError):
                pipe.read_byte(5)
        finally:
            pipe.close()
        wait_until(lambda: "not allowed" in rig.status.last_error, timeout=5)
        with pytest.raises(ValueError, match="not an IP"):
            AnalyzerSettings(name="x", allowed_sources=["nope"])
    finally:
        rigs.close()


def test_link_results_are_in_the_action_log(rig: LinkRig) -> None:
    pipe = rig.connect()
    try:
        send_session(pipe, [K_MESSAGE], reply_s=2)
    finally:
        pipe.close()
    wait_until(lambda: len(rig.results()) == 1, timeout=5)
    rig.shells[0].stop()  # stops the link; the audit queue is written at release
    from storage.audit import AuditLog

    log = AuditLog(rig.store.index.engine, rig.settings.audit, url=rig.store.index.url)
    try:
        wait_until(lambda: any(e.event_type == "lab.link" for e in log.entries()), timeout=5)
        (entry,) = [e for e in log.entries() if e.event_type == "lab.link"]
        assert (entry.agent, entry.source, entry.outcome) == ("xn", "link/xn", "0")
        assert entry.patient_key  # keyed, never the patient ID itself
        assert "BN-0001" not in str(entry)
    finally:
        log.close()


@pytest.mark.parametrize("encoding", ["tcvn3", "cp1258", "utf-8"])
def test_vietnamese_names_in_and_out_in_the_analyzer_character_set(
    settings: Settings, encoding: str
) -> None:
    from core.charsets import decode_text, encode_text

    rigs = _rig(settings, encoding=encoding, test_codes={"K": "2823-3"})
    rig = next(rigs)
    try:
        with TestClient(create_app(rig.settings)) as client:
            assert client.post("/fhir/ServiceRequest", json=lab_order("S-VN-9")).status_code == 201
        results = [
            b"H|\\^&|||XN-VN\r",
            encode_text("P|1||BN-9||Đỗ^Thị Hương\r", encoding),
            b"O|1|S-VN-8||^^^K|R\r",
            b"R|1|^^^K|4,2|mmol/L||N||F\r",
            b"L|1|N\r",
        ]
        query = [b"H|\\^&\r", b"Q|1|^S-VN-9||^^^ALL\r", b"L|1|N\r"]
        pipe = rig.connect()
        try:
            assert send_session(pipe, [results, query], reply_s=2).acked_messages == 2
            texts = receive_session(pipe, wait_s=5)
        finally:
            pipe.close()
        wait_until(lambda: len(rig.results()) == 1, timeout=5)
        assert rig.results()[0].patient_name == "Đỗ^Thị Hương"
        patient = decode_text(texts[1], encoding).split("|")[5]
        # VN3 writes upper-case toned letters with the lower-case code (its fonts
        # have an upper-case face); the others keep the case.
        assert (patient.upper() if encoding == "tcvn3" else patient) == "TRẦN^THỊ^LAN"
    finally:
        rigs.close()


def test_link_results_take_the_hospitals_patient_issuer(settings: Settings) -> None:
    """A result that arrives over a live link names its patient with the same default
    issuer as one dropped in the inbox (``lab.patient_issuer``): one patient is one
    Patient whichever way the result came (issue 13)."""
    lab = settings.lab.model_copy(update={"patient_issuer": "BVTINH"})
    raw = (CAPTURES / "biorad_ihcom_bloodtype_two_patients.astm").read_bytes()
    expected = len(astm_parser.parse(raw).observations)
    for rig in _rig(settings.model_copy(update={"lab": lab})):
        pipe = rig.connect()
        try:
            send_session(pipe, messages_of(raw), reply_s=2)
        finally:
            pipe.close()
        wait_until(lambda rig=rig: len(rig.results()) == expected, timeout=5)
        results = rig.results()
        assert {r.patient_issuer for r in results} == {"BVTINH"}
        # One Patient row per (Patient ID, issuer): as many rows as patient IDs.
        assert None not in {r.patient_pk for r in results}
        assert len({r.patient_pk for r in results}) == len({r.patient_id for r in results})
