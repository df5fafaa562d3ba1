"""HL7 v2 orders: real files, intake with ACKs, MLLP loopback, the order inbox.

Files are copies of ../shared/data/lab/hl7 in ``tests/data/orders/hl7`` (their
SOURCES.md rows beside them; unmodified): ``cdc_epic_orm_o01_v23.hl7`` (ORM^O01
v2.3 with ORC-1 CA), ``cdc_orm_o01_v251_order_linked.hl7`` (ORM^O01 v2.5.1, NW);
the OML/ORU/ACK files are not imaging orders and are refused, as is the OML with
segments run together.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
from collections.abc import Iterator
from datetime import date, datetime
from pathlib import Path

import pytest

from core.errors import OrderMessageError
from core.orders import OrderAction, OrderStatus, SpsStatus
from core.settings import IndexSettings, OrdersSettings
from services.orders import OrderService
from storage.index.orders import SqlOrderStore
from storage.index.sql import SqlIndex
from tests.support import wait_until
from worklist.orders.hl7v2 import build_ack, parse_message, placed_orders, split_batch
from worklist.orders.intake import Hl7OrderIntake
from worklist.orders.mllp import START, Deframer, MllpServer, frame
from worklist.orders.watcher import OrderInbox

HL7 = Path(__file__).resolve().parents[1] / "data" / "orders" / "hl7"
EPIC_CANCEL = HL7 / "cdc_epic_orm_o01_v23.hl7"
CDC_NEW = HL7 / "cdc_orm_o01_v251_order_linked.hl7"
MALFORMED = HL7 / "cdc_ca_oml_o21_v251_malformed_joined_segments.hl7"
NOW = datetime(2026, 11, 25, 8, 0, 0)


def _new_order(
    placer: str = "PL100", control: str = "NW", modality: str = "CT", name: str = "NGUYỄN^VĂN AN"
) -> bytes:
    """An IHE-style ORM^O01 v2.5.1 (UTF-8, MSH-18) for a CT at 09:30."""
    family, given = name.split("^")
    segments = [
        "MSH|^~\\&|HIS|HOSP|PACSLAB|RAD|20261125080000||ORM^O01^ORM_O01|MSG"
        f"{placer}{control}|P|2.5.1||||||UNICODE UTF-8",
        f"PID|1||PID42^^^HOSP^MR||{family}^{given}||19800102|M",
        "PV1|1|O|RAD^01^A|||||0042^REFERRER^ROBERT|||||||||||V123",
        f"ORC|{control}|{placer}^HIS||||||||||0099^ORDERER^OLGA",
        "|".join(
            ["OBR", "1", f"{placer}^HIS", "", "CTCHEST^CT chest with contrast^99LOCAL"]
            + [""] * 8  # OBR-5 … OBR-12
            + ["IODINE"]  # OBR-13
            + [""] * 10  # OBR-14 … OBR-23
            + [modality, "", "", "^^^20261125093000^^S"]  # OBR-24, OBR-27
        ),
        "NTE|1||Patient claustrophobic",
    ]
    return ("\r".join(segments) + "\r").encode("utf-8")


@pytest.fixture
def service(tmp_path: Path) -> Iterator[OrderService]:
    index = SqlIndex(IndexSettings(url=f"sqlite:///{tmp_path}/index.db"))
    yield OrderService(SqlOrderStore(index), OrdersSettings(station_by_modality={"CT": "CT1"}))
    index.close()


@pytest.fixture
def intake(service: OrderService) -> Hl7OrderIntake:
    return Hl7OrderIntake(service, clock=lambda: NOW)


def _segments(ack: bytes) -> dict[str, list[str]]:
    return {s[:3]: s.split("|") for s in ack.decode().split("\r") if s}


# ------------------------------------------------------------------------ parsing


def test_epic_v23_cancel_is_parsed_with_its_values() -> None:
    (raw,) = split_batch(EPIC_CANCEL.read_bytes())  # LF separators in the file
    msg = parse_message(raw)
    assert msg.type == ("ORM", "O01") and msg.version == "2.3" and msg.control_id == "550162"
    (order,) = placed_orders(msg)
    assert order.action is OrderAction.CANCEL
    assert order.placer_order_number == "968906415"
    assert order.patient.id == "E7082628"
    assert order.patient.name == "LAST NAME^FIRST NAME^MIDDLEJ"
    assert order.patient.birth_date is None  # PID-7 is the placeholder "DOB"
    assert order.patient.sex == ""  # PID-8 "SEX" is not in HL7 Table 0001
    code = order.order.requested_procedure_code
    assert code is not None
    assert (code.value, code.scheme) == ("140285", "L")
    assert code.meaning == "MICROALBUMIN / CREATININE RATIO URINE"
    assert order.order.requesting_physician == "DALE^ROBIN^B."  # ORC-12 XCN reordered to PN
    assert order.order.priority == "ROUTINE"  # ORC-7.6
    (step,) = order.steps
    assert step.start == datetime(2023, 6, 27, 12, 2, 7)  # OBR-27.4
    assert step.step_id == "968906412"  # OBR-20 filler field 1


def test_cdc_v251_new_order_is_parsed_with_its_values() -> None:
    (raw,) = split_batch(CDC_NEW.read_bytes())
    (order,) = placed_orders(parse_message(raw))
    assert order.action is OrderAction.NEW
    assert order.placer_order_number == "4560411583"
    assert (order.patient.id, order.patient.issuer) == ("1300974", "Baptist East")
    assert order.patient.name == "ONE^TESTCASE"
    assert order.patient.birth_date == date(2024, 2, 21)
    assert order.patient.sex == "F"
    code = order.order.requested_procedure_code
    assert code is not None and (code.value, code.scheme) == ("54089-8", "LN")
    assert order.steps[0].start == datetime(2024, 2, 22, 18, 54)  # OBR-7 (no TQ given)


def test_ihe_style_order_maps_every_field() -> None:
    (order,) = placed_orders(parse_message(_new_order()))
    assert order.patient.name == "NGUYỄN^VĂN AN"  # MSH-18 UNICODE UTF-8
    assert (order.patient.id, order.patient.issuer) == ("PID42", "HOSP")
    assert order.order.referring_physician == "REFERRER^ROBERT"
    assert order.order.requesting_physician == "ORDERER^OLGA"
    assert order.order.admission_id == "V123"
    assert order.order.priority == "STAT"
    (step,) = order.steps
    assert (step.modality, step.start) == ("CT", datetime(2026, 11, 25, 9, 30))
    assert step.contrast_agent == "IODINE"
    assert step.comments == "Patient claustrophobic"


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("cdc_epic_oru_r01_v23_nte_dualcoding.hl7", "ORU^R01 is not an imaging order"),
        ("cdc_oracle_oru_r01_v23_refrange_flags.hl7", "ORU^R01 is not an imaging order"),
        ("cdc_oru_r01_v251_result_linked.hl7", "ORU^R01 is not an imaging order"),
        ("cdc_oru_r01_v251_utf8_micro_lf.hl7", "ORU^R01 is not an imaging order"),
        ("cdc_natus_ack_v251.hl7", "ACK is not an imaging order"),
        ("hl7apy_oml_o33_v25_multi_specimen.hl7", "OML^O33 is not an imaging order"),
        ("hapi_oml_o21_oul_r22_multi_v251.hl7", "OML^O21 is not an imaging order"),
        ("cepheid_genexpert_oru_r32_v25_subcomponents.hl7", "ORU^R32 is not an imaging order"),
        ("python_hl7_oru_r01_v24_sn_value.hl7", "ORU^R01 is not an imaging order"),
    ],
)
def test_other_messages_are_refused_by_type(name: str, reason: str) -> None:
    raw = split_batch((HL7 / name).read_bytes())[0]
    with pytest.raises(OrderMessageError) as info:
        parse_message(raw)
    assert info.value.ack_code == "AR" and info.value.hl7_code == 200
    assert info.value.reason.startswith(reason)
    assert info.value.where == "MSH^1^9"


def test_joined_segments_are_refused_with_the_line() -> None:
    with pytest.raises(OrderMessageError) as info:
        parse_message(MALFORMED.read_bytes())
    exc = info.value
    assert exc.hl7_code == 100 and exc.ack_code == "AE"
    assert exc.reason == (
        "segments run together: OBX inside OBR on line 6 (missing segment terminator)"
    )


def test_batch_of_thirteen_messages_is_split() -> None:
    messages = split_batch((HL7 / "hapi_oml_o21_oul_r22_multi_v251.hl7").read_bytes())
    assert len(messages) == 13
    assert all(m.startswith(b"MSH|") for m in messages)


def test_ack_has_msh_msa_and_err() -> None:
    raw = _new_order()
    msg = parse_message(raw)
    err = OrderMessageError("no order PL9", where="ORC^1^2", hl7_code=204)
    seg = _segments(build_ack(msg, "AE", error=err, now=NOW, ack_control_id="ACK1"))
    assert seg["MSH"][2:6] == ["PACSLAB", "RAD", "HIS", "HOSP"]  # sender and receiver swapped
    assert seg["MSH"][8:12] == ["ACK^O01^ACK", "ACK1", "P", "2.5.1"]
    assert seg["MSA"] == ["MSA", "AE", "MSGPL100NW"]
    assert seg["ERR"][2] == "ORC^1^2"
    assert seg["ERR"][3] == "204^Unknown key identifier^HL70357"
    assert seg["ERR"][4] == "E" and seg["ERR"][8] == "no order PL9"


# ------------------------------------------------------------------------- intake


def test_new_change_cancel_through_intake(intake: Hl7OrderIntake, service: OrderService) -> None:
    result = intake.handle(_new_order())
    assert result.code == "AA", result.error
    (rec,) = result.orders
    assert rec.accession_number == "A00000001"
    assert rec.study_instance_uid.startswith("2.25.") or rec.study_instance_uid
    assert rec.item.steps[0].station_ae_title == "CT1"  # from orders.station_by_modality
    assert rec.item.steps[0].step_id == "SPS1.1"
    assert _segments(result.ack)["MSA"][1:3] == ["AA", "MSGPL100NW"]

    again = intake.handle(_new_order())  # resent after a lost ACK: same order
    assert again.code == "AA" and again.orders[0].id == rec.id

    changed = intake.handle(_new_order(control="XO", modality="MR"))
    assert changed.code == "AA"
    after = service.get(rec.id)
    assert after.version == 2 and after.item.steps[0].modality == "MR"
    assert after.accession_number == rec.accession_number  # identifiers kept
    assert after.study_instance_uid == rec.study_instance_uid

    cancel = intake.handle(_new_order(control="CA"))
    assert cancel.code == "AA"
    final = service.get(rec.id)
    assert final.status is OrderStatus.CANCELLED
    assert final.item.steps[0].status is SpsStatus.DISCONTINUED
    assert [v.event for v in service.history(rec.id)] == ["placed", "changed", "cancelled"]


def test_conflicts_are_application_errors(intake: Hl7OrderIntake, service: OrderService) -> None:
    unknown = intake.handle(_new_order(placer="NOPE", control="XO"))
    assert unknown.code == "AE" and unknown.error is not None
    assert unknown.error.hl7_code == 204
    assert intake.handle(_new_order()).code == "AA"
    other = intake.handle(_new_order(name="OTHER^PERSON"))  # same placer, other patient
    assert other.code == "AE" and other.error is not None and other.error.hl7_code == 205
    rec = service.search()[0]
    service.step_status(
        accession=rec.accession_number, procedure_id="", step_id="", status=SpsStatus.STARTED
    )
    late_cancel = intake.handle(_new_order(control="CA"))
    assert late_cancel.code == "AE"
    assert "in-progress" in _segments(late_cancel.ack)["ERR"][8]


def test_epic_cancel_of_unknown_order_is_kept(
    intake: Hl7OrderIntake, service: OrderService
) -> None:
    (raw,) = split_batch(EPIC_CANCEL.read_bytes())
    result = intake.handle(raw)
    assert result.code == "AA"
    (rec,) = result.orders
    assert rec.status is OrderStatus.CANCELLED and rec.placer_order_number == "968906415"
    # A late NW for the cancelled placer number must not reach the worklist.
    late = raw.replace(b"ORC|CA|", b"ORC|NW|")
    assert intake.handle(late).code == "AE"


def test_garbage_gets_an_ar(intake: Hl7OrderIntake) -> None:
    result = intake.handle(b"hello")
    assert result.code == "AR"
    assert _segments(result.ack)["MSA"][1] == "AR"


# --------------------------------------------------------------------------- MLLP


def test_deframer_handles_split_and_joined_frames() -> None:
    d = Deframer()
    data = b"junk" + frame(b"one") + frame(b"two")[:4]
    assert list(d.feed(data)) == [b"one"]
    assert list(d.feed(frame(b"two")[4:])) == [b"two"]


class _Client:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.deframer = Deframer()
        self.pending: list[bytes] = []

    def recv(self) -> bytes:
        while not self.pending:
            chunk = self.sock.recv(65536)
            assert chunk, "connection closed before the ACK"
            assert chunk.startswith(START) or self.deframer._buf
            self.pending.extend(self.deframer.feed(chunk))
        return self.pending.pop(0)


@pytest.mark.network
def test_mllp_loopback_ack_and_nak(intake: Hl7OrderIntake) -> None:
    server = MllpServer(intake, "127.0.0.1", 0).start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            client = _Client(sock)
            sock.sendall(frame(_new_order()))
            ack = _segments(client.recv())
            assert ack["MSA"][1:3] == ["AA", "MSGPL100NW"]
            oru = split_batch((HL7 / "cdc_oru_r01_v251_result_linked.hl7").read_bytes())[0]
            # Two frames in one send: both answered, in order.
            sock.sendall(frame(oru) + frame(_new_order(placer="NOPE", control="XO")))
            nak = _segments(client.recv())
            assert nak["MSA"][1:3] == ["AR", "002"]
            assert nak["ERR"][3].startswith("200^")
            ae = _segments(client.recv())
            assert ae["MSA"][1] == "AE" and ae["ERR"][3].startswith("204^")
    finally:
        server.stop()


# -------------------------------------------------------------------------- inbox


def test_inbox_processes_orders_and_rejects_the_rest(
    tmp_path: Path, intake: Hl7OrderIntake, service: OrderService
) -> None:
    inbox = tmp_path / "inbox" / "orders"
    inbox.mkdir(parents=True)
    for src in (CDC_NEW, EPIC_CANCEL, MALFORMED, HL7 / "cdc_natus_ack_v251.hl7"):
        shutil.copy(src, inbox / src.name)
    (inbox / "incoming.hl7.tmp").write_bytes(_new_order())  # still being written
    watcher = OrderInbox(inbox, intake, stable_s=0)
    moved = watcher.scan()
    assert len(moved) == 4
    processed = sorted(p.name for p in (inbox / "processed").iterdir())
    assert processed == sorted([CDC_NEW.name, EPIC_CANCEL.name])
    rejected = inbox / "rejected"
    report = json.loads((rejected / f"{MALFORMED.name}.error.json").read_text())
    assert report["reason"].startswith("segments run together: OBX inside OBR on line 6")
    assert report["messages"][0]["hl7_error_code"] == 100
    ack_report = json.loads((rejected / "cdc_natus_ack_v251.hl7.error.json").read_text())
    assert ack_report["messages"][0]["ack"] == "AR"
    assert (rejected / MALFORMED.name).read_bytes() == MALFORMED.read_bytes()  # kept as is
    assert (inbox / "incoming.hl7.tmp").exists()
    placed = service.store.find(placer="4560411583")
    assert placed is not None and placed.status is OrderStatus.SCHEDULED
    assert placed.item.patient.name == "ONE^TESTCASE"


def test_inbox_waits_for_a_stable_file(tmp_path: Path, intake: Hl7OrderIntake) -> None:
    inbox = tmp_path / "orders"
    inbox.mkdir()
    clock = [time.time()]
    watcher = OrderInbox(inbox, intake, stable_s=1.0, clock=lambda: clock[0])
    (inbox / "a.hl7").write_bytes(_new_order()[:40])  # half written
    assert watcher.scan() == []
    (inbox / "a.hl7").write_bytes(_new_order())
    clock[0] = time.time() + 2
    assert watcher.scan() == []  # changed since the last look
    clock[0] += 2
    assert [p.parent.name for p in watcher.scan()] == ["processed"]


@pytest.mark.network
def test_inbox_thread_picks_up_a_renamed_file(
    tmp_path: Path, intake: Hl7OrderIntake, service: OrderService
) -> None:
    inbox = tmp_path / "orders"
    watcher = OrderInbox(inbox, intake, stable_s=0.2, rescan_s=0.3).start()
    try:
        (inbox / "x.hl7.tmp").write_bytes(_new_order(placer="PL7"))
        (inbox / "x.hl7.tmp").rename(inbox / "x.hl7")
        wait_until((inbox / "processed" / "x.hl7").exists, timeout=10)
        assert (inbox / "processed" / "x.hl7").exists()
        assert service.store.find(placer="PL7") is not None
    finally:
        watcher.stop()
