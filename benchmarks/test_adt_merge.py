"""HL7 A40 to every answer showing the merge (issue 17, IHE PIR), on one ``pacslab serve``.

``pacslab serve`` runs as a subprocess on loopback (authentication off: what is
measured is the merge, not token checks). Each temporary patient ``TMPnnnn`` gets a
CT study (DCMTK ``storescu``), an ORM^O01 order over MLLP (so a worklist item) and an
ORU^R01 lab result dropped in the lab inbox. Then, one at a time, the record system
sends ``ADT^A40`` merging it into ``BNnnnn`` over an MLLP connection (an MLLP client
that waits for the ACK, as python-hl7's ``mllp_send`` does), and a client asks until
every interface answers with the surviving patient:

- QIDO-RS ``/dicomweb/studies?PatientID=BNnnnn`` lists the study;
- C-FIND (study root, pynetdicom) by the surviving Patient ID finds the study;
- FHIR ``Patient?identifier=BNnnnn`` → ``ImagingStudy?patient=`` and
  ``Observation?patient=`` list the study and the lab result;
- Modality Worklist C-FIND by the surviving Patient ID finds the order.

The clocks: ``ack`` (A40 sent → ACK AA received) and ``visible`` (A40 sent → the
last of the four answers showing the merge). After the rounds, DCMTK ``findscu``
(study root and ``-W``) checks the last merge the same way. There is no external
anchor for this one (Orthanc has no ADT; dcm4chee-arc is not runnable here): the
figures are absolute, in ``extra_info``.

With ``--benchmark-disable`` (the default) 3 merges as a smoke run; with
``--benchmark-enable`` 40 (``./run bench --quick``: 10).
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ModalityWorklistInformationFind,
    StudyRootQueryRetrieveInformationModelFind,
)
from pytest_benchmark.fixture import BenchmarkFixture

from benchmarks.support import per_round, quick, record
from core.hl7v2 import Deframer, frame
from core.synthetic import ct_series
from tests.support import free_port, run_dcmtk
from tests.worklist.adt_messages import a40
from tests.worklist.dcmtk import write_query
from tests.worklist.test_adt_e2e import orm, oru

pytestmark = pytest.mark.network

ROOT = Path(__file__).resolve().parents[1]
ISSUER = "BVTW"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class _Mllp:
    """One MLLP connection: send a message, wait for its ACK (original mode)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.deframer = Deframer()

    def send(self, message: bytes) -> str:
        """The ACK's MSA-1."""
        self.sock.sendall(frame(message))
        while True:
            data = self.sock.recv(65536)
            assert data, "MLLP connection closed without an ACK"
            for ack in self.deframer.feed(data):
                msa = next(s for s in ack.split(b"\r") if s.startswith(b"MSA"))
                return msa.split(b"|")[1].decode()

    def close(self) -> None:
        self.sock.close()


def _wait(predicate: Callable[[], bool], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached"
        time.sleep(0.1)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[dict[str, object]]:
    """``pacslab serve`` on free loopback ports; its ports and data directory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSLAB_")}
    ports = {"dicom": free_port(), "http": free_port(), "mllp": free_port()}
    env.update(
        PACSLAB_DATA_DIR=str(tmp_path / "data"),
        PACSLAB_DICOM__HOST="127.0.0.1",
        PACSLAB_DICOM__PORT=str(ports["dicom"]),
        PACSLAB_HTTP__HOST="127.0.0.1",
        PACSLAB_HTTP__PORT=str(ports["http"]),
        PACSLAB_ORDERS__MLLP_HOST="127.0.0.1",
        PACSLAB_ORDERS__MLLP_PORT=str(ports["mllp"]),
        PACSLAB_ORDERS__STATION_BY_MODALITY='{"CT": "CT1"}',
        PACSLAB_LAB__PATIENT_ISSUER=ISSUER,
        PACSLAB_AUTH__ENABLED="false",
        PACSLAB_LOG__LEVEL="WARNING",
    )
    service = subprocess.Popen(
        [sys.executable, "-m", "pacslab", "serve"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{ports['http']}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert service.poll() is None and time.monotonic() < deadline, "serve did not start"
            time.sleep(0.1)
        yield {**ports, "base": base, "data": tmp_path / "data"}
    finally:
        service.terminate()
        try:
            service.wait(timeout=30)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()


def _seed(serve: dict[str, object], tmp_path: Path, n: int) -> dict[int, str]:
    """Studies, orders and lab results of TMP0000…; study UID by patient number."""
    studies: dict[int, str] = {}
    corpus = tmp_path / "corpus"
    for i in range(n):
        folder = corpus / f"{i:04d}"
        folder.mkdir(parents=True)
        for k, ds in enumerate(
            ct_series(2, 32, 32, patient_id=f"TMP{i:04d}", patient_name=f"CAP CUU^{i:04d}",
                      accession_number="")
        ):  # fmt: skip
            ds.IssuerOfPatientID = ISSUER
            ds.save_as(folder / f"CT{k}.dcm", enforce_file_format=True)
            studies[i] = str(ds.StudyInstanceUID)
    sent = run_dcmtk(
        ["storescu", "+sd", "+r", "127.0.0.1", str(serve["dicom"]), str(corpus)], nodelay=True
    )
    assert sent.returncode == 0, sent.stderr
    client = _Mllp(int(str(serve["mllp"])))
    try:
        for i in range(n):
            assert client.send(orm(f"M{i:04d}", f"TMP{i:04d}", f"CAP CUU^{i:04d}")) == "AA"
    finally:
        client.close()
    inbox = Path(str(serve["data"])) / "inbox" / "lab" / "auto"
    inbox.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        body = oru(f"TMP{i:04d}", f"CAP CUU^{i:04d}").replace(b"|LAB1|", f"|LAB{i:04d}|".encode())
        (inbox / f"r{i:04d}.hl7.tmp").write_bytes(body)
        os.replace(inbox / f"r{i:04d}.hl7.tmp", inbox / f"r{i:04d}.hl7")
    base = str(serve["base"])
    _wait(
        lambda: (
            len(httpx.get(f"{base}/dicomweb/studies", params={"limit": 1000}).json() or []) >= n
        ),
        "every study indexed",
    )
    _wait(
        lambda: (
            httpx.get(f"{base}/fhir/Observation", params={"_count": "1"}).json().get("total", 0)
            >= n
        ),
        "every lab result stored",
    )
    return studies


def _find(ae: AE, port: int, sop_class: str, query: Dataset) -> list[Dataset]:
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSLAB")
    assert assoc.is_established
    try:
        return [
            identifier
            for status, identifier in assoc.send_c_find(query, sop_class)
            if status is not None and status.Status in (0xFF00, 0xFF01) and identifier
        ]
    finally:
        assoc.release()


def _study_query(patient_id: str) -> Dataset:
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.PatientID = patient_id
    q.StudyInstanceUID = ""
    return q


def _mwl_query(patient_id: str) -> Dataset:
    q = Dataset()
    q.PatientID = patient_id
    q.PatientName = ""
    q.ScheduledProcedureStepSequence = [Dataset()]
    q.ScheduledProcedureStepSequence[0].Modality = "CT"
    return q


def test_a40_to_every_answer(
    benchmark: BenchmarkFixture, serve: dict[str, object], tmp_path: Path
) -> None:
    merges = 3 if benchmark.disabled else 10 if quick() else 40
    studies = _seed(serve, tmp_path, merges)
    base, dicom = str(serve["base"]), int(str(serve["dicom"]))
    ae = AE(ae_title="BENCH")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(ModalityWorklistInformationFind)
    http = httpx.Client(base_url=base, timeout=30)
    acks: list[float] = []
    visible: list[float] = []
    polls: list[int] = []
    per_answer: dict[str, list[float]] = {}  # ms from sending the A40 to each answer
    waiting_on: Counter[str] = Counter()  # which answer was behind, per unsuccessful poll

    def merged(i: int, started: float) -> dict[str, float] | None:
        """Each answer's time since the A40 was sent, or None while one lags."""
        survivor, study = f"BN{i:04d}", studies[i]
        at: dict[str, float] = {}
        qido = http.get("/dicomweb/studies", params={"PatientID": survivor})
        if qido.status_code != 200 or [s["0020000D"]["Value"][0] for s in qido.json()] != [study]:
            waiting_on["qido"] += 1
            return None
        at["qido"] = time.perf_counter() - started
        found = _find(ae, dicom, StudyRootQueryRetrieveInformationModelFind, _study_query(survivor))
        if [d.StudyInstanceUID for d in found] != [study]:
            waiting_on["c-find"] += 1
            return None
        at["c-find"] = time.perf_counter() - started
        bundle = http.get("/fhir/Patient", params={"identifier": survivor}).json()
        if not bundle.get("entry"):
            waiting_on["fhir"] += 1
            return None
        ref = f"Patient/{bundle['entry'][0]['resource']['id']}"
        imaging = http.get("/fhir/ImagingStudy", params={"patient": ref}).json()
        observations = http.get("/fhir/Observation", params={"patient": ref}).json()
        if imaging.get("total") != 1 or observations.get("total") != 1:
            waiting_on["fhir"] += 1
            return None
        at["fhir"] = time.perf_counter() - started
        if len(_find(ae, dicom, ModalityWorklistInformationFind, _mwl_query(survivor))) != 1:
            waiting_on["mwl"] += 1
            return None
        at["mwl"] = time.perf_counter() - started
        return at

    def run() -> None:
        client = _Mllp(int(str(serve["mllp"])))
        try:
            for i in range(merges):
                message = a40([(f"BN{i:04d}", f"TMP{i:04d}")], control_id=f"A40{i:04d}")
                started = time.perf_counter()
                assert client.send(message) == "AA"
                acks.append(time.perf_counter() - started)
                n = 1
                while (at := merged(i, started)) is None:
                    n += 1
                    assert time.perf_counter() - started < 30, "the merge never showed"
                visible.append(time.perf_counter() - started)
                polls.append(n)
                for name, t in at.items():
                    per_answer.setdefault(name, []).append(t * 1000)
        finally:
            client.close()

    try:
        benchmark.pedantic(run, rounds=1, iterations=1)  # type: ignore[no-untyped-call]
    finally:
        http.close()

    # DCMTK findscu, as a modality and a workstation ask, sees the last merge too.
    last = f"BN{merges - 1:04d}"
    out = tmp_path / "findscu"
    out.mkdir()
    proc = run_dcmtk(
        ["findscu", "-S", "-aec", "PACSLAB", "-X", "-od", str(out), "-k",
         "QueryRetrieveLevel=STUDY", "-k", f"PatientID={last}", "-k", "StudyInstanceUID",
         "127.0.0.1", str(dicom)]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    found = [pydicom.dcmread(p) for p in out.glob("rsp*.dcm")]
    assert [d.StudyInstanceUID for d in found] == [studies[merges - 1]]
    shutil.rmtree(out)
    out.mkdir()
    mwl = write_query(_mwl_query(last), tmp_path / "mwl.dcm")
    proc = run_dcmtk(
        ["findscu", "-W", "-aec", "PACSLAB", "-X", "-od", str(out), "127.0.0.1", str(dicom),
         str(mwl)]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert len(list(out.glob("rsp*.dcm"))) == 1

    ack_ms = [t * 1000 for t in acks]
    visible_ms = [t * 1000 for t in visible]
    benchmark.extra_info.update(
        merges=merges,
        ack_p50_ms=round(statistics.median(ack_ms), 1),
        ack_p99_ms=round(_percentile(ack_ms, 0.99), 1),
        visible_p50_ms=round(statistics.median(visible_ms), 1),
        visible_p99_ms=round(_percentile(visible_ms, 0.99), 1),
        polls_max=max(polls),
        waiting_on=dict(waiting_on),
        answered_p50_ms={k: round(statistics.median(v), 1) for k, v in per_answer.items()},
        anchor="none (absolute figures)",
    )
    print(
        f"\nA40 x{merges}: ACK p50 {statistics.median(ack_ms):.1f} ms, "
        f"every answer p50 {statistics.median(visible_ms):.1f} ms "
        f"p99 {_percentile(visible_ms, 0.99):.1f} ms "
        f"(polls max {max(polls)}, behind: {dict(waiting_on)})"
    )
    record("A40 → ACK AA, p50 ms", "pacslab", statistics.median(ack_ms), "ms", samples=ack_ms,
           rounds=per_round(ack_ms, 5, statistics.median))  # fmt: skip
    record("A40 → every answer shows the merge, p50 ms", "pacslab",
           statistics.median(visible_ms), "ms", samples=visible_ms,
           rounds=per_round(visible_ms, 5, statistics.median))  # fmt: skip
