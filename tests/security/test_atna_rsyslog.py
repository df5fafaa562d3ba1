"""ATNA (issue 17 item 5): audit messages received by a real syslog daemon and parsed.

Debian ``rsyslogd`` listens on loopback (tests/security/rsyslog_peer.py) and writes
what it receives, with its own parse of the RFC 5424 header, to a file. Over TLS
(RFC 5425, mutual authentication with a test CA): DCMTK ``storescu`` stores an
instance in the in-process receiver, an API client runs a QIDO-RS query, a wrong
token is refused, and a share link is created and used. Each arrives as an RFC 5424
message whose MSG is a DICOM audit message (PS3.15 A.5.1) of the right A.5.3 event,
checked element by element against the schema's structure; no Patient ID is in any
of them. Plain TCP (RFC 6587 octet counting) and UDP (RFC 5426) carry them too, and
a sender whose collector is away drops and counts instead of blocking, then
delivers once the collector is back.
"""

from __future__ import annotations

import base64
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydicom import dcmread

from core.audit import AuditEntry
from core.settings import AtnaSettings, Settings
from core.synthetic import write_ct_series
from tests.security.rsyslog_peer import Collector, rsyslog
from tests.support import Receiver, free_port, run_dcmtk, wait_until

pytestmark = pytest.mark.network

HEADER = re.compile(
    r"^<(?P<pri>\d{1,3})>1 (?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z) "
    r"(?P<host>[!-~]{1,255}) (?P<app>[!-~]{1,48}) (?P<procid>[!-~]{1,128}) "
    r"(?P<msgid>[!-~]{1,32}) - (?P<msg><\?xml .*)$"
)


@pytest.fixture(params=["tls"])
def collector(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Collector]:
    with rsyslog(request.param, tmp_path / "rsyslog") as c:
        yield c


def _atna(c: Collector) -> AtnaSettings:
    tls = {}
    if c.pki is not None:
        tls = {
            "ca_file": c.pki.ca,
            "client_cert": c.pki.client_cert,
            "client_key": c.pki.client_key,
        }
    return AtnaSettings(url=c.url, source_id="PACSLAB-TEST", enterprise_site="BV-TEST", **tls)


@pytest.fixture
def settings(settings: Settings, collector: Collector) -> Settings:
    """The shared settings, sending ATNA to the collector."""
    settings.audit.atna = _atna(collector)
    return settings


def _coded(el: ET.Element | None, code: str | None = None) -> dict[str, str]:
    assert el is not None
    for attr in ("csd-code", "codeSystemName", "originalText"):
        assert el.get(attr), (el.tag, attr)  # PS3.15 A.5.1 CodedValueType: all required
    if code is not None:
        assert el.get("csd-code") == code, (el.tag, el.attrib)
    return dict(el.attrib)


def check_audit_message(root: ET.Element) -> None:
    """The structure of PS3.15 A.5.1's schema: element order, required attributes, codes."""
    assert root.tag == "AuditMessage"
    tags = [child.tag for child in root]
    # EventIdentification, ActiveParticipant+, AuditSourceIdentification,
    # ParticipantObjectIdentification*: in this order.
    assert re.fullmatch(
        r"E(A)+S(P)*",
        "".join(
            {
                "EventIdentification": "E",
                "ActiveParticipant": "A",
                "AuditSourceIdentification": "S",
                "ParticipantObjectIdentification": "P",
            }.get(t, "?")
            for t in tags
        ),
    ), tags
    ident = root[0]
    assert ident.get("EventActionCode") in {"C", "R", "U", "D", "E"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", ident.get("EventDateTime", ""))
    assert ident.get("EventOutcomeIndicator") in {"0", "4", "8", "12"}
    assert ident[0].tag == "EventID"
    assert _coded(ident[0])["codeSystemName"] == "DCM"
    for t in ident.findall("EventTypeCode"):
        _coded(t)
    for ap in root.findall("ActiveParticipant"):
        assert ap.get("UserID")
        assert ap.get("UserIsRequestor") in {"true", "false"}
        if ap.get("NetworkAccessPointID"):
            assert ap.get("NetworkAccessPointTypeCode") in {"1", "2"}
        for role in ap.findall("RoleIDCode"):
            _coded(role)
    assert [ap.get("UserIsRequestor") for ap in root.findall("ActiveParticipant")].count(
        "true"
    ) == 1
    source = root.find("AuditSourceIdentification")
    assert source is not None and source.get("AuditSourceID") == "PACSLAB-TEST"
    assert source.get("AuditEnterpriseSiteID") == "BV-TEST"
    _coded(source.find("AuditSourceTypeCode"))
    for obj in root.findall("ParticipantObjectIdentification"):
        assert obj.get("ParticipantObjectID")
        assert obj.get("ParticipantObjectTypeCode") in {"1", "2", "3", "4"}
        _coded(obj.find("ParticipantObjectIDTypeCode"))


def _parsed(c: Collector) -> list[tuple[dict[str, str], ET.Element]]:
    out = []
    for m in c.messages():
        # rsyslog's own parse of the header: RFC 5424, not a legacy BSD message
        assert m["version"] == "1" and m["app"] == "pacslab" and m["msgid"] == "IHE+RFC-3881"
        head = HEADER.match(m["raw"])
        assert head, m["raw"][:200]
        root = ET.fromstring(head["msg"].encode())
        check_audit_message(root)
        out.append((head.groupdict(), root))
    return out


def _event(root: ET.Element) -> str:
    return str(root.find("EventIdentification/EventID").get("csd-code"))  # type: ignore[union-attr]


def _objects(root: ET.Element) -> dict[str, ET.Element]:
    return {
        str(o.find("ParticipantObjectIDTypeCode").get("csd-code")): o  # type: ignore[union-attr]
        for o in root.findall("ParticipantObjectIdentification")
    }


def test_atna_over_tls_to_rsyslog(
    settings: Settings, collector: Collector, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    receiver: Receiver = request.getfixturevalue("receiver")
    client: TestClient = request.getfixturevalue("client")
    token: Callable[..., str] = request.getfixturevalue("token")
    path = write_ct_series(tmp_path / "ct", slices=1, rows=32, columns=32)[0]
    ds = dcmread(path, stop_before_pixels=True)
    study, patient_id = str(ds.StudyInstanceUID), str(ds.PatientID)

    # 1. C-STORE from DCMTK (PS3.4 B; PS3.15 A.5.3 DICOM Instances Transferred)
    out = run_dcmtk(["storescu", "-aet", "MODALITY1", "127.0.0.1", str(receiver.port), str(path)])
    assert out.returncode == 0, out.stderr
    # 2. QIDO-RS query (A.5.3.10 Query)
    reader = token("imaging.read")
    r = client.get(
        f"/dicomweb/studies?PatientID={patient_id}", headers={"Authorization": f"Bearer {reader}"}
    )
    assert r.status_code in (200, 204), r.text
    # 3. a failed login (A.5.3.12 User Authentication, outcome 4)
    assert (
        client.get(
            "/dicomweb/studies", headers={"Authorization": "Bearer nope.nope.nope"}
        ).status_code
        == 401
    )
    # 4. a share link made and used (A.5.3.6 Export)
    share_headers = {"Authorization": f"Bearer {token('imaging.share')}"}

    def share_made() -> Any:
        r = client.post(
            "/admin/shares", json={"study_uid": study, "expires_in": 600}, headers=share_headers
        )
        return r if r.status_code == 201 else None

    made = wait_until(share_made, timeout=20, message="the stored study was not indexed")
    share_id = made.json()["id"]
    share_token = made.json()["url"].split("#token=", 1)[1]
    assert (
        client.get(
            "/viewer/api/share", headers={"Authorization": f"Bearer {share_token}"}
        ).status_code
        == 200
    )

    # The share's use is the last request made: when it is in, so is everything before
    # it (one sender per process; the C-STORE's came from the receiver's own).
    wanted = {"110104", "110112", "110114", "110106"}

    def everything() -> bool:
        got = _parsed(collector)
        users = {ap.get("UserID") for _, r in got for ap in r.findall("ActiveParticipant")}
        return wanted <= {_event(r) for _, r in got} and f"share:{share_id}" in users

    wait_until(
        everything,
        timeout=30,
        message=lambda: f"events received: {[_event(r) for _, r in _parsed(collector)]}",
    )
    messages = _parsed(collector)
    raw = "\n".join(m["raw"] for m in collector.messages())
    assert patient_id not in raw  # only the keyed patient reference travels

    def find(event: str, pred: Callable[[ET.Element], bool]) -> tuple[dict[str, str], ET.Element]:
        hits = [(h, root) for h, root in messages if _event(root) == event and pred(root)]
        assert hits, (event, [_event(r) for _, r in messages])
        return hits[0]

    # C-STORE: the modality sent (Source, requestor), we received (Destination)
    head, store = find(
        "110104",
        lambda r: any(ap.get("UserID") == "MODALITY1" for ap in r.findall("ActiveParticipant")),
    )
    assert store.find("EventIdentification").get("EventActionCode") == "C"  # type: ignore[union-attr]
    assert head["pri"] == str(10 * 8 + 5)  # authpriv.notice: a success
    roles = {
        ap.get("UserID"): ap.find("RoleIDCode").get("csd-code")  # type: ignore[union-attr]
        for ap in store.findall("ActiveParticipant")
    }
    assert roles == {"MODALITY1": "110153", "PACSLAB-TEST": "110152"}
    modality = next(
        ap for ap in store.findall("ActiveParticipant") if ap.get("UserID") == "MODALITY1"
    )
    assert modality.get("UserIsRequestor") == "true"
    assert modality.get("AlternativeUserID") == "AETITLE=MODALITY1"
    objs = _objects(store)
    assert objs["110180"].get("ParticipantObjectID") == study
    # the association's one instance, counted under its SOP Class (ingest/store_audit.py)
    assert [(c.get("UID"), c.get("NumberOfInstances"))
            for c in objs["110180"].findall("SOPClass")] == [(str(ds.SOPClassUID), "1")]
    patient = objs["2"]
    assert patient.get("ParticipantObjectTypeCode") == "1"
    assert patient.get("ParticipantObjectTypeCodeRole") == "1"
    assert re.fullmatch(r"[0-9a-f]{32}", patient.get("ParticipantObjectID", ""))

    # QIDO-RS: the query's keys (never their values) in ParticipantObjectQuery
    _, query = find(
        "110112",
        lambda r: any(ap.get("UserID") == "dr.tester" for ap in r.findall("ActiveParticipant")),
    )
    q = query.find("ParticipantObjectIdentification/ParticipantObjectQuery")
    assert q is not None and json.loads(base64.b64decode(q.text or ""))["query"] == ["PatientID"]
    assert _objects(query)["2"].get("ParticipantObjectID") == patient.get("ParticipantObjectID")

    # the refused token: User Authentication / Login, failed, at warning severity
    head, login = find("110114", lambda r: True)
    ident = login.find("EventIdentification")
    assert ident is not None and ident.get("EventOutcomeIndicator") == "4"
    assert _coded(ident.find("EventTypeCode"), "110122")["originalText"] == "Login"
    assert head["pri"] == str(10 * 8 + 4)
    requestor = next(
        ap for ap in login.findall("ActiveParticipant") if ap.get("UserIsRequestor") == "true"
    )
    assert requestor.get("NetworkAccessPointID") == "testclient"

    # the share link: made by dr.tester, used by share:<id>, about the study
    _, use = find(
        "110106",
        lambda r: any(
            ap.get("UserID") == f"share:{share_id}" for ap in r.findall("ActiveParticipant")
        ),
    )
    assert any(
        ap.get("UserID") == "dr.tester"
        for _, r in messages
        if _event(r) == "110106"
        for ap in r.findall("ActiveParticipant")
    )
    assert use.find("EventIdentification").get("EventOutcomeIndicator") == "0"  # type: ignore[union-attr]

    # in addition to the hash-chained log, not instead of it
    audit: Any = client.app.state.audit  # type: ignore[attr-defined]
    assert audit.flush()
    assert audit.search(agent=f"share:{share_id}")
    assert audit.atna.dropped == 0 and audit.atna.sent >= 3
    metrics = client.get("/metrics", headers={"Authorization": f"Bearer {token('admin')}"})
    assert re.search(r"^pacslab_atna_dropped_total 0$", metrics.text, re.M)


@pytest.mark.parametrize("collector", ["tcp", "udp"], indirect=True)
def test_atna_over_tcp_and_udp(
    collector: Collector, client: TestClient, token: Callable[..., str]
) -> None:
    assert (
        client.get("/dicomweb/studies", headers={"Authorization": "Bearer x.y.z"}).status_code
        == 401
    )
    assert client.get(
        "/dicomweb/studies?AccessionNumber=A1",
        headers={"Authorization": f"Bearer {token('imaging.read')}"},
    ).status_code in (200, 204)
    wait_until(
        lambda: {"110114", "110112"} <= {_event(r) for _, r in _parsed(collector)},
        timeout=30,
        message=lambda: str(collector.messages()),
    )


def _entry(i: int) -> AuditEntry:
    return AuditEntry(
        action="R",
        event_type="dicom.c-find",
        outcome="0",
        agent=f"AE{i}",
        agent_type="ae",
        source="127.0.0.1",
        resource="SOPClass/1.2.3",
        detail=AuditEntry.details({"sop_class_uid": "1.2.3", "matches": i}),
    )


def test_collector_away_then_back(tmp_path: Path) -> None:
    """Entries never block: beyond the queue they are dropped and counted; the rest arrive."""
    from storage.syslog import SyslogSender

    port = free_port()
    sender = SyslogSender(
        AtnaSettings(
            url=f"tcp://127.0.0.1:{port}",
            queue_max=3,
            backoff_max_s=0.5,
            source_id="PACSLAB-TEST",
            enterprise_site="BV-TEST",
        )
    )
    try:
        for i in range(20):
            sender.submit(_entry(i))  # nothing listens: returns at once, never raises
        wait_until(lambda: sender.failures >= 1, timeout=20)
        # one in the sender's hand, three queued: the others were dropped and counted
        assert sender.dropped >= 20 - 1 - 3
        assert "pacslab_atna_dropped_total" in sender.exposition()
        with rsyslog("tcp", tmp_path / "late", port=port) as c:
            assert sender.flush(timeout=30)
            wait_until(lambda: len(c.messages()) >= 20 - sender.dropped, timeout=30)
            assert {_event(r) for _, r in _parsed(c)} == {"110112"}
            assert sender.sent == 20 - sender.dropped
    finally:
        sender.close(timeout=1)


def test_atna_for_refused_associations_and_patient_changes(
    settings: Settings, collector: Collector, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Issue 17 gaps: an association refused for its calling AE title (DCMTK ``echoscu``
    on the fast path, ``findscu`` through pynetdicom) and a patient merge reach rsyslog as
    PS3.15 A.5.3 User Authentication (Login, failed) and Patient Record messages, the
    merge with both patients as participant objects (keyed, never the Patient ID), as
    the hash-chained log records them."""
    from core.patients import Demographics, MergePatients, PatientRef, UpdatePatient

    settings.dicom.allowed_calling_aes = ["MODALITY1"]
    receiver: Receiver = request.getfixturevalue("receiver")
    client: TestClient = request.getfixturevalue("client")
    for tool in (["echoscu"], ["findscu", "-S", "-k", "QueryRetrieveLevel=STUDY"]):
        out = run_dcmtk([*tool, "-aet", "INTRUDER", "127.0.0.1", str(receiver.port)])
        assert out.returncode != 0  # A-ASSOCIATE-RJ
    patients: Any = client.app.state.patients  # type: ignore[attr-defined]
    for pid, name in (("ATNA-1", "MOT^A"), ("ATNA-2", "HAI^B")):
        patients.apply(UpdatePatient(PatientRef(pid), Demographics(name=name)),
                       source="api", agent="tester")  # fmt: skip
    merge = patients.apply(MergePatients(PatientRef("ATNA-1"), PatientRef("ATNA-2")),
                           source="api", agent="tester")  # fmt: skip

    def arrived() -> bool:
        got = _parsed(collector)
        refused = [r for _, r in got if _event(r) == "110114"
                   and any(ap.get("UserID") == "INTRUDER" for ap in r.findall("ActiveParticipant"))]
        merged = [r for _, r in got if _event(r) == "110110"
                  and any(o.get("ParticipantObjectID") == f"PatientChange/{merge.change_id}"
                          for o in r.findall("ParticipantObjectIdentification"))]  # fmt: skip
        return len(refused) >= 2 and bool(merged)

    wait_until(arrived, timeout=30,
               message=lambda: f"events received: {[_event(r) for _, r in _parsed(collector)]}")
    messages = _parsed(collector)
    raw = "\n".join(m["raw"] for m in collector.messages())
    assert "ATNA-1" not in raw and "ATNA-2" not in raw and "MOT^A" not in raw
    refused = [(h, r) for h, r in messages if _event(r) == "110114"]
    for head, root in refused:
        ident = root.find("EventIdentification")
        assert ident is not None and ident.get("EventOutcomeIndicator") == "4"
        assert _coded(ident.find("EventTypeCode"), "110122")["originalText"] == "Login"
        assert head["pri"] == str(10 * 8 + 4)
        intruder = next(ap for ap in root.findall("ActiveParticipant")
                        if ap.get("UserIsRequestor") == "true")  # fmt: skip
        assert intruder.get("UserID") == "INTRUDER"
        assert intruder.get("AlternativeUserID") == "AETITLE=INTRUDER"
        assert intruder.get("NetworkAccessPointID", "").startswith("127.0.0.1")
    (merged,) = [r for _, r in messages if _event(r) == "110110"
                 and any(o.get("ParticipantObjectID") == f"PatientChange/{merge.change_id}"
                         for o in r.findall("ParticipantObjectIdentification"))]  # fmt: skip
    assert merged.find("EventIdentification").get("EventActionCode") == "U"  # type: ignore[union-attr]
    people = [o for o in merged.findall("ParticipantObjectIdentification")
              if o.get("ParticipantObjectTypeCode") == "1"]  # fmt: skip
    assert len(people) == 2  # the surviving and the obsolete patient
    assert all(o.get("ParticipantObjectTypeCodeRole") == "1" for o in people)
    assert all(re.fullmatch(r"[0-9a-f]{32}", o.get("ParticipantObjectID", "")) for o in people)
    # The hash-chained log has the same entries (ATNA is a copy, not instead).
    # The refusals were recorded by the receiver's own log, whose writer commits its
    # batch in the background after ATNA has the copy: wait for that commit.
    audit: Any = client.app.state.audit  # type: ignore[attr-defined]
    assert audit.flush()
    wait_until(lambda: audit.search(agent="INTRUDER"), timeout=30,
               message="the receiver's refusals are not in the hash-chained log")
