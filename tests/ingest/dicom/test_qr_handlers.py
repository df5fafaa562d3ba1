"""The Q/R handlers' protocol with pynetdicom, on fake events (no network)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from pydicom.dataset import Dataset

from core.settings import RemoteAE
from ingest.dicom.qr import RetrieveGate, handle_get, handle_move
from services.query_retrieve import RetrieveItem

MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
GET = "1.2.840.10008.5.1.4.1.2.2.3"


class FakeService:
    def __init__(self, n: int) -> None:
        self.items = [RetrieveItem(f"1.2.{i}", "1.2.840.10008.5.1.4.1.1.2",
                                   "1.2.840.10008.1.2.1", f"k{i}", "1.9", "P") for i in range(n)]
        self.recorded: list[tuple[str, str, int]] = []

    def plan_retrieve(self, identifier: Dataset, model: str) -> list[RetrieveItem]:
        return self.items

    def encoded(self, item: RetrieveItem) -> None:
        return None  # every sub-operation takes the decoded path

    def load(self, item: RetrieveItem) -> Dataset:
        ds = Dataset()
        ds.SOPInstanceUID = item.sop_instance_uid
        return ds

    def record_retrieve(self, kind: str, *, calling_ae: str, address: str, destination: str,
                        items: list[RetrieveItem]) -> None:
        self.recorded.append((kind, destination, len(items)))


def _event(sop_class: str, destination: str = "WS1") -> Any:
    requestor = SimpleNamespace(ae_title="SCU", address="127.0.0.1")
    return SimpleNamespace(
        assoc=SimpleNamespace(requestor=requestor),
        request=SimpleNamespace(AffectedSOPClassUID=sop_class),
        move_destination=destination, identifier=Dataset(), is_cancelled=False,
    )


def test_move_beyond_the_cap_is_refused_with_a702_and_the_slot_comes_back() -> None:
    gate = RetrieveGate(1)
    service = FakeService(2)
    lookup = {"WS1": RemoteAE(host="127.0.0.1", port=104)}.get
    first = handle_move(_event(MOVE), service, lookup, gate)  # type: ignore[arg-type]
    assert next(first)[:2] == ("127.0.0.1", 104)
    assert next(first) == 2
    # A second move while the first holds the only slot.
    second = list(handle_move(_event(MOVE), service, lookup, gate))  # type: ignore[arg-type]
    assert second[1] == 1 and second[2][0].Status == 0xA702
    # The first finishes: two pending sub-operations, recorded in the action log.
    assert [status for status, _ in first] == [0xFF00, 0xFF00]
    assert service.recorded == [("move", "WS1", 2)]
    third = handle_move(_event(MOVE), service, lookup, gate)  # type: ignore[arg-type]
    next(third)
    assert next(third) == 2


def test_unknown_destination_and_get_cap() -> None:
    gate = RetrieveGate(1)
    service = FakeService(1)
    assert list(handle_move(_event(MOVE, "NOBODY"), service, {}.get, gate)) == [  # type: ignore[arg-type]
        (None, None)
    ]
    held = handle_get(_event(GET), service, gate)  # type: ignore[arg-type]
    assert next(held) == 1
    refused = list(handle_get(_event(GET), service, gate))  # type: ignore[arg-type]
    assert refused[0] == 1 and refused[1][0].Status == 0xA702
    held.close()  # generator closed (association aborted): the slot is released
    assert next(handle_get(_event(GET), service, gate)) == 1  # type: ignore[arg-type]


class FakeFind:
    def __init__(self, event: Any, n: int) -> None:
        self.event = event
        self.n = n

    def parse_find(self, identifier: Dataset, model: str) -> Any:
        return SimpleNamespace(unsupported=(), level="study")

    def find(self, request: Any) -> Any:
        for i in range(self.n):
            ds = Dataset()
            ds.PatientID = f"P{i}"
            yield ds
            self.event.is_cancelled = i >= 0  # a C-CANCEL arrives after the first match


def test_find_stops_at_c_cancel_with_fe00() -> None:
    from ingest.dicom.qr import handle_find

    event = _event("1.2.840.10008.5.1.4.1.2.2.1")
    out = list(handle_find(event, FakeFind(event, 3)))  # type: ignore[arg-type]
    assert [s for s, _ in out] == [0xFF00, 0xFE00]


def test_other_find_classes_go_to_the_fallback() -> None:
    from ingest.dicom.qr import handle_find

    event = _event("1.2.840.10008.5.1.4.31")  # Modality Worklist
    out = list(handle_find(event, FakeFind(event, 3),  # type: ignore[arg-type]
                           lambda e: iter([(0xFF00, Dataset())])))
    assert [s for s, _ in out] == [0xFF00]


@pytest.mark.parametrize(("size", "max_pdu"), [(0, 16384), (10, 16384), (40_000, 16384),
                                               (16378, 16384), (5000, 0)])
def test_pdus_written_at_once_are_pynetdicoms(size: int, max_pdu: int) -> None:
    """The C-STORE request written in one send carries the PDUs pynetdicom would send."""
    from io import BytesIO

    from pydicom.uid import UID
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode
    from pynetdicom.pdu import P_DATA_TF

    from ingest.dicom._retrieve import p_data_tf

    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    req = C_STORE()
    req.MessageID, req.Priority = 7, 2
    req.AffectedSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.2")
    req.AffectedSOPInstanceUID = UID("1.2.3.4")
    req.DataSet = BytesIO(data)
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    theirs = b"".join(P_DATA_TF(p).encode() for p in msg.encode_msg(3, max_pdu))
    command = encode(msg.command_set, True, True)
    assert command is not None
    ours = b"".join([*p_data_tf(command, 3, max_pdu, command=True),
                     *p_data_tf(data, 3, max_pdu, command=False)])
    assert ours == theirs
