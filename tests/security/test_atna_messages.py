"""core/atna.py: A.5.3 event mapping, hostile values, RFC 5424 header fields (pure)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from core.atna import AuditSource, audit_message, event_for, octet_counted, syslog_message
from core.audit import AuditEntry

SOURCE = AuditSource(source_id="PACS", hostname="pacs.example", procid="42")


def _rest(path: str, status: int, method: str = "GET", agent_type: str = "user") -> AuditEntry:
    return AuditEntry(
        action="R",
        event_type="rest",
        outcome="0" if status < 400 else "4",
        outcome_desc=f"HTTP {status}",
        agent="u",
        agent_type=agent_type,  # type: ignore[arg-type]
        resource=path,
        detail=AuditEntry.details({"method": method}),
    )


@pytest.mark.parametrize(
    ("entry", "event"),
    [
        (_rest("/dicomweb/studies", 200), "110112"),
        (_rest("/dicomweb/studies/1.2/series", 200), "110112"),
        (_rest("/dicomweb/studies/1.2/series/3.4/instances", 200), "110112"),
        (_rest("/dicomweb/studies/1.2/metadata", 200), "110103"),
        (_rest("/dicomweb/studies", 200, "POST"), "110104"),
        (_rest("/dicomweb/studies", 401), "110114"),
        (_rest("/fhir/Observation", 429), "110114"),
        (_rest("/viewer/api/share", 200, agent_type="share"), "110106"),
        (_rest("/fhir/AuditEvent", 200), "110101"),
        (_rest("/fhir/ServiceRequest", 200, "POST"), "110109"),
        (_rest("/fhir/Observation", 200), "110110"),
        (_rest("/admin/dicom/destinations/X", 200, "PUT"), "110113"),
        (_rest("/admin/shares", 201, "POST"), "110106"),
        (_rest("/admin/shares/abc", 204, "DELETE"), "110113"),
        (_rest("/admin/shares", 200), "110100"),
        (_rest("/health", 200), "110100"),
        (
            AuditEntry(
                action="C", event_type="dicom.c-store", outcome="0", agent="M", agent_type="ae"
            ),
            "110104",
        ),
        (
            AuditEntry(
                action="E", event_type="dicom.c-find", outcome="0", agent="M", agent_type="ae"
            ),
            "110112",
        ),
        (
            AuditEntry(
                action="R", event_type="dicom.c-move", outcome="0", agent="M", agent_type="ae"
            ),
            "110102",
        ),
        (
            AuditEntry(
                action="R", event_type="dicom.c-store-send", outcome="0", agent="M", agent_type="ae"
            ),
            "110104",
        ),
        (
            AuditEntry(
                action="C", event_type="dicom.mpps", outcome="0", agent="M", agent_type="ae"
            ),
            "110111",
        ),
        (
            AuditEntry(
                action="C", event_type="lab.file", outcome="0", agent="x", agent_type="system"
            ),
            "110110",
        ),
        (
            AuditEntry(
                action="C", event_type="share.create", outcome="0", agent="x", agent_type="user"
            ),
            "110106",
        ),
        (
            AuditEntry(
                action="C", event_type="something.new", outcome="0", agent="x", agent_type="user"
            ),
            "110100",
        ),
    ],
)
def test_event_mapping(entry: AuditEntry, event: str) -> None:
    assert event_for(entry).event_id.code == event
    root = ET.fromstring(audit_message(entry, SOURCE))
    assert root.find("EventIdentification/EventID").get("csd-code") == event  # type: ignore[union-attr]


def test_hostile_values_stay_data() -> None:
    entry = AuditEntry(
        action="Z",
        event_type="rest",
        outcome="99",
        outcome_desc="<b>&",
        agent='"><x/>&amp;\x01\n',
        agent_type="user",
        resource="/fhir/Patient/<script>",
        detail="not json",
    )
    root = ET.fromstring(audit_message(entry, SOURCE))
    ident = root.find("EventIdentification")
    assert ident is not None
    assert ident.get("EventActionCode") == "E" and ident.get("EventOutcomeIndicator") == "8"
    # markup escaped, a character XML does not allow dropped, a newline kept (&#10;)
    assert root.find("ActiveParticipant").get("UserID") == '"><x/>&amp;\n'  # type: ignore[union-attr]
    assert root.find("EventIdentification/EventOutcomeDescription").text == "<b>&"  # type: ignore[union-attr]
    # header fields are PRINTUSASCII without spaces (RFC 5424 6): no injection there
    msg = syslog_message(entry, AuditSource(hostname="a b\nc", app_name="", procid="1"))
    assert msg.split(b" ")[2:6] == [b"a_b_c", b"-", b"1", b"IHE+RFC-3881"]
    assert msg.startswith(b"<84>1 ")
    framed = octet_counted(msg)
    length, _, rest = framed.partition(b" ")
    assert int(length) == len(rest) == len(msg)


@pytest.mark.parametrize(
    ("event_type", "event", "type_code"),
    [
        ("export", "110106", None),
        ("dicom.association-rejected", "110114", "110122"),
        ("dicom.tls-failed", "110113", "110126"),
        ("hl7.adt", "110110", None),
        ("patient.merge", "110110", None),
        ("patient.undo", "110110", None),
        ("order.patient-merged", "110109", None),
    ],
)
def test_lifecycle_events(event_type: str, event: str, type_code: str | None) -> None:
    mapped = event_for(
        AuditEntry(action="U", event_type=event_type, outcome="0", agent="x", agent_type="system")
    )
    assert mapped.event_id.code == event
    assert (mapped.type_code.code if mapped.type_code else None) == type_code


def test_patient_change_names_every_patient_it_involves() -> None:
    """A merge's message has the obsolete and the surviving patient (keyed references);
    an undo's "before" names the change, not a patient."""
    surviving, obsolete, change = "a" * 32, "b" * 32, "c" * 32
    merge = AuditEntry(
        action="U", event_type="patient.merge", outcome="0", agent="HIS", agent_type="system",
        resource=f"PatientChange/{change}", patient_key=surviving,
        detail=AuditEntry.details({"change": change,
                                   "before": {"obsolete": obsolete, "surviving": surviving},
                                   "after": {"patient": surviving, "replaces": obsolete}}),
    )  # fmt: skip
    root = ET.fromstring(audit_message(merge, SOURCE))
    people = [o.get("ParticipantObjectID") for o in root.findall("ParticipantObjectIdentification")
              if o.get("ParticipantObjectTypeCode") == "1"]  # fmt: skip
    assert people == [surviving, obsolete]
    undo = AuditEntry(
        action="U", event_type="patient.undo", outcome="0", agent="u", agent_type="user",
        patient_key=obsolete,
        detail=AuditEntry.details({"before": {"change": change},
                                   "after": {"patients": [obsolete, surviving]}}),
    )  # fmt: skip
    root = ET.fromstring(audit_message(undo, SOURCE))
    people = [o.get("ParticipantObjectID") for o in root.findall("ParticipantObjectIdentification")
              if o.get("ParticipantObjectTypeCode") == "1"]  # fmt: skip
    assert people == [obsolete, surviving]


def test_a_transfer_names_its_study_and_sop_classes_with_counts() -> None:
    """The C-STORE entry of an association and study becomes one PS3.15 A.5.3 DICOM
    Instances Transferred message: the study, each SOP Class with NumberOfInstances."""
    from ingest.store_audit import StoreKey, TransferSummary

    summary = TransferSummary(StoreKey("cid1", "CT_ROOM_1", "1.2.3", "k" * 32,
                                       "0x0000 stored"), opened=0.0)
    summary.sop_classes.update({"1.2.840.10008.5.1.4.1.1.2": 3,
                                "1.2.840.10008.5.1.4.1.1.7": 1})
    root = ET.fromstring(audit_message(summary.entry(), SOURCE))
    assert root.find("EventIdentification/EventID").get("csd-code") == "110104"  # type: ignore[union-attr]
    (study,) = [o for o in root.findall("ParticipantObjectIdentification")
                if o.get("ParticipantObjectTypeCode") == "2"]  # fmt: skip
    assert study.get("ParticipantObjectID") == "1.2.3"
    assert [(c.get("UID"), c.get("NumberOfInstances")) for c in study.findall("SOPClass")] == [
        ("1.2.840.10008.5.1.4.1.1.2", "3"), ("1.2.840.10008.5.1.4.1.1.7", "1")]
    requestor = root.find("ActiveParticipant")
    assert requestor is not None and requestor.get("AlternativeUserID") == "AETITLE=CT_ROOM_1"
