"""PDU fuzzer and malformed data sets against the SCP (issue #8 §5, hypothesis).

Raw bytes on a socket to the in-process receiver: random PDUs, mutated
A-ASSOCIATE-RQs, and after a valid association random P-DATA-TF with truncated PDV
items, wrong context ids and huge lengths. Whatever arrives, the service answers only
with well-formed PDUs of the kinds PS3.8 allows there (A-ASSOCIATE-AC/RJ, P-DATA-TF,
A-RELEASE-RP, A-ABORT) or closes the connection, and a following C-ECHO (DCMTK
``echoscu``) still succeeds. Malformed data sets sent in a real C-STORE are refused
with an error status (0xC000 / 0xA900 / 0x0122…), never stored with success unless
they are readable.
"""

from __future__ import annotations

import socket
import struct
import time
from collections import Counter
from itertools import groupby
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.synthetic import write_ct_series
from tests.support import Receiver, run_dcmtk

from .conftest import report

pytestmark = pytest.mark.network

_ALLOWED_REPLIES = {0x02, 0x03, 0x04, 0x06, 0x07}
OUTCOMES: Counter[str] = Counter()


def _associate_rq(called: str = "PACSLAB") -> bytes:
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.presentation import build_context

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "FUZZER"
    primitive.called_ae_title = called
    cxs = [build_context("1.2.840.10008.1.1"), build_context("1.2.840.10008.5.1.4.1.1.2")]
    for n, cx in enumerate(cxs):
        cx.context_id = 2 * n + 1
    primitive.presentation_context_definition_list = cxs
    max_len = MaximumLengthNotification()
    max_len.maximum_length_received = 16384
    primitive.user_information = [max_len]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


VALID_RQ = _associate_rq()


def _exchange(port: int, payload: bytes, *, timeout: float = 3.0) -> bytes:
    """Send ``payload``, half-close, and read what comes back until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            OUTCOMES["closed while we sent"] += 1
            return b""
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                OUTCOMES["no close within timeout"] += 1
                break
            except ConnectionResetError:
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)


def _check_replies(reply: bytes) -> None:
    """Every reply PDU is of an allowed type and length-consistent (PS3.8 9.3)."""
    pos = 0
    kinds = []
    while pos + 6 <= len(reply):
        pdu_type, _, length = struct.unpack_from(">BBI", reply, pos)
        assert pdu_type in _ALLOWED_REPLIES, f"reply PDU type 0x{pdu_type:02X}"
        kinds.append(pdu_type)
        pos += 6 + length
    assert pos == len(reply), "truncated reply PDU"
    names = {2: "A-ASSOCIATE-AC", 3: "A-ASSOCIATE-RJ", 4: "P-DATA-TF", 6: "A-RELEASE-RP",
             7: "A-ABORT"}
    # pynetdicom answers each further garbage PDU in Sta13 with another A-ABORT: count
    # a run of them once.
    runs = [names[k] + (" (repeated)" if len(list(g)) > 1 else "") for k, g in groupby(kinds)]
    OUTCOMES[" + ".join(runs) or "closed"] += 1


def _pdu(pdu_type: int, body: bytes, length: int | None = None) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body) if length is None else length) + body


lengths = st.one_of(st.none(), st.integers(0, 0xFFFFFFFF),
                    st.sampled_from([0, 1, 5, 0x7FFFFFFF, 0xFFFFFFFF]))

random_pdus = st.builds(_pdu, st.one_of(st.integers(1, 7), st.integers(0, 255)),
                        st.binary(max_size=300), lengths)


@st.composite
def mutated_rq(draw: st.DrawFn) -> bytes:
    raw = bytearray(VALID_RQ)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "length"]))
        if kind == "flip" and raw:
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del raw[draw(st.integers(6, len(raw))):]
        elif kind == "insert":
            at = draw(st.integers(6, len(raw)))
            raw[at:at] = draw(st.binary(min_size=1, max_size=40))
        elif kind == "length" and len(raw) >= 6:
            struct.pack_into(">I", raw, 2, draw(st.integers(0, 0xFFFFFFFF)))
    return bytes(raw)


@st.composite
def pdv_items(draw: st.DrawFn) -> bytes:
    """One PDV item: maybe a lying length, any context id, any control header."""
    data = draw(st.binary(max_size=200))
    length = draw(st.one_of(st.just(len(data) + 2), st.integers(0, 0xFFFFFFFF)))
    context = draw(st.sampled_from([1, 3, 5, 0, 255]))
    header = draw(st.integers(0, 3))
    return struct.pack(">IBB", length, context, header) + data


@st.composite
def after_association(draw: st.DrawFn) -> bytes:
    items = b"".join(draw(st.lists(pdv_items(), min_size=1, max_size=4)))
    pdata = _pdu(0x04, items, draw(lengths))
    tail = draw(st.sampled_from([b"", _pdu(0x05, b"\0" * 4), _pdu(0x07, b"\0" * 4)]))
    return VALID_RQ + pdata + tail


FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@FUZZ
@given(payload=st.one_of(random_pdus, mutated_rq(), after_association()))
def test_pdu_fuzz_service_survives(receiver: Receiver, payload: bytes) -> None:
    _check_replies(_exchange(receiver.port, payload))


def test_after_fuzzing_echo_still_succeeds(receiver: Receiver) -> None:
    # a last burst of the worst cases, then a real peer
    for payload in (_pdu(0x04, b"", 0xFFFFFFFF), _pdu(0x01, b"\x00" * 10, 0x7FFFFFFF),
                    VALID_RQ[:40], VALID_RQ + _pdu(0x04, struct.pack(">IBB", 0xFFFFFFF0, 1, 3))):
        _check_replies(_exchange(receiver.port, payload))
    result = run_dcmtk(["echoscu", "-to", "5", "127.0.0.1", str(receiver.port)], nodelay=True)
    assert result.returncode == 0, result.stderr
    report("PDU fuzzer", examples=sum(OUTCOMES.values()), outcomes=dict(OUTCOMES))


@st.composite
def mutated_dataset(draw: st.DrawFn, raw: bytes) -> bytes:
    data = bytearray(raw)
    kind = draw(st.sampled_from(["truncate", "flip", "huge_length", "garbage"]))
    if kind == "truncate":
        del data[draw(st.integers(0, len(data) - 1)):]
    elif kind == "flip":
        for _ in range(draw(st.integers(1, 20))):
            data[draw(st.integers(0, min(len(data), 600) - 1))] = draw(st.integers(0, 255))
    elif kind == "huge_length":
        at = draw(st.integers(0, min(len(data), 600) - 8))
        struct.pack_into("<I", data, at + 4, draw(st.sampled_from([0xFFFFFFF0, 0x7FFFFFFF])))
    else:
        data = bytearray(draw(st.binary(min_size=1, max_size=500)))
    return bytes(data)


DATASET_OUTCOMES: Counter[str] = Counter()


def test_malformed_datasets_are_refused(receiver: Receiver, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from pydicom import dcmread
    from pynetdicom import AE, _config
    from pynetdicom.sop_class import CTImageStorage

    from core.errors import NotFoundError

    # Send the file's bytes as they are (no decode/re-encode by the SCU).
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    good = write_ct_series(tmp_path / "ct", slices=1, rows=16, columns=16)[0]
    raw = good.read_bytes()
    meta_end = 144 + int.from_bytes(raw[140:144], "little")
    meta, body = raw[:meta_end], raw[meta_end:]
    uid = str(dcmread(good, stop_before_pixels=True).SOPInstanceUID)
    ae = AE(ae_title="FUZZER")
    ae.add_requested_context(CTImageStorage)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    target = tmp_path / "bad.dcm"

    @settings(max_examples=60, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.too_slow])
    @given(body=mutated_dataset(body))
    def one(body: bytes) -> None:
        target.write_bytes(meta + body)
        assoc = ae.associate("127.0.0.1", receiver.port)
        assert assoc.is_established
        try:
            status = assoc.send_c_store(target)
        finally:
            if assoc.is_established:
                assoc.release()
        code = getattr(status, "Status", None)
        DATASET_OUTCOMES["no response" if code is None else f"0x{code:04X}"] += 1
        if code == 0x0000:
            # accepted: then it is readable and indexed under the request's UID
            receiver.index.get_instance(uid)  # type: ignore[attr-defined]
        else:
            assert code is None or code >= 0xA000 or code in (0x0122, 0x0110), hex(code)

    with pytest.raises(NotFoundError):
        receiver.index.get_instance(uid)  # type: ignore[attr-defined]
    one()
    result = run_dcmtk(["echoscu", "-to", "5", "127.0.0.1", str(receiver.port)], nodelay=True)
    assert result.returncode == 0, result.stderr
    report("malformed datasets", examples=sum(DATASET_OUTCOMES.values()),
           statuses=dict(DATASET_OUTCOMES))


# -- the data set structure check (issue 14 §3): refuse every cut, never crash ---------


def _top_level_boundaries(raw: bytes, offset: int) -> set[int]:
    """Data set offsets where a top-level element starts (pydicom's reading)."""
    from io import BytesIO

    from pydicom import dcmread

    ds = dcmread(BytesIO(raw), defer_size=64)
    starts = {0, len(raw) - offset}  # (the first element may be converted already)
    for elem in ds._dict.values():
        tell = getattr(elem, "value_tell", None)
        if tell is None:
            continue
        vr = getattr(elem, "VR", None)
        header = 12 if vr in ("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR",
                               "UT", "SV", "UV") else 8
        starts.add(tell - offset - header)
    return starts


def _structure_samples() -> list[tuple[str, bytes, int, str]]:
    from pydicom.data import get_testdata_file

    from storage.staging import read_file_meta

    out = []
    for name in ("rtplan.dcm", "CT_small.dcm", "JPEG2000.dcm", "MR_small_implicit.dcm"):
        path = get_testdata_file(name)
        if path is None:
            continue
        raw = Path(str(path)).read_bytes()
        meta, offset = read_file_meta(raw[:65536])
        ts = meta[0x0010].rstrip(b"\0 ").decode()
        out.append((name, raw, offset, ts))
    return out


STRUCTURE_SAMPLES = _structure_samples()
STRUCTURE_OUTCOMES: Counter[str] = Counter()


@settings(max_examples=300, deadline=None, derandomize=True)
@given(sample=st.sampled_from(range(len(STRUCTURE_SAMPLES))), cut=st.floats(0, 1),
       flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=4))
def test_structure_check_refuses_every_cut_and_never_crashes(
    sample: int, cut: float, flips: list[tuple[float, int]]
) -> None:
    from core.header import DatasetStructureError, check_structure

    name, raw, offset, ts = STRUCTURE_SAMPLES[sample]
    data = bytearray(raw[offset:])
    for where, value in flips:
        data[int(where * (len(data) - 1))] = value
    at = int(cut * len(data))
    body = bytes(data[:at])
    implicit = ts == "1.2.840.10008.1.2"
    try:
        check_structure(lambda o, n: body[o:o + n], 0, len(body), implicit=implicit)
    except DatasetStructureError:
        STRUCTURE_OUTCOMES["refused"] += 1
        return
    STRUCTURE_OUTCOMES["accepted"] += 1
    if not flips:
        # Unmodified bytes cut anywhere but between two top-level elements must be
        # refused: an accepted cut would be indexed with shortened values.
        assert at in _top_level_boundaries(raw, offset), f"{name} cut at {at} accepted"
    report("structure check fuzz", outcomes=dict(STRUCTURE_OUTCOMES))


# -- the guard on associations pynetdicom serves (issue 14 §3) --------------------------


@st.composite
def pdu_streams(draw: st.DrawFn) -> list[tuple[int, bytes, int]]:
    """PDUs as (type, body, declared length): P-DATA-TF with command/data fragments of
    any size and flags, other types with any length."""
    out = []
    for _ in range(draw(st.integers(1, 30))):
        kind = draw(st.sampled_from([0x01, 0x04, 0x04, 0x04, 0x05, 0x07]))
        if kind == 0x04:
            body = b"".join(draw(st.lists(pdv_items(), min_size=1, max_size=3)))
            size = draw(st.integers(0, 3000))
            header = draw(st.integers(0, 3))
            body += struct.pack(">IBB", size + 2, 1, header) + b"\0" * size
        else:
            body = draw(st.binary(max_size=64))
        length = draw(st.one_of(st.just(len(body)), st.integers(0, 0xFFFFFFFF)))
        out.append((kind, body, length))
    return out


GUARD_OUTCOMES: Counter[str] = Counter()


@settings(max_examples=150, deadline=None, derandomize=True)
@given(stream=pdu_streams())
def test_pdu_guard_bounds_what_pynetdicom_reads(stream: list[tuple[int, bytes, int]]) -> None:
    from core.settings import DicomSettings
    from ingest.dicom.association import Admission
    from ingest.dicom.scp import _PduGuard

    dicom = DicomSettings(max_pdu=16384, max_command_bytes=4096, max_associate_rq_bytes=2048)
    a, b = socket.socketpair()
    try:
        ticket = Admission(4, 4).admit(a, "127.0.0.1")
        assert ticket is not None
        wire = b"".join(struct.pack(">BBI", t, 0, n) + body for t, body, n in stream)
        pos = 0

        def recv(n: int) -> bytearray:
            nonlocal pos
            chunk = wire[pos:pos + n]
            pos += len(chunk)
            return bytearray(chunk)

        guarded = _PduGuard(dicom, ticket).wrap(recv, None)
        read = command = 0
        try:
            while pos < len(wire):  # as DULServiceProvider._read_pdu_data does
                header = guarded(6)
                if len(header) < 6:
                    break
                kind, _, length = struct.unpack(">BBI", header)
                # The guard let this length through: it is within its bound.
                limit = {0x01: 2048, 0x04: 16384 + 6}.get(kind, 65536)
                assert length <= limit
                body = guarded(length)
                read += len(body)
                at = 0
                while kind == 0x04 and at + 6 <= len(body):
                    item_len, _cx, flags = struct.unpack_from(">IBB", body, at)
                    if flags & 0x01:
                        command += max(item_len - 2, 0)
                        # Handed to pynetdicom: the command set so far is within bound.
                        assert command <= 4096
                        if flags & 0x02:
                            command = 0
                    at += 4 + max(item_len, 2)
        except OSError:
            GUARD_OUTCOMES["refused"] += 1
        else:
            GUARD_OUTCOMES["read through"] += 1
        assert read <= len(wire)
        report("pynetdicom PDU guard fuzz", outcomes=dict(GUARD_OUTCOMES))
    finally:
        a.close()
        b.close()
