"""The receiver's PDU reader (ingest/dicom/association.py; issue 19): a data set fragment
is read together with the next PDU's and item's headers when they have arrived, and
every read takes those bytes first, so what the reader returns is the stream, byte for
byte, however the peer's bytes are cut into segments. The reader without look-ahead
(what a TLS socket gets) is the reference."""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from ingest.dicom.association import PduReader

P_DATA_TF, A_RELEASE_RQ = 0x04, 0x05


def _pdu(*items: tuple[int, int, bytes]) -> bytes:
    """A P-DATA-TF PDU (PS3.8 9.3.5) of (context id, control header, fragment) items."""
    body = b"".join(struct.pack(">IBB", len(f) + 2, cx, hdr) + f for cx, hdr, f in items)
    return struct.pack(">BBI", P_DATA_TF, 0, len(body)) + body


def _stream(rng: random.Random) -> tuple[bytes, list[tuple[int, bytes]]]:
    """A C-STORE's worth of PDUs, some with several items, then an A-RELEASE-RQ; and the
    items as the reader should return them."""
    items: list[tuple[int, bytes]] = []
    pdus = []
    command = rng.randbytes(170)
    pdus.append(_pdu((1, 0x03, command)))
    items.append((0x03, command))
    for _ in range(6):
        group = []
        for _ in range(rng.choice([1, 1, 2, 3])):
            fragment = rng.randbytes(rng.choice([1, 5, 6, 7, 12, 13, 4000, 131060]))
            group.append((1, 0x00, fragment))
            items.append((0x00, fragment))
        pdus.append(_pdu(*group))
    tiny = rng.randbytes(3)  # shorter than a header: the look-ahead spans items
    pdus.append(_pdu((1, 0x02, tiny)))
    items.append((0x02, tiny))
    pdus.append(struct.pack(">BBIBBBB", A_RELEASE_RQ, 0, 4, 0, 0, 0, 0))
    return b"".join(pdus), items


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def _send_in_pieces(sock: socket.socket, data: bytes, seed: int) -> None:
    rng = random.Random(seed)
    pos = 0
    while pos < len(data):
        n = rng.choice([1, 2, 6, 11, 12, 13, 100, 65536, 200000])
        sock.sendall(data[pos : pos + n])
        pos += n
        if rng.random() < 0.2:
            time.sleep(0.001)  # a segment boundary the reader has to wait at


def _read_all(reader: PduReader) -> tuple[list[tuple[int, bytes]], int]:
    got: list[tuple[int, bytes]] = []
    while True:
        pdu_type, length = reader.read_header()
        if pdu_type != P_DATA_TF:
            return got, pdu_type
        while length:
            size, _cx, header = reader.read_item(length)
            length -= 6 + size
            if header & 0x01:
                got.append((header, bytes(reader.read_body(size))))
            else:
                buf = bytearray(size)
                reader.recv_exactly(memoryview(buf))
                assert reader.buffered <= PduReader.LOOKAHEAD
                got.append((header, bytes(buf)))


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("look_ahead", [True, False])
def test_the_reader_returns_the_stream_however_it_is_cut(
    pair: tuple[socket.socket, socket.socket], seed: int, look_ahead: bool
) -> None:
    ours, peer = pair
    data, expected = _stream(random.Random(seed))
    reader = PduReader(ours, 0)
    reader._scatter = look_ahead  # as for a TLS socket when False
    sender = threading.Thread(target=_send_in_pieces, args=(peer, data, seed))
    sender.start()
    got, last = _read_all(reader)
    sender.join()
    assert last == A_RELEASE_RQ
    assert got == expected
    assert bytes(reader.read_body(4)) == bytes(4)  # the release's body (read ahead, maybe)
    assert reader.buffered == 0
    peer.close()
    assert ours.recv(1) == b""


def test_a_data_fragment_takes_the_next_headers_in_the_same_receive(
    pair: tuple[socket.socket, socket.socket]
) -> None:
    """When the next PDU has arrived, its header and its first item's header come with
    the fragment: the next two header reads make no system call."""
    ours, peer = pair
    fragment = bytes(range(256)) * 16
    peer.sendall(_pdu((1, 0x00, fragment)) + _pdu((1, 0x02, b"tail")))
    reader = PduReader(ours, 0)
    assert reader.read_header() == (P_DATA_TF, 6 + len(fragment))
    assert reader.read_item(6 + len(fragment)) == (len(fragment), 1, 0x00)
    buf = bytearray(len(fragment))
    reader.recv_exactly(memoryview(buf))
    assert bytes(buf) == fragment
    assert reader.buffered == PduReader.LOOKAHEAD
    peer.close()  # a read that reached the socket now would see the end
    assert reader.read_header() == (P_DATA_TF, 10)
    assert reader.read_item(10) == (4, 1, 0x02)
    assert reader.buffered == 0
    assert bytes(reader.read_body(4)) == b"tail"


def test_a_peer_closing_mid_fragment_is_an_error(
    pair: tuple[socket.socket, socket.socket]
) -> None:
    ours, peer = pair
    peer.sendall(b"x" * 100)
    peer.close()
    reader = PduReader(ours, 0)
    with pytest.raises(ConnectionError):
        reader.recv_exactly(memoryview(bytearray(200)))
