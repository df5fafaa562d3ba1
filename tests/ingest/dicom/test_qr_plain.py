"""Q/R on the plain-socket path (issue 16): C-CANCEL of C-FIND, C-MOVE and C-GET,
hostile identifiers, awkward move destinations. pynetdicom is the peer where DCMTK's
tools cannot do it (cancel mid-way, a destination accepting only Implicit VR LE)."""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.dsutils import encode
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    MRImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from core.settings import QueryRetrieveSettings, RemoteAE, Settings
from ingest.dicom._retrieve import p_data_tf
from ingest.dicom.association import FastAssociation, PduReader
from ingest.dicom.dimse import C_FIND_RSP, decode_command
from ingest.dicom.storescu import StorageScu
from tests.ingest.dicom.qr_data import Study, fill
from tests.support import Receiver, free_port, wait_until

pytestmark = pytest.mark.network

DEST_AE = "DEST"


@pytest.fixture
def dest_port() -> int:
    return free_port()


@pytest.fixture
def settings(settings: Settings, dest_port: int) -> Settings:
    qr = QueryRetrieveSettings(
        destinations={DEST_AE: RemoteAE(host="127.0.0.1", port=dest_port)},
        max_identifier_bytes=4096,
    )
    return settings.model_copy(update={"qr": qr})


@pytest.fixture
def archive(receiver: Receiver) -> list[Study]:
    return fill(receiver.port)


class _Destination:
    """A pynetdicom Storage SCP keeping what it receives (decoded)."""

    def __init__(self, port: int, *, ae_title: str = DEST_AE, syntaxes: list[str] | None = None
                 ) -> None:
        self.received: dict[str, Dataset] = {}
        self.syntaxes: set[str] = set()
        ae = AE(ae_title=ae_title)
        ae.require_called_aet = True  # a Move Destination AE title it is not: A-ASSOCIATE-RJ
        for sop in (CTImageStorage, MRImageStorage):
            ae.add_supported_context(sop, syntaxes or [ImplicitVRLittleEndian])
        server = ae.start_server(("127.0.0.1", port), block=False,
                                 evt_handlers=[(evt.EVT_C_STORE, self._store)])
        assert server is not None
        self.server = server

    def _store(self, event: Any) -> int:
        ds = event.dataset
        self.syntaxes.add(str(event.context.transfer_syntax))
        self.received[str(ds.SOPInstanceUID)] = ds
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def implicit_only(dest_port: int) -> Iterator[_Destination]:
    dest = _Destination(dest_port)
    yield dest
    dest.stop()


def _associate(port: int, sop: str) -> Any:
    ae = AE(ae_title="QRTEST")
    ae.add_requested_context(sop)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSLAB")
    assert assoc.is_established
    return assoc


def _slow_second_check(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """The SCP's second look for a C-CANCEL waits for the test's go: the cancel is
    then on the wire before the operation goes on (no race on the loopback)."""
    go = threading.Event()
    original = FastAssociation.cancelled
    calls = {"n": 0}

    def cancelled(self: FastAssociation, message_id: int) -> bool:
        calls["n"] += 1
        if calls["n"] == 2:
            go.wait(10)
        return original(self, message_id)

    monkeypatch.setattr(FastAssociation, "cancelled", cancelled)
    return go


def test_c_cancel_of_a_find_midway(archive: list[Study], receiver: Receiver,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    go = _slow_second_check(monkeypatch)
    assoc = _associate(receiver.port, StudyRootQueryRetrieveInformationModelFind)
    try:
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = ""
        statuses = []
        for status, _ds in assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind,
                                             msg_id=7):
            statuses.append(int(status.Status))
            if len(statuses) == 1:
                assoc.send_c_cancel(7, None, StudyRootQueryRetrieveInformationModelFind)
                threading.Timer(0.5, go.set).start()
        assert statuses == [0xFF00, 0xFE00]  # 4 studies match; cancelled after one
        # The association goes on: the next query is answered in full.
        go.set()
        q.PatientID = "QR002"
        got = [int(s.Status) for s, _ in assoc.send_c_find(
            q, StudyRootQueryRetrieveInformationModelFind)]
        assert got == [0xFF00, 0x0000]
    finally:
        assoc.release()


def test_c_cancel_of_a_move_midway(archive: list[Study], receiver: Receiver,
                                   implicit_only: _Destination,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    go = _slow_second_check(monkeypatch)
    study = archive[0]  # 5 instances
    assoc = _associate(receiver.port, StudyRootQueryRetrieveInformationModelMove)
    try:
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = study.study_uid
        out = []
        for status, _ds in assoc.send_c_move(q, DEST_AE,
                                             StudyRootQueryRetrieveInformationModelMove,
                                             msg_id=9):
            out.append(status)
            if len(out) == 1:
                assoc.send_c_cancel(9, None, StudyRootQueryRetrieveInformationModelMove)
                threading.Timer(0.5, go.set).start()
        assert [int(s.Status) for s in out] == [0xFF00, 0xFE00]
        final = out[-1]
        assert int(final.NumberOfRemainingSuboperations) == 4
        assert int(final.NumberOfCompletedSuboperations) == 1
    finally:
        assoc.release()
    assert len(implicit_only.received) == 1


def _raw_find(port: int, identifier: bytes) -> int:
    """A C-FIND-RQ whose identifier is ``identifier`` as given: the final Status."""
    scu = StorageScu.associate(
        "127.0.0.1", port, calling_ae="QRTEST", called_ae="PACSLAB",
        contexts=[build_context(StudyRootQueryRetrieveInformationModelFind,
                                [ImplicitVRLittleEndian])],
        max_pdu=65536, connect_timeout_s=5, acse_timeout_s=5, dimse_timeout_s=5,
    )
    try:
        (cx_id,) = scu.accepted
        cmd = Dataset()
        cmd.AffectedSOPClassUID = StudyRootQueryRetrieveInformationModelFind
        cmd.CommandField = 0x0020
        cmd.MessageID = 1
        cmd.Priority = 0
        cmd.CommandDataSetType = 1
        raw = encode(cmd, True, True)
        assert raw is not None
        scu.sock.sendall(b"".join([*p_data_tf(raw, cx_id, 16384, command=True),
                                   *p_data_tf(identifier, cx_id, 16384, command=False)]))
        reader = PduReader(scu.sock, 65536)
        while True:
            try:
                pdu_type, length = reader.read_header()
            except ConnectionError:
                # Closed with our unread bytes in its buffer, the kernel may reset the
                # connection before the A-ABORT is read.
                return -1
            if pdu_type != 0x04:
                return -pdu_type  # A-ABORT etc.
            body = bytes(reader.read_body(length))
            _len, _cx, header = struct.unpack(">IBB", body[:6])
            if not header & 0x01:
                continue  # a pending response's identifier
            rsp = decode_command(body[6:])  # the whole command set in one PDV
            assert rsp.command_field == C_FIND_RSP
            if rsp.status not in (0xFF00, 0xFF01):
                return int(rsp.status or 0)
    finally:
        scu.close()


def test_hostile_identifiers(archive: list[Study], receiver: Receiver) -> None:
    # Broken (an element claiming 2 GiB, a tag without its length): a failure status
    # (pydicom reads the first one short, which the query parser refuses).
    assert _raw_find(receiver.port, struct.pack("<HHI", 0x0010, 0x0010, 0x7FFFFFFF)) in (
        0xA900, 0xC310)
    assert _raw_find(receiver.port, b"\x10\x00\x20\x00\x08") in (0xA900, 0xC310)
    # Past qr.max_identifier_bytes (4 KiB here): A-ABORT, nothing buffered.
    big = struct.pack("<HHI", 0x0008, 0x1030, 8000) + b"x" * 8000
    assert _raw_find(receiver.port, big) in (-0x07, -1)
    # The receiver still answers.
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.PatientID = "QR002"
    assoc = _associate(receiver.port, StudyRootQueryRetrieveInformationModelFind)
    try:
        got = [int(s.Status) for s, _ in assoc.send_c_find(
            q, StudyRootQueryRetrieveInformationModelFind)]
    finally:
        assoc.release()
    assert got == [0xFF00, 0x0000]


def _move(port: int, study_uid: str) -> list[Dataset]:
    assoc = _associate(port, StudyRootQueryRetrieveInformationModelMove)
    try:
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = study_uid
        return [s for s, _ in assoc.send_c_move(q, DEST_AE,
                                                 StudyRootQueryRetrieveInformationModelMove)]
    finally:
        assoc.release()


def test_destination_rejecting_the_association(archive: list[Study], receiver: Receiver,
                                               dest_port: int) -> None:
    dest = _Destination(dest_port, ae_title="SOMEONE")  # called AE DEST: rejected
    try:
        assert [int(s.Status) for s in _move(receiver.port, archive[0].study_uid)] == [0xA801]
    finally:
        dest.stop()
    assert dest.received == {}


def test_implicit_only_destination_gets_the_decoded_instances(
    archive: list[Study], receiver: Receiver, implicit_only: _Destination
) -> None:
    study = archive[0]  # stored Explicit VR Little Endian
    statuses = _move(receiver.port, study.study_uid)
    assert int(statuses[-1].Status) == 0x0000
    assert int(statuses[-1].NumberOfCompletedSuboperations) == 5
    assert set(implicit_only.received) == {u for series in study.sop_uids for u in series}
    assert implicit_only.syntaxes == {ImplicitVRLittleEndian}
    store = receiver.service.archive.originals  # type: ignore[attr-defined]
    for uid, ds in implicit_only.received.items():
        inst = receiver.index.get_instance(uid)  # type: ignore[attr-defined]
        with store.open(inst.blob_key) as fp:
            original = dcmread(fp)
        assert np.array_equal(ds.pixel_array, original.pixel_array)
        assert str(ds.PatientName) == str(original.PatientName)


def _get_association(port: int, on_store: Any) -> Any:
    """A C-GET SCU taking the SCP role for the archive's CT and MR (PS3.7 D.3.3.4)."""
    ae = AE(ae_title="NATWS")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(MRImageStorage)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate(
        "127.0.0.1", port, ae_title="PACSLAB",
        ext_neg=[build_role(MRImageStorage, scp_role=True),
                 build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    return assoc


def test_c_cancel_of_a_get_midway(archive: list[Study], receiver: Receiver,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    go = _slow_second_check(monkeypatch)
    study = archive[0]  # 5 instances
    got: list[str] = []

    def on_store(event: Any) -> int:
        got.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    assoc = _get_association(receiver.port, on_store)
    try:
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = study.study_uid
        out = []
        for status, _ds in assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet,
                                            msg_id=11):
            out.append(status)
            if len(out) == 1:
                assoc.send_c_cancel(11, None, StudyRootQueryRetrieveInformationModelGet)
                threading.Timer(0.5, go.set).start()
        assert [int(s.Status) for s in out] == [0xFF00, 0xFE00]
        assert int(out[-1].NumberOfRemainingSuboperations) == 4
    finally:
        assoc.release()
    assert len(got) == 1


def test_a_release_request_in_the_middle_of_a_c_get_aborts(
    archive: list[Study], receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    """PS3.7 D.3.3.1: no A-RELEASE-RQ while a response is due. A requestor that sends
    one instead of its C-STORE-RSP gets A-ABORT; the receiver goes on serving."""
    study = archive[0]
    stores: list[str] = []

    def on_store(event: Any) -> int:
        stores.append(str(event.dataset.SOPInstanceUID))
        if len(stores) == 1:  # A-RELEASE-RQ (PS3.8 9.3.6) ahead of the C-STORE-RSP
            event.assoc.dul.socket.send(struct.pack(">BBII", 0x05, 0, 4, 0))
        return 0x0000

    assoc = _get_association(receiver.port, on_store)
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = study.study_uid
    statuses = [int(s.Status) for s, _ in
                assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet) if s]
    # The A-ABORT may not reach pynetdicom: our C-STORE-RSP, unread when the receiver
    # closed, can make the kernel reset the connection first. Either way it is over.
    wait_until(lambda: not assoc.is_established, timeout=10,
               message=f"association still up after {statuses}")
    assert 0x0000 not in statuses and len(stores) == 1
    assert any("PDU type 0x05 while an operation runs" in r.getMessage()
               for r in caplog.records if r.name == "ingest.dicom.association")

    echo = AE(ae_title="QRTEST")
    echo.add_requested_context("1.2.840.10008.1.1")
    again = echo.associate("127.0.0.1", receiver.port, ae_title="PACSLAB")
    assert again.is_established
    try:
        assert int(again.send_c_echo().Status) == 0x0000
    finally:
        again.release()
