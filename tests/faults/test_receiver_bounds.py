"""The DICOM receiver against hostile peers (issue 14 §3): refused, bounded, still serving.

A real ``pacslab dicom`` process (one receiver) gets truncated and inconsistent data
sets, a deflate bomb, command fragments without end, a first PDU declaring 4 GB and
a flood of idle connections. Each must be refused (0xC000 and a quarantined file, or
A-ABORT / A-ASSOCIATE-RJ) without the receiver's memory growing past a stated bound,
while DCMTK ``echoscu`` and ``storescu`` keep getting through, and nothing refused is
indexed. Raw bytes are sent with pynetdicom's chunked sender (``storescu`` parses the
files it sends and will not send a broken one) or a plain socket.
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from core.synthetic import write_ct_series
from tests.support import env_for, run_dcmtk, wait_until

from .conftest import report, start_service, with_suppressed_kill

pytestmark = pytest.mark.network

#: Most the receiver's resident memory may grow through one attack.
RSS_LIMIT = 64 << 20
CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED = "1.2.840.10008.1.2.1.99"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
FIGURES: dict[str, str] = {}


class Service:
    def __init__(self, proc: psutil.Process, port: int, data: Path) -> None:
        self.proc = proc
        self.port = port
        self.data = data

    def rss(self) -> int:
        """Resident memory of the receiver processes (the forked children)."""
        total = 0
        for child in self.proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += child.memory_info().rss
        return total

    def echo(self) -> None:
        result = run_dcmtk(["echoscu", "-to", "10", "127.0.0.1", str(self.port)], nodelay=True)
        assert result.returncode == 0, result.stderr

    def quarantined(self) -> list[dict[str, str]]:
        folder = self.data / "quarantine"
        paths = sorted(folder.glob("*.reason.json"), key=lambda p: p.stat().st_mtime_ns)
        return [json.loads(p.read_text()) for p in paths]

    def indexed(self, sop_instance_uid: str) -> bool:
        import sqlite3

        with contextlib.closing(sqlite3.connect(self.data / "index.db")) as db:
            row = db.execute(
                "SELECT count(*) FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
            ).fetchone()
        return bool(row[0])


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    data = tmp_path_factory.mktemp("bounds")
    env = env_for(data)
    env.update(
        PACSLAB_DICOM__WORKERS="1",
        PACSLAB_DICOM__ARTIM_TIMEOUT_S="3",
        PACSLAB_DICOM__NETWORK_TIMEOUT_S="20",
        PACSLAB_DICOM__MAX_ASSOCIATIONS="16",
        PACSLAB_AUTH__ENABLED="false",
        PYTHONPATH=str(Path(__file__).resolve().parents[2]),
    )
    proc = start_service(env)
    try:
        yield Service(psutil.Process(proc.pid), int(env["PACSLAB_DICOM__PORT"]), data)
    finally:
        with_suppressed_kill(proc)
        report("receiver bounds", **FIGURES)


def _ct(tmp_path: Path, **kwargs: str) -> tuple[Path, bytes, bytes, Dataset]:
    path = write_ct_series(tmp_path / "ct", slices=1, rows=32, columns=32, **kwargs)[0]
    raw = path.read_bytes()
    meta_end = 144 + int.from_bytes(raw[140:144], "little")
    return path, raw[:meta_end], raw[meta_end:], dcmread(path, stop_before_pixels=True)


def _send_raw(port: int, meta: bytes, body: bytes, target: Path, ts: str = EXPLICIT_LE
              ) -> int | None:
    """C-STORE ``meta + body`` as it is (pynetdicom chunked send); the status or None."""
    from pynetdicom import AE, _config

    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        target.write_bytes(meta + body)
        ae = AE(ae_title="HOSTILE")
        ae.add_requested_context(CT, ts)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        assoc = ae.associate("127.0.0.1", port)
        assert assoc.is_established
        try:
            status = assoc.send_c_store(target)
        finally:
            if assoc.is_established:
                assoc.release()
        return getattr(status, "Status", None)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old


def _element_offset(body: bytes, tag: int) -> int:
    """Offset of a top-level Explicit VR LE element header (tags before Pixel Data)."""
    needle = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    at = body.find(needle)
    assert at >= 0
    return at


def _insert(body: bytes, tag: int, element: bytes) -> bytes:
    """``element`` put in tag order among the top-level Explicit VR LE elements."""
    pos = 0
    while pos < len(body):
        group, elem, vr = struct.unpack_from("<HH2s", body, pos)
        if (group << 16 | elem) > tag:
            break
        if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OF", b"OD", b"OL"):
            pos += 12 + struct.unpack_from("<I", body, pos + 8)[0]
        else:
            pos += 8 + struct.unpack_from("<H", body, pos + 6)[0]
    return body[:pos] + element + body[pos:]


def _meta_with_ts(meta: bytes, ts: str) -> bytes:
    from storage.staging import part10_prefix

    ds = dcmread(io.BytesIO(meta), force=True, stop_before_pixels=True)
    return part10_prefix(ds.file_meta.MediaStorageSOPClassUID,
                         ds.file_meta.MediaStorageSOPInstanceUID, ts)


def _refused(service: Service, before: int, uid: str, status: int | None, what: str,
             reason: str = "") -> None:
    assert status in (0xC000, 0xA900), f"{what}: status {status!r}"
    assert not service.indexed(uid), f"{what}: indexed"
    reasons = service.quarantined()
    assert len(reasons) == before + 1, f"{what}: not quarantined"
    assert reasons[-1]["sop_instance_uid"] == uid
    assert reason in reasons[-1]["detail"], reasons[-1]["detail"]
    FIGURES[what] = f"0x{status:04X} {reasons[-1]['detail']!r}"


def test_truncated_and_inconsistent_data_sets_are_refused_and_quarantined(
    service: Service, tmp_path: Path
) -> None:
    cases: dict[str, tuple[bytes, bytes, str]] = {}
    _path, meta, body, ds = _ct(tmp_path)
    series_at = _element_offset(body, 0x0020000E)
    # Cut inside the Series Instance UID value: pydicom alone indexed a shortened UID.
    cases["truncated mid-element"] = (meta, body[: series_at + 8 + 10], "past the end")
    cases["truncated inside an element header"] = (meta, body[: series_at + 5], "header")
    # An element claiming more bytes than the data set holds.
    longer = bytearray(body)
    struct.pack_into("<H", longer, series_at + 6, 0xFFF0)
    cases["element length past the end"] = (meta, bytes(longer)[: series_at + 400], "past the end")
    # Native Pixel Data cut short (the file ends inside it).
    cases["Pixel Data cut short"] = (meta, body[:-100], "past the end")
    # An undefined-length sequence after Pixel Data that is never closed.
    unclosed = struct.pack("<HH2sHI", 0xFFFA, 0xFFFA, b"SQ", 0, 0xFFFFFFFF)
    unclosed += struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    cases["undefined-length sequence not closed"] = (meta, body + unclosed, "not closed")
    # A defined-length sequence whose item claims more than the sequence holds.
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 100) + b"\x00" * 8
    nested = struct.pack("<HH2sHI", 0x0008, 0x1140, b"SQ", 0, len(item)) + item
    cases["item past the end of its sequence"] = (
        meta, _insert(body, 0x00081140, nested), "past the end of its sequence")
    results = {}
    for n, (what, (m, b, reason)) in enumerate(cases.items()):
        uid = str(ds.SOPInstanceUID)
        before = len(service.quarantined())
        status = _send_raw(service.port, m, b, tmp_path / f"case{n}.dcm")
        results[what] = status
        _refused(service, before, uid, status, what, reason)
    service.echo()


def test_encapsulated_pixel_data_without_its_delimiter_is_refused(
    service: Service, tmp_path: Path
) -> None:
    _path, meta, body, ds = _ct(tmp_path)
    pixel_at = body.rfind(struct.pack("<HH", 0x7FE0, 0x0010))
    header = body[:pixel_at]
    # Encapsulated Pixel Data (PS3.5 A.4): empty offset table, one fragment, no
    # Sequence Delimitation Item.
    fragment = b"\xff\xd8" + b"\x00" * 1000 + b"\xff\xd9"
    pixel = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF)
    pixel += struct.pack("<HHI", 0xFFFE, 0xE000, 0)
    pixel += struct.pack("<HHI", 0xFFFE, 0xE000, len(fragment)) + fragment
    meta = _meta_with_ts(meta, JPEG_BASELINE)
    before = len(service.quarantined())
    status = _send_raw(service.port, meta, header + pixel, tmp_path / "enc.dcm", JPEG_BASELINE)
    _refused(service, before, str(ds.SOPInstanceUID), status, "encapsulated without delimiter")
    # The same with its delimiter is stored (the check refuses only what is broken).
    closed = header + pixel + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    status = _send_raw(service.port, meta, closed, tmp_path / "enc2.dcm", JPEG_BASELINE)
    assert status == 0x0000
    assert service.indexed(str(ds.SOPInstanceUID))


def test_deflate_bomb_is_refused_with_bounded_memory(service: Service, tmp_path: Path) -> None:
    _path, meta, body, ds = _ct(tmp_path)
    pixel_at = body.rfind(struct.pack("<HH", 0x7FE0, 0x0010))
    # Header, then 512 MiB of zeros as OB Pixel Data: a ~0.5 MB deflate stream.
    size = 512 << 20
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [squeeze.compress(body[:pixel_at])]
    parts.append(squeeze.compress(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, size)))
    zeros = bytes(1 << 20)
    for _ in range(size >> 20):
        parts.append(squeeze.compress(zeros))
    parts.append(squeeze.flush())
    deflated = b"".join(parts)
    rss = service.rss()
    before = len(service.quarantined())
    status = _send_raw(service.port, _meta_with_ts(meta, DEFLATED), deflated,
                       tmp_path / "bomb.dcm", DEFLATED)
    grown = service.rss() - rss
    _refused(service, before, str(ds.SOPInstanceUID), status, "deflate bomb")
    assert grown < RSS_LIMIT, f"RSS grew {grown >> 20} MiB"
    FIGURES["deflate bomb sent/inflates"] = f"{len(deflated) >> 10} KiB/{size >> 20} MiB"
    service.echo()


def _associate_rq(calling: str = "HOSTILE", abstract: str = CT) -> bytes:
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.presentation import build_context

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = "PACSLAB"
    cx = build_context(abstract, [EXPLICIT_LE, "1.2.840.10008.1.2"])
    cx.context_id = 1
    primitive.presentation_context_definition_list = [cx]
    max_len = MaximumLengthNotification()
    max_len.maximum_length_received = 16384
    primitive.user_information = [max_len]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def _read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    header = b""
    while len(header) < 6:
        chunk = sock.recv(6 - len(header))
        if not chunk:
            return -1, b""
        header += chunk
    pdu_type, _, length = struct.unpack(">BBI", header)
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            break
        body += chunk
    return pdu_type, body


def _flood_until_closed(sock: socket.socket, pdu: bytes, limit: int) -> int:
    """Send ``pdu`` again and again until the peer stops reading; bytes sent."""
    sent = 0
    with contextlib.suppress(OSError):
        while sent < limit:
            sock.sendall(pdu)
            sent += len(pdu)
    return sent


@pytest.mark.parametrize("abstract", [CT, "1.2.840.10008.5.1.4.31"], ids=["fast", "pynetdicom"])
def test_command_fragments_without_end_abort(service: Service, abstract: str) -> None:
    rss = service.rss()
    with socket.create_connection(("127.0.0.1", service.port), timeout=20) as sock:
        sock.sendall(_associate_rq(abstract=abstract))
        kind, _ = _read_pdu(sock)
        assert kind == 0x02  # A-ASSOCIATE-AC
        fragment = b"\x00" * 16000
        item = struct.pack(">IBB", len(fragment) + 2, 1, 0x01) + fragment  # not last
        pdu = struct.pack(">BBI", 0x04, 0, len(item)) + item
        sent = _flood_until_closed(sock, pdu, 200 << 20)
        kind, _ = _read_pdu(sock) if sent < 200 << 20 else (-2, b"")
    grown = service.rss() - rss
    assert sent < 200 << 20, "command fragments accepted without end"
    assert kind in (0x07, -1)  # A-ABORT, or closed
    assert grown < RSS_LIMIT, f"RSS grew {grown >> 20} MiB"
    FIGURES[f"command flood ({abstract})"] = f"cut after {sent >> 10} KiB"
    service.echo()


def test_first_pdu_declaring_4_gb_is_rejected_unread(service: Service) -> None:
    rss = service.rss()
    with socket.create_connection(("127.0.0.1", service.port), timeout=20) as sock:
        sock.sendall(struct.pack(">BBI", 0x01, 0, 0xFFFFFFF0))
        sent = _flood_until_closed(sock, b"\x00" * 65536, 512 << 20)
        with contextlib.suppress(OSError):
            _read_pdu(sock)  # A-ASSOCIATE-RJ, or closed
    grown = service.rss() - rss
    assert sent < 512 << 20
    assert grown < RSS_LIMIT, f"RSS grew {grown >> 20} MiB"
    FIGURES["4 GB first PDU"] = f"cut after {sent >> 10} KiB"
    service.echo()


def test_idle_flood_does_not_lock_out_a_modality(service: Service, tmp_path: Path) -> None:
    files = write_ct_series(tmp_path / "real", slices=5, rows=32, columns=32)
    uids = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]
    idle: list[socket.socket] = []
    try:
        for n in range(70):
            sock = socket.create_connection(("127.0.0.1", service.port), timeout=20)
            idle.append(sock)
            if n % 2:  # half associate (one calling AE) and then say nothing more
                with contextlib.suppress(OSError):
                    sock.sendall(_associate_rq("FLOODER"))
        # A real modality, while all 70 are still open.
        result = run_dcmtk(["storescu", "-aet", "MODALITY", "-to", "20", "-ta", "20",
                            "-td", "20", "127.0.0.1", str(service.port), *map(str, files)],
                           nodelay=True, timeout=90)
        assert result.returncode == 0, result.stderr
        service.echo()
        assert all(service.indexed(uid) for uid in uids)
        still_open = 0
        for sock in idle:
            sock.setblocking(False)
            try:
                still_open += sock.recv(1, socket.MSG_PEEK) != b""
            except BlockingIOError:
                still_open += 1
            except OSError:
                pass
        FIGURES["idle flood"] = f"70 opened, {still_open} still open after storescu"
    finally:
        for sock in idle:
            sock.close()


def test_an_idle_connection_is_closed_after_artim(service: Service) -> None:
    with socket.create_connection(("127.0.0.1", service.port), timeout=30) as sock:
        # Nothing sent: ARTIM (3 s here) closes it; recv returns EOF, not our timeout.
        assert sock.recv(1) == b""
    service.echo()


def _command(elements: list[tuple[int, bytes]]) -> bytes:
    body = b"".join(struct.pack("<HHI", 0, e, len(v)) + v for e, v in elements)
    return struct.pack("<HHI", 0, 0, 4) + struct.pack("<I", len(body)) + body


@pytest.mark.parametrize(
    ("abstract", "field", "limit"),
    [("1.2.840.10008.5.1.4.31", 0x0020, 64 << 20), (CT, 0x0001, 0)],
    ids=["C-FIND identifier (pynetdicom)", "C-STORE data set (fast path)"],
)
def test_a_data_set_without_end_is_bounded(
    service: Service, abstract: str, field: int, limit: int
) -> None:
    """C-FIND identifiers are held in memory by pynetdicom: cut at 16 MiB. C-STORE data
    sets stream to disk (memory bounded whatever their size); the fragments stop at
    the end of the test and the partial file goes with the association."""
    uid = abstract.encode() + b"\x00" * (len(abstract) % 2)
    command = _command([(0x0002, uid), (0x0100, struct.pack("<H", field)),
                        (0x0110, struct.pack("<H", 1)), (0x0700, struct.pack("<H", 0)),
                        (0x0800, struct.pack("<H", 0x0000)),
                        *([(0x1000, b"1.2.3.4\x00")] if field == 1 else [])])
    rss = service.rss()
    staging_before = sum(1 for _ in (service.data / "originals").rglob("*.part"))
    with socket.create_connection(("127.0.0.1", service.port), timeout=20) as sock:
        sock.sendall(_associate_rq(abstract=abstract))
        kind, _ = _read_pdu(sock)
        assert kind == 0x02
        item = struct.pack(">IBB", len(command) + 2, 1, 0x03) + command
        sock.sendall(struct.pack(">BBI", 0x04, 0, len(item)) + item)
        fragment = b"\x00" * 16000
        item = struct.pack(">IBB", len(fragment) + 2, 1, 0x00) + fragment  # not last
        pdu = struct.pack(">BBI", 0x04, 0, len(item)) + item
        sent = _flood_until_closed(sock, pdu, limit or (96 << 20))
        grown = service.rss() - rss
    if limit:
        assert sent < limit, "identifier fragments accepted without end"
    assert grown < RSS_LIMIT, f"RSS grew {grown >> 20} MiB"
    FIGURES[f"data set flood ({abstract})"] = f"{sent >> 20} MiB sent, RSS +{grown >> 20} MiB"
    service.echo()
    # Nothing half-received stays in staging once the association is gone.
    def staged() -> int:
        return sum(1 for _ in (service.data / "originals").rglob("*.part"))

    wait_until(lambda: staged() <= staging_before, timeout=5, interval=0.1,
               message=lambda: f"{staged() - staging_before} half-received file(s) left")
    assert staged() <= staging_before


def test_a_real_deflated_transfer_is_still_stored(service: Service, tmp_path: Path) -> None:
    """DCMTK ``storescu -xd`` deflates on the fly (PS3.5 A.5): the bounded inflate reads
    it like any other instance."""
    files = write_ct_series(tmp_path / "dfl", slices=2, rows=64, columns=64)
    uids = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]
    result = run_dcmtk(["storescu", "-xd", "-aet", "DEFLATER", "-to", "20",
                        "127.0.0.1", str(service.port), *map(str, files)], nodelay=True)
    assert result.returncode == 0, result.stderr
    assert all(service.indexed(uid) for uid in uids)
    import sqlite3

    with contextlib.closing(sqlite3.connect(service.data / "index.db")) as db:
        syntaxes = {row[0] for row in db.execute(
            "SELECT transfer_syntax_uid FROM instances WHERE sop_instance_uid IN (?, ?)", uids)}
    assert syntaxes == {DEFLATED}


def test_storescu_sending_a_cut_file_is_refused(service: Service, tmp_path: Path) -> None:
    """A real DCMTK ``storescu`` sends a file whose Pixel Data is cut short (as a
    modality whose disk filled up would): refused with 0xC000 and quarantined."""
    path, meta, body, ds = _ct(tmp_path)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(meta + body[:-100])
    path.unlink()
    before = len(service.quarantined())
    result = run_dcmtk(["storescu", "-v", "-aet", "MODALITY", "-to", "20", "127.0.0.1",
                        str(service.port), str(cut)], nodelay=True)
    uid = str(ds.SOPInstanceUID)
    assert not service.indexed(uid)
    if "Received Store Response" in result.stderr:
        assert "Success" not in result.stderr.split("Received Store Response", 1)[1][:60]
        _refused(service, before, uid, 0xC000, "storescu cut file", "past the end")
    else:  # storescu would not send it: nothing to refuse
        FIGURES["storescu cut file"] = "not sent by storescu"
    service.echo()
