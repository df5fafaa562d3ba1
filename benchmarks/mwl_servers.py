"""Worklist benchmark servers, each in its own process, as a modality meets them.

* ``pacslab``: the real ``pacslab dicom`` receiver (the process kind ``pacslab serve``
  forks) over a SQLite index filled with the orders beforehand
  (``tests.worklist.dcmtk.pacslab_dicom``);
* ``pacslab-memory``: the same SCP handlers over the in-memory fake, started as
  ``python -m benchmarks.mwl_servers memory <items> <port>``;
* ``wlmscpfs``: DCMTK over ``.wl`` files (see ``tests/worklist/dcmtk.py``).

The client (:class:`LeanFindSCU`) stays in the pytest process, so it no longer shares
a GIL with the server.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import sys
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

from pydicom.dataset import Dataset

from tests.worklist.dcmtk import free_port, run_process, scrubbed_env
from worklist.model import WorklistItem, make_item

__all__ = [
    "DAY0",
    "DAYS",
    "STATIONS",
    "LeanFindSCU",
    "make_items",
    "memory_server",
    "modality_query",
    "session_cpu_seconds",
]

STATIONS = (
    [f"CT{n}" for n in range(1, 11)]
    + [f"MR{n}" for n in range(1, 6)]
    + [f"US{n}" for n in range(1, 6)]
)
DAYS = 25
DAY0 = datetime(2026, 11, 25, 7, 0)


def make_items(n: int) -> list[WorklistItem]:
    """``n`` items spread evenly over 20 stations and 25 days, 07:00-19:00."""
    items = []
    for i in range(n):
        station = STATIONS[i % len(STATIONS)]
        day = (i // len(STATIONS)) % DAYS
        minutes = (i * 7) % (12 * 60)
        items.append(
            make_item(
                f"ACC{i:06d}",
                patient_name=f"PATIENT{i:06d}^TEST",
                station_ae_title=station,
                modality=station[:2],
                start=DAY0 + timedelta(days=day, minutes=minutes),
            )
        )
    return items


def modality_query(station: str, day: int) -> Dataset:
    """What a modality polls with: its station and one day, ~20 return keys."""
    q = Dataset()
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "AccessionNumber",
        "RequestedProcedureID",
        "RequestedProcedureDescription",
        "StudyInstanceUID",
        "ReferringPhysicianName",
        "AdmissionID",
    ):
        setattr(q, keyword, "")
    sps = Dataset()
    sps.ScheduledStationAETitle = station
    sps.ScheduledProcedureStepStartDate = (DAY0 + timedelta(days=day)).strftime("%Y%m%d")
    for keyword in (
        "ScheduledProcedureStepStartTime",
        "Modality",
        "ScheduledProcedureStepID",
        "ScheduledProcedureStepDescription",
        "ScheduledPerformingPhysicianName",
        "ScheduledStationName",
    ):
        setattr(sps, keyword, "")
    sps.ScheduledProtocolCodeSequence = []
    q.ScheduledProcedureStepSequence = [sps]
    return q


@contextlib.contextmanager
def memory_server(size: int) -> Iterator[int]:
    """The MWL SCP over the in-memory fake with ``make_items(size)``, in a child process."""
    port = free_port()
    cmd = [sys.executable, "-m", "benchmarks.mwl_servers", "memory", str(size), str(port)]
    with run_process(cmd, scrubbed_env(), port) as p:
        yield p


def session_cpu_seconds(session: int) -> float:
    """User + system CPU time of the live processes in ``session`` (Linux ``/proc``).

    Wall-clock latency on a shared two-core machine mostly measures the neighbours;
    the server's CPU per query does not.
    """
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # Fields after the parenthesised command name; session is field 6.
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[3]) == session:
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / os.sysconf("SC_CLK_TCK")


class LeanFindSCU:
    """A Modality Worklist C-FIND SCU on a plain socket, the way a modality's C++ stack is.

    pynetdicom's SCU spends as much CPU per response as our SCP (two polling reactor
    threads, a pydicom decode of every identifier), which is neither what a modality
    costs nor ours to count. This client encodes each identifier once (Implicit VR
    Little Endian), sends the C-FIND-RQ in one P-DATA-TF (PS3.8 9.3.5) and reads the
    responses, checking each Pending carries an identifier and keeping its bytes
    undecoded. One association, asynchronous operations window 1 (PS3.7 D.3.3.3).
    """

    _SOP_CLASS = "1.2.840.10008.5.1.4.31"  # Modality Worklist Information Model - FIND

    def __init__(self, port: int, called_ae: str) -> None:
        from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
        from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
        from pynetdicom.presentation import build_context

        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rq = A_ASSOCIATE()
        rq.application_context_name = "1.2.840.10008.3.1.1.1"
        rq.calling_ae_title = "LEANSCU"
        rq.called_ae_title = called_ae
        context = build_context(self._SOP_CLASS, ["1.2.840.10008.1.2"])
        context.context_id = 1
        rq.presentation_context_definition_list = [context]
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = 0  # no limit (PS3.8 D.1)
        rq.user_information = [max_length]
        pdu = A_ASSOCIATE_RQ()
        pdu.from_primitive(rq)
        self.sock.sendall(bytes(pdu.encode()))
        kind, body = self._read_pdu()
        if kind != 0x02:
            raise RuntimeError(f"association not accepted (PDU type {kind})")
        ac = A_ASSOCIATE_AC()
        ac.decode(body)
        results = ac.to_primitive().presentation_context_definition_results_list
        if not results or results[0].result != 0:
            raise RuntimeError("MWL FIND with Implicit VR Little Endian not accepted")
        self.message_id = 0

    def _recv(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("peer closed")
            out += chunk
        return bytes(out)

    def _read_pdu(self) -> tuple[int, bytes]:
        header = self._recv(6)
        kind, _, length = struct.unpack(">BBI", header)
        return kind, header + self._recv(length)

    @staticmethod
    def _command(fields: dict[int, bytes]) -> bytes:
        body = b"".join(
            struct.pack("<HHI", 0, elem, len(value)) + value
            for elem, value in sorted(fields.items())
        )
        return struct.pack("<HHI", 0, 0, 4) + struct.pack("<I", len(body)) + body

    @staticmethod
    def _pdv(control: int, data: bytes) -> bytes:
        return struct.pack(">IBB", len(data) + 2, 1, control) + data

    def find(self, identifier: bytes) -> list[bytes]:
        """Send one C-FIND-RQ (PS3.7 9.1.2) and return the Pending identifiers' bytes."""
        self.message_id = self.message_id % 0xFFFF + 1
        uid = self._SOP_CLASS.encode("ascii")
        command = self._command(
            {
                0x0002: uid + b"\0" * (len(uid) % 2),
                0x0100: struct.pack("<H", 0x0020),  # C-FIND-RQ
                0x0110: struct.pack("<H", self.message_id),
                0x0700: struct.pack("<H", 0),  # priority medium
                0x0800: struct.pack("<H", 0x0001),  # a data set follows
            }
        )
        pdvs = self._pdv(0x03, command) + self._pdv(0x02, identifier)
        self.sock.sendall(struct.pack(">BBI", 0x04, 0, len(pdvs)) + pdvs)
        out: list[bytes] = []
        command_bytes, data = bytearray(), bytearray()
        status = None
        while True:
            kind, pdu = self._read_pdu()
            if kind != 0x04:
                raise RuntimeError(f"unexpected PDU type {kind} during C-FIND")
            pos = 6
            while pos < len(pdu):
                length, _, control = struct.unpack_from(">IBB", pdu, pos)
                value = pdu[pos + 6 : pos + 4 + length]
                pos += 4 + length
                if control & 0x01:
                    command_bytes += value
                    if control & 0x02:
                        status, has_data = self._status(bytes(command_bytes))
                        command_bytes.clear()
                        if not has_data:
                            if status not in (0xFF00, 0xFF01):
                                return out
                            raise RuntimeError("Pending C-FIND-RSP without an identifier")
                else:
                    data += value
                    if control & 0x02:
                        out.append(bytes(data))
                        data.clear()

    @staticmethod
    def _status(command: bytes) -> tuple[int, bool]:
        fields: dict[int, bytes] = {}
        pos = 0
        while pos < len(command):
            _, elem, length = struct.unpack_from("<HHI", command, pos)
            fields[elem] = command[pos + 8 : pos + 8 + length]
            pos += 8 + length
        status = struct.unpack("<H", fields[0x0900])[0]
        has_data = struct.unpack("<H", fields[0x0800])[0] != 0x0101
        if status not in (0x0000, 0xFF00, 0xFF01):
            raise RuntimeError(f"C-FIND status 0x{status:04X}")
        return status, has_data

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(struct.pack(">BBII", 0x05, 0, 4, 0))  # A-RELEASE-RQ
            self._read_pdu()
        self.sock.close()


def _serve_memory(size: int, port: int) -> None:
    from pacslab.runtime import configure_runtime
    from worklist.memory import InMemoryMppsRepository, InMemoryWorklist
    from worklist.query import MatchOptions
    from worklist.scp import build_ae, handlers

    # This process is its own composition root: set pynetdicom's globals as
    # ``pacslab dicom`` does (no identifiers in its logs, context variables carried
    # into association threads), so both servers are measured with the same config.
    configure_runtime()
    source = InMemoryWorklist(make_items(size))
    ae = build_ae(ae_title="PACSLAB")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server = ae.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=handlers(
            source, InMemoryMppsRepository(), MatchOptions(), source.apply_effects
        ),
    )
    assert server is not None
    stop.wait()
    server.shutdown()


if __name__ == "__main__":
    _, kind, size, port = sys.argv
    if kind != "memory":
        raise SystemExit(f"unknown server kind {kind}")
    _serve_memory(int(size), int(port))
