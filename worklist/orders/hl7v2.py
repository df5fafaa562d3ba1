"""HL7 v2 imaging orders (ORM^O01, OMI^O23) to :class:`~core.orders.PlacedOrder`, and ACKs (pure).

What we accept (HL7 v2.5.1 chapter 4 and IHE RAD TF-2 4.4 "Procedure Scheduled"):

* ``ORM^O01`` (v2.3-2.5.1) and ``OMI^O23`` (v2.5+). Anything else, including
  ``OML``, ``ORU`` and ``ACK``, is refused with ``AR`` and HL7 Table 0357 code
  200 (unsupported message type), naming the type we got.
* ORC-1 ``NW`` (new), ``XO`` (change), ``CA`` (cancel) (HL7 Table 0119); one
  order per ORC group.
* Segments end with CR (HL7 v2.5.1 2.5.1); LF and CRLF are tolerated because
  files from the wild have them. Segments run together on one line (a segment id
  such as `` OBX|`` inside a field) are refused with code 100 and the line.
* Text is decoded per MSH-18 (``UNICODE UTF-8``, ``8859/1``…); without MSH-18,
  UTF-8 if it decodes, else ISO 8859-1. Escape sequences (2.7.4) are resolved.

Field mapping (IHE RAD TF-2 Appendix B, v2.3.1 and v2.5.1 tables), HL7 → DICOM:

=====================  ===========================================================
PID-3 (CX.1, CX.4)     Patient ID, Issuer of Patient ID (PID-2 when PID-3 is empty)
PID-5 (XPN)            Patient's Name (components reordered to PN, PS3.5 6.2.1)
PID-7, PID-8           Birth Date, Sex (a non-date, or a sex outside M/F/O, is left
                       empty: Type 2 in Table K.6-1, and a refusal would lose the order)
PV1-3, PV1-8, PV1-19   Current Patient Location, Referring Physician, Admission ID
ORC-2 / OBR-2 (EI.1)   placer order number (our key); ORC-3 filler order number
ORC-12 / OBR-16        Requesting Physician
OBR-4 (CE)             Requested Procedure Code Sequence and Description
OBR-18, OBR-19         Accession Number, Requested Procedure ID (when sent)
OBR-20                 Scheduled Procedure Step ID (when sent)
OBR-24                 Modality
OBR-13                 Requested Contrast Agent (IHE "relevant clinical info")
OBR-30                 Patient Transport Arrangements
OBR-34 (CNN.2/.3)      Scheduled Performing Physician's Name
ORC-7.6 / OBR-5        Requested Procedure Priority (S→STAT, A→HIGH, R→ROUTINE)
TQ1-7, OBR-27.4,       Scheduled Procedure Step Start Date/Time (first present;
ORC-7.4, OBR-36,       MSH-7 as the last resort, so a message always schedules the
OBR-7, OBR-6, MSH-7    same way)
ZDS-1                  Study Instance UID (IHE v2.3.1)
IPC-1…9 (OMI)          Accession, Requested Procedure ID, Study Instance UID, SPS ID,
                       Modality, protocol, Station Name, Location, Station AE Title
NTE after OBR          Comments on the Scheduled Procedure Step
=====================  ===========================================================

Nothing here logs: messages carry patient data.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime

from core.errors import OrderMessageError
from core.hl7v2 import AckError, Delimiters, charset_codec, msh_fields, unescaper
from core.hl7v2 import build_ack as _core_ack
from core.orders import (
    Code,
    Order,
    OrderAction,
    Patient,
    PlacedOrder,
    ScheduledProcedureStep,
)

__all__ = [
    "ACCEPTED_TYPES",
    "Message",
    "Segment",
    "build_ack",
    "control_id",
    "parse_message",
    "placed_orders",
    "sending_application",
    "split_batch",
]

#: (MSH-9.1, MSH-9.2) we take.
ACCEPTED_TYPES = frozenset({("ORM", "O01"), ("OMI", "O23")})
_VERSIONS = ("2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8")
_SEGMENT_ID = re.compile(r"[A-Z][A-Z0-9]{2}")
# Segment ids whose appearance inside a field betrays segments run together.
_KNOWN = (
    "MSH|PID|PD1|PV1|PV2|NK1|NTE|ORC|OBR|OBX|TQ1|TQ2|IPC|ZDS|AL1|DG1|IN1|IN2|GT1|SPM|"
    "CTD|EVN|MSA|ERR|SAC|FT1|BLG|ROL|MRG"
)
_JOINED = re.compile(rf"\s({_KNOWN})\|")
_SEX = {"M": "M", "F": "F", "O": "O", "A": "O", "N": "O"}
_PRIORITY = {
    "S": "STAT",
    "STAT": "STAT",
    "A": "HIGH",
    "ASAP": "HIGH",
    "P": "HIGH",
    "C": "HIGH",
    "R": "ROUTINE",
    "ROUTINE": "ROUTINE",
    "T": "MEDIUM",
}


@dataclass(frozen=True, slots=True)
class Segment:
    """One segment: ``fields[n]`` is field n (for MSH, ``fields[1]`` is MSH-1)."""

    id: str
    fields: tuple[str, ...]
    line: int

    def get(self, n: int) -> str:
        return self.fields[n] if n < len(self.fields) else ""


@dataclass(frozen=True, slots=True)
class Message:
    """A parsed message: segments, separators and the MSH values ACKs need."""

    segments: tuple[Segment, ...]
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"
    field_sep: str = "|"
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def msh(self) -> Segment:
        return self.segments[0]

    @property
    def type(self) -> tuple[str, str]:
        parts = self.msh.get(9).split(self.component)
        return (parts[0].strip(), parts[1].strip() if len(parts) > 1 else "")

    @property
    def control_id(self) -> str:
        return self.msh.get(10)

    @property
    def version(self) -> str:
        return self.msh.get(12).split(self.component)[0]


# ------------------------------------------------------------------------ framing


def split_batch(raw: bytes) -> list[bytes]:
    """Split a file holding several messages (each starting with ``MSH``), dropping blanks.

    Also strips batch/file envelopes (FHS, BHS, BTS, FTS; HL7 v2.5.1 2.10.3).
    """
    lines = re.split(rb"\r\n|\r|\n", raw)
    out: list[list[bytes]] = []
    for line in lines:
        if not line.strip() or line[:3] in (b"FHS", b"BHS", b"BTS", b"FTS"):
            continue
        if line.startswith(b"MSH") or not out:
            out.append([])
        out[-1].append(line)
    return [b"\r".join(m) + b"\r" for m in out]


def _decode(raw: bytes) -> tuple[str, str]:
    """The message's text and the codec it was decoded with."""
    head = raw.split(b"\r", 1)[0].split(b"\n", 1)[0]
    charset = ""
    if head.startswith(b"MSH") and len(head) > 3:
        sep = head[3:4]
        parts = head.split(sep)
        if len(parts) > 17:
            charset = parts[17].split(b"~")[0].decode("ascii", "replace").strip()
    # One table 0211 for every HL7 v2 reader (core.hl7v2); a name it does not know
    # falls through to the UTF-8, then Latin-1 guess below, as an absent MSH-18 does.
    codec = charset_codec(charset) if charset else None
    if codec:
        try:
            return raw.decode(codec), codec
        except UnicodeDecodeError as exc:
            raise OrderMessageError(
                f"text is not {charset} as MSH-18 says", where="MSH^1^18", hl7_code=102
            ) from exc
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return raw.decode("latin-1"), "latin-1"


def parse_message(
    raw: bytes, *, accepted: frozenset[tuple[str, str]] = ACCEPTED_TYPES
) -> Message:
    """Split one message into segments and check its header (HL7 v2.5.1 2.5, 2.14.9).

    ``accepted`` is the (MSH-9.1, MSH-9.2) pairs taken: the orders by default; the
    intake adds the ADT events (:data:`worklist.orders.adt.ADT_TYPES`) when it has a
    patient identity service to give them to.

    Raises
    ------
    OrderMessageError
        ``AR`` for a missing/garbled MSH, an unsupported type, trigger or version;
        ``AE`` code 100 for segments run together or an unreadable segment id.
    """
    text, codec = _decode(raw)
    text = text.lstrip("\x0b").rstrip("\x1c\r\n")
    lines = [ln for ln in re.split(r"\r\n|\r|\n", text)]
    if not lines or not lines[0].startswith("MSH") or len(lines[0]) < 8:
        raise OrderMessageError(
            "message does not start with an MSH segment", where="MSH", hl7_code=100, ack_code="AR"
        )
    field_sep = lines[0][3]
    enc = lines[0][4:8].split(field_sep)[0]
    if len(enc) < 4:
        raise OrderMessageError(
            "MSH-2 encoding characters missing", where="MSH^1^2", hl7_code=102, ack_code="AR"
        )
    component, repetition, escape, sub = enc[0], enc[1], enc[2], enc[3]
    segments: list[Segment] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        seg_id = line[:3]
        if not _SEGMENT_ID.fullmatch(seg_id) or (len(line) > 3 and line[3] != field_sep):
            raise OrderMessageError(f"line {n} is not a segment", where=f"line {n}", hl7_code=100)
        joined = _JOINED.search(line, 4)
        if joined is not None:
            raise OrderMessageError(
                f"segments run together: {joined.group(1)} inside {seg_id} on line {n} "
                "(missing segment terminator)",
                where=f"{seg_id}^{sum(1 for s in segments if s.id == seg_id) + 1}",
                hl7_code=100,
            )
        parts = line.split(field_sep)
        fields = (seg_id, field_sep, *parts[1:]) if seg_id == "MSH" else tuple(parts)
        segments.append(Segment(seg_id, tuple(fields), n))
    msg = Message(
        tuple(segments), component, repetition, escape, sub, field_sep, {"codec": codec}
    )
    if not msg.control_id:
        raise OrderMessageError(
            "MSH-10 message control id missing", where="MSH^1^10", hl7_code=101, ack_code="AR"
        )
    kind, trigger = msg.type
    if (kind, trigger) not in accepted:
        shown = f"{kind}^{trigger}" if trigger else kind or "(empty)"
        taken = ", ".join(f"{k}^{t}" for k, t in sorted(accepted))
        raise OrderMessageError(
            f"{shown} is not an imaging order or other message we take ({taken} accepted)",
            where="MSH^1^9",
            hl7_code=201 if kind in {k for k, _ in accepted} else 200,
            ack_code="AR",
        )
    if msg.version not in _VERSIONS:
        raise OrderMessageError(
            f"version {msg.version or '(empty)'} not supported",
            where="MSH^1^12",
            hl7_code=203,
            ack_code="AR",
        )
    return msg


def control_id(raw: bytes) -> str:
    """MSH-10 of a message we may not be able to parse (for the ACK)."""
    return _msh_field(raw, 10)


def sending_application(raw: bytes) -> str:
    """MSH-3 (first component) of a message we may not be able to parse: who sent it.

    HL7 v2.5.1 2.14.9.3: the sending application, the HL7 counterpart of a calling AE
    title (for the action log's agent).
    """
    component = _msh_field(raw, 2)[:1] or "^"
    return _msh_field(raw, 3).split(component, 1)[0].strip()


def _msh_field(raw: bytes, n: int) -> str:
    head = raw.lstrip(b"\x0b").split(b"\r", 1)[0].split(b"\n", 1)[0]
    if not head.startswith(b"MSH") or len(head) < 4:
        return ""
    parts = head.split(head[3:4])
    # parts[0] is "MSH" and MSH-1 is the separator itself: MSH-n is parts[n - 1].
    return parts[n - 1].decode("latin-1").strip() if len(parts) > n - 1 else ""


# ------------------------------------------------------------------------- values


class _Reader:
    """Field access with escape handling for one message."""

    def __init__(self, msg: Message) -> None:
        self.msg = msg
        # One unescape for every HL7 v2 reader (core.hl7v2, v2.5.1 2.7); \Xhh\ bytes
        # are decoded in the message's own character set.
        delimiters = Delimiters(
            msg.field_sep, msg.component, msg.repetition, msg.escape, msg.subcomponent
        )
        self.unescape = unescaper(delimiters, msg.extra.get("codec", "utf-8"))

    def reps(self, seg: Segment | None, n: int) -> list[str]:
        if seg is None:
            return []
        return [r for r in seg.get(n).split(self.msg.repetition) if r]

    def comps(self, seg: Segment | None, n: int, rep: int = 0) -> list[str]:
        reps = self.reps(seg, n)
        if len(reps) <= rep:
            return []
        return [self.unescape(c) for c in reps[rep].split(self.msg.component)]

    def comp(self, seg: Segment | None, n: int, c: int = 1) -> str:
        parts = self.comps(seg, n)
        value = parts[c - 1] if len(parts) >= c else ""
        return value.split(self.msg.subcomponent)[0].strip()


def _person_name(parts: Sequence[str], offset: int, sub: str) -> str:
    """XPN (offset 0) or XCN (offset 1) components → DICOM PN family^given^middle^prefix^suffix."""

    def c(n: int) -> str:
        i = offset + n - 1
        return parts[i].split(sub)[0].strip() if len(parts) > i else ""

    family = c(1)
    pn = [family, c(2), c(3), c(5), c(4)]
    return "^".join(pn).rstrip("^")


def _datetime(value: str) -> datetime | None:
    """HL7 DTM ``YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ]`` → naive wall-clock datetime."""
    digits = re.match(r"(\d{8})(\d{2})?(\d{2})?(\d{2})?", value.strip())
    if digits is None:
        return None
    try:
        day = datetime.strptime(digits.group(1), "%Y%m%d")
        return day.replace(
            hour=int(digits.group(2) or 0),
            minute=int(digits.group(3) or 0),
            second=min(int(digits.group(4) or 0), 59),
        )
    except ValueError:
        return None


def _date(value: str) -> date | None:
    dt = _datetime(value)
    return dt.date() if dt else None


def _sh(value: str) -> str:
    """A value that must fit an SH element (16 characters) or be left out."""
    value = value.strip()
    return value if len(value) <= 16 else ""


def _segment_groups(msg: Message) -> tuple[dict[str, Segment], list[list[Segment]]]:
    """Patient-level segments (first of each id before the first ORC) and ORC groups."""
    head: dict[str, Segment] = {}
    groups: list[list[Segment]] = []
    for seg in msg.segments[1:]:
        if seg.id == "ORC":
            groups.append([seg])
        elif groups:
            groups[-1].append(seg)
        else:
            head.setdefault(seg.id, seg)
    return head, groups


def placed_orders(msg: Message, *, source: str = "hl7") -> list[PlacedOrder]:
    """The orders of an ORM^O01 / OMI^O23 message (see the module table).

    Raises
    ------
    OrderMessageError
        ``AE`` with the HL7 Table 0357 code and the ERL of the field: no PID (100),
        no ORC (100), an ORC-1 we do not take (103), no placer order number (101).
    """
    r = _Reader(msg)
    head, groups = _segment_groups(msg)
    pid = head.get("PID")
    if pid is None:
        raise OrderMessageError("PID segment missing", where="PID", hl7_code=100)
    if not groups:
        raise OrderMessageError("ORC segment missing", where="ORC", hl7_code=100)
    pv1 = head.get("PV1")
    patient_id = r.comp(pid, 3) or r.comp(pid, 2)
    if not patient_id:
        raise OrderMessageError("patient identifier missing", where="PID^1^3", hl7_code=101)
    pid3 = r.comps(pid, 3) or r.comps(pid, 2)
    issuer = pid3[3].split(msg.subcomponent)[0].strip() if len(pid3) > 3 else ""
    patient = Patient(
        name=_person_name(r.comps(pid, 5), 0, msg.subcomponent),
        id=patient_id,
        issuer=issuer,
        birth_date=_date(r.comp(pid, 7)),
        sex=_SEX.get(r.comp(pid, 8).upper(), ""),
    )
    referring = _person_name(r.comps(pv1, 8), 1, msg.subcomponent) if pv1 else ""
    admission = r.comp(pv1, 19) if pv1 else ""
    location = "^".join(c for c in r.comps(pv1, 3)[:3] if c) if pv1 else ""
    msh_time = _datetime(msg.msh.get(7))
    out: list[PlacedOrder] = []
    for n, group in enumerate(groups, 1):
        orc = group[0]
        first = {s.id: s for s in reversed(group)}
        obr, tq1, ipc, zds = first.get("OBR"), first.get("TQ1"), first.get("IPC"), first.get("ZDS")
        zds = zds or head.get("ZDS")
        control = r.comp(orc, 1).upper()
        try:
            action = OrderAction(control)
        except ValueError:
            raise OrderMessageError(
                f"order control {control or '(empty)'} not supported (NW, XO, CA)",
                where=f"ORC^{n}^1",
                hl7_code=103,
            ) from None
        placer = r.comp(orc, 2) or r.comp(obr, 2)
        if not placer:
            raise OrderMessageError("placer order number missing", where=f"ORC^{n}^2", hl7_code=101)
        service = r.comps(obr, 4)
        code = (
            Code(
                service[0].strip(),
                (service[2] if len(service) > 2 else "").strip() or "L",
                (service[1] if len(service) > 1 else "").strip()[:64],
            )
            if service and service[0].strip()
            else None
        )
        priority_raw = r.comp(orc, 7, 6) or r.comp(obr, 27, 6) or r.comp(obr, 5)
        priority = _PRIORITY.get(priority_raw.upper(), "")
        start = next(
            (
                dt
                for dt in (
                    _datetime(r.comp(tq1, 7)),
                    _datetime(r.comp(obr, 27, 4)),
                    _datetime(r.comp(orc, 7, 4)),
                    _datetime(r.comp(obr, 36)),
                    _datetime(r.comp(obr, 7)),
                    _datetime(r.comp(obr, 6)),
                    msh_time,
                )
                if dt is not None
            ),
            None,
        )
        if start is None:
            raise OrderMessageError(
                "no scheduled start time and no MSH-7", where=f"OBR^{n}^27", hl7_code=101
            )
        performing = r.comps(obr, 34)
        performer = ""
        if performing:
            subs = performing[0].split(msg.subcomponent)
            performer = "^".join(x.strip() for x in subs[1:3]).rstrip("^")
        notes = [r.unescape(s.get(3)) for s in group if s.id == "NTE"]
        modality = (r.comp(ipc, 5) or r.comp(obr, 24)).upper()
        step = ScheduledProcedureStep(
            step_id=_sh(r.comp(ipc, 4) or r.comp(obr, 20)),
            station_ae_title=_sh(r.comp(ipc, 9)),
            modality=modality if _sh(modality) and modality.isalnum() else "",
            start=start,
            description=code.meaning if code else "",
            station_name=_sh(r.comp(ipc, 7)),
            location=r.comp(ipc, 8)[:16],
            performing_physician=performer,
            contrast_agent=r.comp(obr, 13)[:64],
            comments=" ".join(x for x in notes if x)[:10240],
        )
        order = Order(
            accession_number=_sh(r.comp(ipc, 1) or r.comp(obr, 18)),
            requested_procedure_id=_sh(r.comp(ipc, 2) or r.comp(obr, 19)),
            requested_procedure_description=code.meaning if code else "",
            requested_procedure_code=code,
            study_instance_uid=(r.comp(ipc, 3) or r.comp(zds, 1))[:64],
            referring_physician=referring,
            requesting_physician=_person_name(
                r.comps(orc, 12) or r.comps(obr, 16), 1, msg.subcomponent
            ),
            admission_id=admission[:64],
            current_location=location[:64],
            priority=priority,
            transport_arrangements=r.comp(obr, 30)[:64],
        )
        out.append(
            PlacedOrder(
                action=action,
                placer_order_number=placer[:64],
                patient=patient,
                order=order,
                steps=(step,),
                filler_order_number=r.comp(orc, 3)[:64],
                source=source,
            )
        )
    return out


# ---------------------------------------------------------------------------- ACK


def build_ack(
    original: Message | bytes,
    code: str,
    *,
    error: OrderMessageError | None = None,
    now: datetime,
    ack_control_id: str,
    sending: tuple[str, str] = ("PACSLAB", ""),
) -> bytes:
    """An original-mode acknowledgment (HL7 v2.5.1 2.9.2, 2.14.1 ACK, 2.15.8 MSA, 2.15.5 ERR).

    Parameters
    ----------
    original : Message or bytes
        The message acknowledged; raw bytes when it could not be parsed (MSH values
        are then taken as far as they can be read).
    code : str
        MSA-1: ``AA``, ``AE`` or ``AR``.
    error : OrderMessageError, optional
        Gives ERR-2 (location), ERR-3 (Table 0357 code) and ERR-8 (user message).
    now, ack_control_id
        MSH-7 and MSH-10 of the ACK.
    sending
        MSH-3/MSH-4 when the original has no receiving application to echo.
    """
    fields = list(original.msh.fields) if isinstance(original, Message) else msh_fields(original)
    ack_error = None
    if error is not None:
        location = error.where or ""
        if location.startswith("line "):  # a line number is no ERL (ERR-2)
            location = ""
        ack_error = AckError(error.hl7_code, location, error.reason)
    return _core_ack(
        fields, code, now=now, ack_control_id=ack_control_id, error=ack_error, sending=sending
    )
