"""HL7 v2 ADT messages to patient identity commands (IHE PIR; pure).

What we read (HL7 v2.5.1 chapter 3, Patient Administration; IHE RAD TF-2 4.12
"Patient Update" and ITI TF-2b 3.30 for A40/A47):

=========================  =================================================================
``ADT^A01`` admit,         one :class:`~core.patients.UpdatePatient` from the first PID
``ADT^A04`` register,      (its demographics; PV1, the visit, is not ours to keep)
``ADT^A08`` update
``ADT^A40`` merge patient  one :class:`~core.patients.MergePatients` per PID/MRG pair
(ADT_A39)                  (``{PID [PD1] MRG [PV1]}``): PID-3 survives, MRG-1 is merged into
                           it; PID-5/7/8, when sent, are the survivor's demographics
``ADT^A47`` change         one :class:`~core.patients.ChangePatientIdentifier` per PID/MRG
identifier list (ADT_A30)  pair: MRG-1 is the identifier until now, PID-3 the new one
=========================  =================================================================

Field mapping, HL7 → DICOM (PS3.3 C.7.1.1, PS3.5 6.2):

* PID-3 (CX, repeating) → Patient ID (CX.1) and Issuer of Patient ID (CX.4, HD.1, or
  HD.2 when the namespace is empty): the first repetition with an identifier; PID-2
  (v2.3 external id) when PID-3 has none. MRG-1 the same way, MRG-4 (v2.3 prior
  patient id) as its fallback. Identifiers are never shortened: one longer than LO
  (64 characters), or holding a backslash or a control character, is refused (102).
* PID-5 (XPN, repeating) → Patient's Name: the legal name (XPN.7 = ``L``) when one
  is marked, else the first; components reordered to ``family^given^middle^prefix^
  suffix`` by the order reader's conversion. A component group longer than 64
  characters is refused (102), as is a backslash (PN is one value).
* PID-7 (TS.1, DTM) → Patient's Birth Date (DA, ``YYYYMMDD``). A date of year or
  month precision cannot be a DA: it leaves the stored date unchanged. A value that
  is not a date is refused (102).
* PID-8 (HL7 Table 0001) → Patient's Sex (CS): ``M``, ``F``, ``O``; ``A`` (ambiguous)
  and ``N`` (not applicable) → ``O``; ``U`` (unknown) → empty. Another code is
  refused (103).

Sent, empty and deleted (HL7 v2.5.1 2.5.3): a field left empty keeps what we hold
(``None`` in :class:`~core.patients.Demographics`), a field holding ``""`` deletes it
(the empty string).

Character sets (MSH-18), escapes (2.7.4) and the header checks are the order reader's
(:func:`worklist.orders.hl7v2.parse_message`), so an ADT and an order from the same
record system are read the same way. Errors are :class:`~core.errors.OrderMessageError`
with the HL7 Table 0357 code and ERR-2 location; nothing here logs (messages carry
patient data).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from core.errors import OrderMessageError
from core.patients import (
    ChangePatientIdentifier,
    Demographics,
    MergePatients,
    PatientCommand,
    PatientRef,
    UpdatePatient,
)
from worklist.orders.hl7v2 import Message, Segment, _person_name, _Reader

__all__ = ["ADT_TYPES", "AdtCommand", "patient_commands"]

_UPDATES: Final = frozenset({"A01", "A04", "A08"})
_MERGE: Final = "A40"
_CHANGE_ID: Final = "A47"
#: (MSH-9.1, MSH-9.2) of the ADT events we read.
ADT_TYPES: Final = frozenset(("ADT", t) for t in (*_UPDATES, _MERGE, _CHANGE_ID))

#: HL7 v2.5.1 2.5.3: a field holding only ``""`` is "null": delete the value we hold.
_NULL: Final = '""'
#: HL7 Table 0001 (Administrative Sex) → DICOM Patient's Sex (PS3.3 C.7.1.1).
_SEX: Final = {"M": "M", "F": "F", "O": "O", "A": "O", "N": "O", "U": ""}
#: LO and each PN component group hold at most 64 characters (PS3.5 Table 6.2-1).
_MAX_CHARS: Final = 64
_BAD_CHARS: Final = re.compile(r"[\\\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class AdtCommand:
    """One command read from an ADT message, and where it came from.

    ``where`` is the ERR-2 location (``segment^sequence^field``) to name when the
    service refuses the command, for example ``MRG^2^1`` for an unknown prior patient.
    """

    command: PatientCommand
    where: str


def patient_commands(msg: Message) -> list[AdtCommand]:
    """The patient identity commands of an ADT A01/A04/A08/A40/A47 message.

    Parameters
    ----------
    msg : Message
        A message parsed by :func:`~worklist.orders.hl7v2.parse_message` with
        :data:`ADT_TYPES` accepted.

    Raises
    ------
    OrderMessageError
        ``AR`` 201 for another event; ``AE`` with the HL7 Table 0357 code and the
        location otherwise: a PID or MRG missing or out of order (100), a patient
        identifier missing (101), a value of the wrong type (102), a sex outside
        Table 0001 (103).
    """
    kind, trigger = msg.type
    if (kind, trigger) not in ADT_TYPES:
        raise OrderMessageError(
            f"{kind}^{trigger} is not an ADT event we read",
            where="MSH^1^9",
            hl7_code=201,
            ack_code="AR",
        )
    r = _Reader(msg)
    if trigger in _UPDATES:
        pid = next((s for s in msg.segments if s.id == "PID"), None)
        if pid is None:
            raise OrderMessageError("PID segment missing", where="PID", hl7_code=100)
        where = "PID^1^3"
        return [AdtCommand(UpdatePatient(_pid_ref(r, pid, 1), _demographics(r, pid, 1)), where)]
    out: list[AdtCommand] = []
    for n, pid, mrg in _pairs(msg):
        new = _pid_ref(r, pid, n)
        old = _ref(r, mrg, 1, f"MRG^{n}^1") or _ref(r, mrg, 4, f"MRG^{n}^4")
        if old is None:
            raise OrderMessageError(
                "prior patient identifier missing", where=f"MRG^{n}^1", hl7_code=101
            )
        if trigger == _MERGE:
            demographics = _demographics(r, pid, n)
            sent = demographics != Demographics()
            command: PatientCommand = MergePatients(
                surviving=new, obsolete=old, demographics=demographics if sent else None
            )
        else:
            command = ChangePatientIdentifier(old=old, new=new)
        out.append(AdtCommand(command, f"MRG^{n}^1"))
    return out


def _pairs(msg: Message) -> list[tuple[int, Segment, Segment]]:
    """The ``PID [PD1] MRG [PV1]`` groups of an ADT_A39 / ADT_A30 message, numbered."""
    groups: list[list[Segment]] = []
    mrg_count = 0
    for seg in msg.segments[1:]:
        if seg.id == "PID":
            groups.append([seg])
        elif seg.id == "MRG":
            mrg_count += 1
            if not groups or len(groups[-1]) > 1:
                raise OrderMessageError(
                    "MRG segment without a PID before it",
                    where=f"MRG^{mrg_count}",
                    hl7_code=100,
                )
            groups[-1].append(seg)
    if not groups:
        raise OrderMessageError("PID segment missing", where="PID", hl7_code=100)
    for n, group in enumerate(groups, 1):
        if len(group) < 2:
            raise OrderMessageError("MRG segment missing after PID", where=f"PID^{n}", hl7_code=100)
    return [(n, g[0], g[1]) for n, g in enumerate(groups, 1)]


def _pid_ref(r: _Reader, pid: Segment, n: int) -> PatientRef:
    ref = _ref(r, pid, 3, f"PID^{n}^3") or _ref(r, pid, 2, f"PID^{n}^2")
    if ref is None:
        raise OrderMessageError("patient identifier missing", where=f"PID^{n}^3", hl7_code=101)
    return ref


def _ref(r: _Reader, seg: Segment, field: int, where: str) -> PatientRef | None:
    """The first repetition of a CX field with an identifier (CX.1), with CX.4."""
    for rep in r.reps(seg, field):
        parts = _subcomponents(r, rep)
        patient_id = parts[0][0].strip() if parts else ""
        if not patient_id or patient_id == _NULL:
            continue
        hd = parts[3] if len(parts) > 3 else []
        issuer = next((h.strip() for h in hd[:2] if h.strip() and h.strip() != _NULL), "")
        for value in (patient_id, issuer):
            if len(value) > _MAX_CHARS or _BAD_CHARS.search(value):
                raise OrderMessageError(
                    "patient identifier or issuer is not a DICOM LO (at most 64 characters, "
                    "no backslash or control character)",
                    where=where,
                    hl7_code=102,
                )
        return PatientRef(patient_id, issuer)
    return None


def _subcomponents(r: _Reader, rep: str) -> list[list[str]]:
    """One repetition's components, each split into subcomponents, then unescaped.

    Splitting comes first (HL7 v2.5.1 2.7.4): an escaped ``\\T\\`` is an ``&`` in
    the text, not a subcomponent separator.
    """
    m = r.msg
    return [[r.unescape(s) for s in c.split(m.subcomponent)] for c in rep.split(m.component)]


def _demographics(r: _Reader, pid: Segment, n: int) -> Demographics:
    return Demographics(
        name=_name(r, pid, n), birth_date=_birth_date(r, pid, n), sex=_sex(r, pid, n)
    )


def _name(r: _Reader, pid: Segment, n: int) -> str | None:
    raw = pid.get(5).strip()
    if not raw:
        return None
    if raw == _NULL:
        return ""
    reps = [[c[0] for c in _subcomponents(r, rep)] for rep in r.reps(pid, 5)]
    legal = next((p for p in reps if len(p) > 6 and p[6].strip().upper() == "L"), None)
    parts: Sequence[str] = legal or (reps[0] if reps else [])
    parts = ["" if p.strip() == _NULL else p for p in parts]
    # Components are already split and unescaped: no separator may split them again.
    pn = _person_name(parts, 0, "\x00")
    if not pn:
        return None  # only delimiters: nothing sent
    if len(pn) > _MAX_CHARS or _BAD_CHARS.search(pn):
        raise OrderMessageError(
            "patient name is not a DICOM PN (at most 64 characters, no backslash)",
            where=f"PID^{n}^5",
            hl7_code=102,
        )
    return pn


_DTM: Final = re.compile(
    r"(\d{4})(\d{2})?(\d{2})?(?:\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,4})?)?)?)?"
    r"(?:[+-]\d{4})?"
)


def _birth_date(r: _Reader, pid: Segment, n: int) -> str | None:
    raw = pid.get(7).strip()
    if not raw:
        return None
    if raw == _NULL:
        return ""
    value = r.comp(pid, 7)  # TS.1 (v2.5.1 2.A.77), DTM
    match = _DTM.fullmatch(value)
    if match is None:
        raise OrderMessageError("birth date is not an HL7 DTM", where=f"PID^{n}^7", hl7_code=102)
    if match.group(3) is None:
        return None  # year or month precision: no DA can say it, keep what we hold
    day = "".join(match.group(1, 2, 3))
    try:
        datetime.strptime(day, "%Y%m%d")
    except ValueError:
        raise OrderMessageError(
            "birth date is not a calendar date", where=f"PID^{n}^7", hl7_code=102
        ) from None
    return day


def _sex(r: _Reader, pid: Segment, n: int) -> str | None:
    raw = pid.get(8).strip()
    if not raw:
        return None
    if raw == _NULL:
        return ""
    code = r.comp(pid, 8).upper()  # IS; CWE.1 from v2.7 on
    if code not in _SEX:
        raise OrderMessageError(
            "administrative sex not in HL7 Table 0001", where=f"PID^{n}^8", hl7_code=103
        )
    return _SEX[code]
