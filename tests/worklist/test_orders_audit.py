"""HL7 v2 orders by file drop and by MLLP append to the action log (issue 7 §2).

The order intake runs as ``pacslab serve`` starts it (``pacslab.background.start_orders``:
inbox thread and MLLP listener). The dropped files are the real captures of
``tests/data/orders/hl7`` (origins and licenses in ``tests/data/orders/SOURCES.md``);
the MLLP messages are ours. Every message gets one entry, applied or refused, and
the log holds no name or identifier and still verifies.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import pytest

from core.audit import ChainedEntry, patient_key
from core.settings import Settings
from pacslab.background import start_orders
from pacslab.wiring import build_index
from storage.audit import AuditStore, load_secret
from storage.index.orders import SqlOrderStore
from tests.support import free_port, wait_until
from tests.worklist.test_orders_hl7 import _Client, _new_order
from worklist.orders.hl7v2 import parse_message, placed_orders, split_batch
from worklist.orders.mllp import frame

HL7 = Path(__file__).resolve().parents[1] / "data" / "orders" / "hl7"
NEW = HL7 / "cdc_orm_o01_v251_order_linked.hl7"  # ORM^O01 NW: applied
CANCEL = HL7 / "cdc_epic_orm_o01_v23.hl7"  # ORM^O01 CA
MALFORMED = HL7 / "cdc_ca_oml_o21_v251_malformed_joined_segments.hl7"  # AE 100
ACK = HL7 / "cdc_natus_ack_v251.hl7"  # not an order: AR 200
FILES = (NEW, CANCEL, MALFORMED, ACK)


def _msh3(raw: bytes) -> str:
    fields = raw.split(b"\r", 1)[0].split(b"\n", 1)[0].split(b"|")
    return fields[2].split(b"^")[0].decode()


def _patient(raw: bytes) -> tuple[str, str]:
    (order,) = placed_orders(parse_message(split_batch(raw)[0]))
    return order.patient.id, order.patient.issuer


def _wait_filed(inbox: Path, names: list[str]) -> None:
    def filed() -> set[str]:
        return {p.name for sub in ("processed", "rejected") if (inbox / sub).is_dir()
                for p in (inbox / sub).iterdir()}

    wait_until(lambda: set(names) <= filed(), timeout=60,
               message=lambda: f"not filed: {set(names) - filed()}")


@pytest.mark.network
def test_dropped_and_mllp_orders_are_logged(settings: Settings) -> None:
    port = free_port()
    settings = settings.model_copy(update={"orders": settings.orders.model_copy(update={
        "mllp_port": port, "mllp_host": "127.0.0.1", "stable_s": 0.0, "rescan_s": 0.2,
        "station_by_modality": {"CT": "CT1"}})})
    build_index(settings, migrate=True).close()
    inbox = settings.orders_inbox
    inbox.mkdir(parents=True, exist_ok=True)
    stop = start_orders(settings)
    try:
        # Written as *.tmp and renamed, as senders must (the inbox reads at once).
        for src in FILES:
            shutil.copyfile(src, inbox / f"{src.name}.tmp")
            os.replace(inbox / f"{src.name}.tmp", inbox / src.name)
        (inbox / "empty.hl7.tmp").write_bytes(b"\r\n")  # no message at all
        os.replace(inbox / "empty.hl7.tmp", inbox / "empty.hl7")
        _wait_filed(inbox, [p.name for p in FILES] + ["empty.hl7"])
        def connected() -> socket.socket | None:
            try:
                return socket.create_connection(("127.0.0.1", port), timeout=10)
            except OSError:
                return None

        sock = wait_until(connected, timeout=30, message=f"nothing listens on {port}")
        assert sock is not None
        with sock:
            client = _Client(sock)
            oru = split_batch((HL7 / "cdc_oru_r01_v251_result_linked.hl7").read_bytes())[0]
            for message in (_new_order(placer="MLLP1"), oru,
                            _new_order(placer="NOPE", control="XO")):
                sock.sendall(frame(message))
                client.recv()
    finally:
        stop()  # closes the audit log: everything queued is written

    secret = load_secret(settings.audit.patient_key_file)  # type: ignore[arg-type]
    index = build_index(settings, migrate=False)
    try:
        store = AuditStore(index.engine)
        entries = [e for e in store.entries() if e.event_type == "hl7.order"]
        problems = store.verify()
        orders = SqlOrderStore(index)
        new_id = orders.find(placer="4560411583")
        mllp_id = orders.find(placer="MLLP1")
    finally:
        index.close()
    assert problems == []
    assert new_id is not None and mllp_id is not None

    by_file: dict[str, list[ChainedEntry]] = {}
    for e in entries:
        sha = json.loads(e.detail).get("file_sha256")
        if sha:
            by_file.setdefault(sha, []).append(e)
    got = {}
    for src in FILES:
        raw = src.read_bytes()
        (e,) = by_file[hashlib.sha256(raw).hexdigest()]
        assert (e.agent, e.agent_type, e.source) == (_msh3(raw), "system", "inbox/orders")
        got[src] = e
    assert (got[NEW].action, got[NEW].outcome, got[NEW].outcome_desc) == ("C", "0", "AA")
    assert got[NEW].resource == f"ServiceRequest/{new_id.id}"
    assert got[NEW].patient_key == patient_key(secret, *_patient(NEW.read_bytes()))
    assert got[CANCEL].action == "U"  # a cancel changes the order's status
    assert got[CANCEL].patient_key == patient_key(secret, *_patient(CANCEL.read_bytes()))
    assert (got[MALFORMED].outcome, got[MALFORMED].outcome_desc) == ("4", "AE 100")
    assert (got[ACK].outcome, got[ACK].outcome_desc) == ("4", "AR 200")
    assert got[MALFORMED].patient_key == got[ACK].patient_key == ""  # never parsed that far
    (empty,) = [e for e in entries if e.resource.startswith("HL7File/")]
    assert (empty.outcome, empty.outcome_desc) == ("4", "rejected: no HL7 message")
    # Each file has its correlation id.
    assert len({e.correlation_id for e in got.values()}) == len(FILES)

    mllp = [e for e in entries if e.source.startswith("127.0.0.1:")]
    assert [(e.agent, e.action, e.outcome, e.outcome_desc) for e in mllp] == [
        ("HIS", "C", "0", "AA"), ("Sender Application", "C", "4", "AR 200"),
        ("HIS", "U", "4", "AE 204")]
    assert mllp[0].resource == f"ServiceRequest/{mllp_id.id}"
    assert mllp[0].patient_key == patient_key(secret, "PID42", "HOSP")
    assert len({e.correlation_id for e in mllp}) == 1  # one connection
    assert mllp[0].correlation_id not in ("", "-")

    hashes = ("prev_hash", "hash", "patient_key", "resource", "correlation_id", "detail")
    text = json.dumps([{k: v for k, v in e.as_dict().items() if k not in hashes}
                       | {"detail": json.loads(e.detail) | {"file_sha256": ""}}
                       for e in entries], ensure_ascii=False)
    for plain in ("PID42", "NGUYỄN", "1300974", "TESTCASE", "E7082628", "19800102"):
        assert plain not in text, plain
