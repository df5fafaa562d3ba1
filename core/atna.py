"""ATNA audit messages: the action log's entries as DICOM PS3.15 A.5 XML in RFC 5424 syslog.

Pure functions (no sockets): :func:`audit_message` maps one :class:`core.audit.AuditEntry`
to an ``AuditMessage`` of the DICOM audit schema (PS3.15 A.5.1: EventIdentification,
ActiveParticipant, AuditSourceIdentification, ParticipantObjectIdentification) with
the event of PS3.15 A.5.3 it stands for (:func:`event_for`); :func:`syslog_message`
wraps it in an RFC 5424 message as IHE ITI TF-2 3.20.4.2 asks (facility 10
security/authorization, ``MSGID`` ``IHE+RFC-3881``, no structured data, no BOM per
ITI CP-477); :func:`octet_counted` frames it for a stream (RFC 5425 4.3, RFC 6587 3.4.1).
The sender is :mod:`storage.syslog`.

Patients appear only as the keyed reference the action log already keeps
(:func:`core.audit.patient_key`), never as a Patient ID or name: the collector is
another system, and whoever needs the identity computes the key with the
installation's secret (Circular 13/2025: the least PHI needed).
"""

from __future__ import annotations

import base64
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Final

from core.audit import AuditEntry

__all__ = [
    "AtnaEvent",
    "AuditSource",
    "audit_message",
    "event_for",
    "octet_counted",
    "syslog_message",
]

#: IHE ITI TF-2 3.20.4.2.1: the MSGID of an RFC 3881 / DICOM audit message.
MSGID: Final = "IHE+RFC-3881"
#: RFC 5424 6.2.1 facility 10: security/authorization messages.
FACILITY: Final = 10


@dataclass(frozen=True, slots=True)
class Code:
    """A coded value of the schema (``csd-code``, ``codeSystemName``, ``originalText``)."""

    code: str
    system: str
    text: str


def _dcm(code: str, text: str) -> Code:
    return Code(code, "DCM", text)


# PS3.16 CID 400 Audit Event ID (PS3.15 A.5.3).
APPLICATION_ACTIVITY: Final = _dcm("110100", "Application Activity")
AUDIT_LOG_USED: Final = _dcm("110101", "Audit Log Used")
BEGIN_TRANSFERRING: Final = _dcm("110102", "Begin Transferring DICOM Instances")
INSTANCES_ACCESSED: Final = _dcm("110103", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED: Final = _dcm("110104", "DICOM Instances Transferred")
STUDY_DELETED: Final = _dcm("110105", "DICOM Study Deleted")
EXPORT: Final = _dcm("110106", "Export")
ORDER_RECORD: Final = _dcm("110109", "Order Record")
PATIENT_RECORD: Final = _dcm("110110", "Patient Record")
PROCEDURE_RECORD: Final = _dcm("110111", "Procedure Record")
QUERY: Final = _dcm("110112", "Query")
SECURITY_ALERT: Final = _dcm("110113", "Security Alert")
USER_AUTHENTICATION: Final = _dcm("110114", "User Authentication")
# CID 401-404 event type codes used here.
LOGIN: Final = _dcm("110122", "Login")
NODE_AUTHENTICATION: Final = _dcm("110126", "Node Authentication")
SECURITY_CONFIGURATION: Final = _dcm("110129", "Security Configuration")
OBJECT_SECURITY_CHANGED: Final = _dcm("110135", "Object Security Attributes Changed")
# CID 402 Audit Active Participant Role ID.
ROLE_APPLICATION: Final = _dcm("110150", "Application")
ROLE_DESTINATION: Final = _dcm("110152", "Destination Role ID")
ROLE_SOURCE: Final = _dcm("110153", "Source Role ID")
# Participant object ID types (PS3.15 A.5.2.5; RFC 3881 5.5.4 and CID 404).
PATIENT_NUMBER: Final = Code("2", "RFC-3881", "Patient Number")
URI: Final = Code("12", "RFC-3881", "URI")
STUDY_UID: Final = _dcm("110180", "Study Instance UID")
SOP_CLASS_UID: Final = _dcm("110181", "SOP Class UID")
#: AuditSourceTypeCode 4 (RFC 3881 5.4.3): application server process.
APPLICATION_SERVER: Final = Code("4", "DCM", "Application Server Process")


@dataclass(frozen=True, slots=True)
class AtnaEvent:
    """The A.5.3 event an action stands for, and who was where in it."""

    event_id: Code
    type_code: Code | None = None
    #: The requestor sent data to us (a store) rather than received it from us.
    requestor_is_source: bool = False


@dataclass(frozen=True, slots=True)
class AuditSource:
    """Who reports (AuditSourceIdentification) and the syslog header's identity."""

    source_id: str = "pacslab"
    enterprise_site: str = ""
    hostname: str = "-"
    app_name: str = "pacslab"
    procid: str = "-"


_QIDO: Final = re.compile(
    r"^/dicomweb/(studies|series|instances)$|"
    r"^/dicomweb/studies/[^/]+/(series|instances)$|"
    r"^/dicomweb/studies/[^/]+/series/[^/]+/instances$"
)


def _rest_event(entry: AuditEntry, detail: dict[str, object]) -> AtnaEvent:
    path, method = entry.resource, str(detail.get("method", "GET")).upper()
    if entry.outcome_desc in ("HTTP 401", "HTTP 429"):
        # Credentials missing, refused, or too many wrong ones: a failed login.
        return AtnaEvent(USER_AUTHENTICATION, LOGIN)
    if entry.agent_type == "share":
        # A share link hands study data to someone outside, without an account.
        return AtnaEvent(EXPORT)
    if path.startswith("/dicomweb/") and method == "POST":
        return AtnaEvent(INSTANCES_TRANSFERRED, requestor_is_source=True)  # STOW-RS
    if _QIDO.match(path):
        return AtnaEvent(QUERY)
    if path.startswith(("/dicomweb/", "/wado", "/iiif/", "/dzi/", "/viewer/api/")):
        return AtnaEvent(INSTANCES_ACCESSED)
    if path.startswith("/fhir/AuditEvent"):
        return AtnaEvent(AUDIT_LOG_USED)
    if path.startswith("/fhir/ServiceRequest"):
        return AtnaEvent(ORDER_RECORD)
    if path.startswith("/fhir/"):
        return AtnaEvent(PATIENT_RECORD)
    if path.startswith("/admin/shares") and method in ("POST", "DELETE"):
        # As the share service's own entries: a link made is an export, a revocation
        # changes who may read the study.
        return (
            AtnaEvent(EXPORT)
            if method == "POST"
            else AtnaEvent(SECURITY_ALERT, OBJECT_SECURITY_CHANGED)
        )
    if path.startswith("/admin/") and method != "GET":
        return AtnaEvent(SECURITY_ALERT, SECURITY_CONFIGURATION)
    return AtnaEvent(APPLICATION_ACTIVITY)


#: The action log's ``event_type`` values (api/audit.py, ingest/, services/) and the
#: A.5.3 event each one is.
_BY_TYPE: Final = {
    "dicom.c-store": AtnaEvent(INSTANCES_TRANSFERRED, requestor_is_source=True),
    "dicom.c-find": AtnaEvent(QUERY),
    "dicom.c-get": AtnaEvent(INSTANCES_TRANSFERRED),
    "dicom.c-move": AtnaEvent(BEGIN_TRANSFERRING),
    "dicom.c-store-send": AtnaEvent(INSTANCES_TRANSFERRED),
    "dicom.forward": AtnaEvent(INSTANCES_TRANSFERRED),
    "dicom.mpps": AtnaEvent(PROCEDURE_RECORD),
    "dicom.storage-commitment": AtnaEvent(INSTANCES_ACCESSED),
    "hl7.order": AtnaEvent(ORDER_RECORD, requestor_is_source=True),
    "lab.file": AtnaEvent(PATIENT_RECORD, requestor_is_source=True),
    "lab.link": AtnaEvent(PATIENT_RECORD, requestor_is_source=True),
    "lab.resolve": AtnaEvent(PATIENT_RECORD),
    "sign": AtnaEvent(PATIENT_RECORD),
    "retention.delete": AtnaEvent(STUDY_DELETED),
    "share.create": AtnaEvent(EXPORT),
    "share.revoke": AtnaEvent(SECURITY_ALERT, OBJECT_SECURITY_CHANGED),
    "export": AtnaEvent(EXPORT),
    # A calling AE title we do not accept is a failed login of a node (as a REST 401
    # is); a TLS handshake that fails is a node authentication failure.
    "dicom.association-rejected": AtnaEvent(USER_AUTHENTICATION, LOGIN),
    "dicom.tls-failed": AtnaEvent(SECURITY_ALERT, NODE_AUTHENTICATION),
    # Patient identity (IHE PIR, issue 17): each change is a Patient Record event with
    # the patients involved as participant objects (see _patient_keys).
    "hl7.adt": AtnaEvent(PATIENT_RECORD, requestor_is_source=True),
    "patient.update": AtnaEvent(PATIENT_RECORD),
    "patient.merge": AtnaEvent(PATIENT_RECORD),
    "patient.change-identifier": AtnaEvent(PATIENT_RECORD),
    "patient.undo": AtnaEvent(PATIENT_RECORD),
    "order.patient-merged": AtnaEvent(ORDER_RECORD),
    # IHE IOCM: a rejection changes what may be read; a purge deletes.
    "iocm.reject": AtnaEvent(INSTANCES_ACCESSED),
    "iocm.purge": AtnaEvent(STUDY_DELETED),
}


def _detail(entry: AuditEntry) -> dict[str, object]:
    try:
        value = json.loads(entry.detail or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def event_for(entry: AuditEntry) -> AtnaEvent:
    """The PS3.15 A.5.3 event of an action-log entry (Application Activity if none fits)."""
    if entry.event_type == "rest":
        return _rest_event(entry, _detail(entry))
    found = _BY_TYPE.get(entry.event_type)
    if found is not None:
        return found
    if entry.event_type.startswith("dicom.") and entry.event_type.endswith("-send"):
        return AtnaEvent(INSTANCES_TRANSFERRED)
    return AtnaEvent(APPLICATION_ACTIVITY)


_KEY: Final = re.compile(r"[0-9a-f]{32}")


def _patient_keys(entry: AuditEntry, detail: dict[str, object]) -> list[str]:
    """The keyed references of the patients an entry is about: its own, and for a
    patient identity change (``patient.*``, ``order.patient-merged``) every patient of
    its before/after (a merge names the obsolete and the surviving patient)."""
    keys = [entry.patient_key] if entry.patient_key else []
    if entry.event_type.startswith("patient.") or entry.event_type == "order.patient-merged":
        for side in ("before", "after"):
            values = detail.get(side)
            if not isinstance(values, dict):
                continue
            for name, value in values.items():
                if name == "change":  # an undo's "before" names the change, not a patient
                    continue
                for item in value if isinstance(value, list) else [value]:
                    if isinstance(item, str) and _KEY.fullmatch(item) and item not in keys:
                        keys.append(item)
    return keys


def _code(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    return ET.SubElement(
        parent,
        tag,
        {"csd-code": code.code, "codeSystemName": code.system, "originalText": code.text},
    )


_OUTCOMES: Final = frozenset({"0", "4", "8", "12"})
#: Events where data moves between the two participants (source and destination roles).
_TRANSFERS: Final = (INSTANCES_TRANSFERRED, BEGIN_TRANSFERRING, EXPORT)
_ACTIONS: Final = frozenset({"C", "R", "U", "D", "E"})


def audit_message(entry: AuditEntry, source: AuditSource) -> bytes:
    """The DICOM audit message (PS3.15 A.5.1 schema) of one entry, UTF-8 XML, one line.

    * EventIdentification: action (C R U D E), time, outcome (0 4 8 12), the A.5.3
      EventID and EventTypeCode, and the entry's outcome text.
    * ActiveParticipant: the requestor (user, API key, share or calling AE, with its
      network address) and this application; their roles say who sent the data.
    * AuditSourceIdentification: this installation (``source``).
    * ParticipantObjectIdentification: the study or resource (its UID or path; a
      transfer's SOP Classes and their instance counts), the query's SOP Class for
      C-FIND, and the patient's keyed reference.
    """
    event = event_for(entry)
    stamped = entry.stamped()
    detail = _detail(stamped)
    root = ET.Element("AuditMessage")
    ident = ET.SubElement(
        root,
        "EventIdentification",
        {
            "EventActionCode": stamped.action if stamped.action in _ACTIONS else "E",
            "EventDateTime": stamped.recorded,
            "EventOutcomeIndicator": stamped.outcome if stamped.outcome in _OUTCOMES else "8",
        },
    )
    _code(ident, "EventID", event.event_id)
    if event.type_code is not None:
        _code(ident, "EventTypeCode", event.type_code)
    if stamped.outcome_desc:
        ET.SubElement(ident, "EventOutcomeDescription").text = stamped.outcome_desc

    requestor = ET.SubElement(
        root,
        "ActiveParticipant",
        {
            "UserID": stamped.agent or "anonymous",
            "UserIsRequestor": "true",
            **(
                {"NetworkAccessPointID": stamped.source, "NetworkAccessPointTypeCode": "2"}
                if stamped.source
                else {}
            ),
        },
    )
    if stamped.agent_type == "ae":
        requestor.set("AlternativeUserID", f"AETITLE={stamped.agent}")
    ours = ET.SubElement(
        root,
        "ActiveParticipant",
        {
            "UserID": source.source_id,
            "AlternativeUserID": source.procid,
            "UserIsRequestor": "false",
            **(
                {"NetworkAccessPointID": source.hostname, "NetworkAccessPointTypeCode": "1"}
                if source.hostname != "-"
                else {}
            ),
        },
    )
    if event.requestor_is_source or event.event_id in _TRANSFERS:
        src, dst = (requestor, ours) if event.requestor_is_source else (ours, requestor)
        _code(src, "RoleIDCode", ROLE_SOURCE)
        _code(dst, "RoleIDCode", ROLE_DESTINATION)
    else:
        _code(ours, "RoleIDCode", ROLE_APPLICATION)

    audit_source = ET.SubElement(
        root, "AuditSourceIdentification", {"AuditSourceID": source.source_id}
    )
    if source.enterprise_site:
        audit_source.set("AuditEnterpriseSiteID", source.enterprise_site)
    _code(audit_source, "AuditSourceTypeCode", APPLICATION_SERVER)

    study = str(detail.get("study_instance_uid") or detail.get("study") or "")
    resource = stamped.resource
    if not study and resource.startswith(("Study/", "studies/")):
        study = resource.split("/", 1)[1]
    if not study:
        m = re.match(r"^/(?:dicomweb|viewer/api)/studies/([0-9.]+)(?:/|$)", resource)
        study = m.group(1) if m else ""
    if study:
        obj = ET.SubElement(
            root,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": study,
                "ParticipantObjectTypeCode": "2",
                "ParticipantObjectTypeCodeRole": "3",
            },
        )
        _code(obj, "ParticipantObjectIDTypeCode", STUDY_UID)
        # Instances Transferred: the transfer's SOP Classes, each with its number of
        # instances (the C-STORE entry of an association and study, ingest/store_audit.py).
        sop_classes = detail.get("sop_classes")
        if isinstance(sop_classes, dict):
            for uid, count in sorted(sop_classes.items()):
                ET.SubElement(obj, "SOPClass",
                              {"UID": str(uid), "NumberOfInstances": str(int(count))})
    if event.event_id == QUERY:
        sop_class = str(detail.get("sop_class_uid") or "")
        obj = ET.SubElement(
            root,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": sop_class or resource or "-",
                "ParticipantObjectTypeCode": "2",
                "ParticipantObjectTypeCodeRole": "24",
            },
        )
        _code(obj, "ParticipantObjectIDTypeCode", SOP_CLASS_UID if sop_class else URI)
        # The query's keys only (the log never keeps their values, which may be PHI).
        keys = {k: detail[k] for k in ("query", "matches", "method") if k in detail}
        ET.SubElement(obj, "ParticipantObjectQuery").text = base64.b64encode(
            json.dumps(keys, sort_keys=True).encode()
        ).decode()
    elif resource and not study:
        obj = ET.SubElement(
            root,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": resource,
                "ParticipantObjectTypeCode": "2",
                "ParticipantObjectTypeCodeRole": "3" if event.event_id != SECURITY_ALERT else "13",
            },
        )
        _code(obj, "ParticipantObjectIDTypeCode", URI)
    for key in _patient_keys(stamped, detail):
        obj = ET.SubElement(
            root,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": key,
                "ParticipantObjectTypeCode": "1",
                "ParticipantObjectTypeCodeRole": "1",
            },
        )
        _code(obj, "ParticipantObjectIDTypeCode", PATIENT_NUMBER)
    return ('<?xml version="1.0" encoding="UTF-8"?>' + _serialize(root)).encode("utf-8")


#: What a value cannot carry as is: markup characters (escaped) and characters XML 1.0
#: does not allow (2.2 Char; dropped, so a hostile agent or path cannot make the
#: message unparseable).
_ATTR_SPECIAL: Final = re.compile('[&<>"\n\r\t\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]')
_TEXT_SPECIAL: Final = re.compile("[&<>\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")
_ESCAPES: Final = {
    "&": "&amp;",
    "<": "&lt;",
    ">": "&gt;",
    '"': "&quot;",
    "\n": "&#10;",
    "\r": "&#13;",
    "\t": "&#9;",
}


def _escaped(pattern: re.Pattern[str], value: str) -> str:
    if not pattern.search(value):
        return value  # the usual case: one scan, no copy
    return pattern.sub(lambda m: _ESCAPES.get(m.group(), ""), value)


def _serialize(el: ET.Element) -> str:
    """One element as XML 1.0 on one line (ElementTree's own writer is several times
    slower, and keeps characters XML does not allow)."""
    attrs = "".join(f' {k}="{_escaped(_ATTR_SPECIAL, v)}"' for k, v in el.attrib.items())
    inner = _escaped(_TEXT_SPECIAL, el.text) if el.text else ""
    inner += "".join(_serialize(child) for child in el)
    return f"<{el.tag}{attrs}>{inner}</{el.tag}>" if inner else f"<{el.tag}{attrs}/>"


_PRINTUSASCII: Final = re.compile(r"[^\x21-\x7e]")


def _header_field(value: str, limit: int) -> str:
    """An RFC 5424 6.2 header field: PRINTUSASCII, at most ``limit`` octets, or ``-``."""
    clean = _PRINTUSASCII.sub("_", value)[:limit]
    return clean or "-"


def syslog_message(entry: AuditEntry, source: AuditSource) -> bytes:
    """RFC 5424 message of one entry: ``<PRI>1 TIMESTAMP HOST APP PROCID MSGID - XML``.

    Severity 5 (notice) for a success, 4 (warning) for a failure (RFC 5424 6.2.1).
    """
    stamped = entry.stamped()
    severity = 5 if stamped.outcome == "0" else 4
    header = " ".join(
        (
            f"<{FACILITY * 8 + severity}>1",
            stamped.recorded,  # RFC 3339 UTC with microseconds: RFC 5424 6.2.3 TIMESTAMP
            _header_field(source.hostname, 255),
            _header_field(source.app_name, 48),
            _header_field(source.procid, 128),
            MSGID,
            "-",  # no STRUCTURED-DATA
        )
    )
    return header.encode("ascii") + b" " + audit_message(stamped, source)


def octet_counted(message: bytes) -> bytes:
    """RFC 5425 4.3 / RFC 6587 3.4.1 framing: ``MSG-LEN SP SYSLOG-MSG``."""
    return str(len(message)).encode("ascii") + b" " + message
