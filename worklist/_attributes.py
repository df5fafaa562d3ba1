"""The Modality Worklist attribute table: which DICOM attribute comes from which field.

One row per attribute of PS3.4 Table K.6-1 that we keep. The C-FIND matcher
(:mod:`worklist.query`), the response builder and :func:`worklist.model.to_dataset`
all walk these tuples; nothing else knows an attribute path.

Each row's ``get`` reads the value from a *context*: an :class:`Entry` at the top
level, a :class:`~worklist.model.ScheduledProcedureStep` inside the Scheduled
Procedure Step Sequence, a :class:`~worklist.model.Code` inside a code sequence.
For a sequence row, ``get`` returns the contexts of its items.
"""

from __future__ import annotations

import enum
import logging
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from typing import Any, NamedTuple

from pydicom.datadict import dictionary_VM, tag_for_keyword
from pydicom.dataset import Dataset

from worklist.model import Code, ScheduledProcedureStep, WorklistItem

logger = logging.getLogger(__name__)

__all__ = [
    "CODE",
    "ITEM",
    "REF",
    "SPS",
    "Attr",
    "Entry",
    "Kind",
    "Node",
    "UnboundedValueError",
    "add_nodes",
    "bound_value",
    "collect",
    "full_dataset",
]


class Entry(NamedTuple):
    """One worklist entry: a scheduled step with the item it belongs to (PS3.4 K.6.1.2.1)."""

    item: WorklistItem
    sps: ScheduledProcedureStep


class Kind(enum.Enum):
    """How a key of this attribute is matched (PS3.4 C.2.2.2)."""

    TEXT = "text"  # Single Value (C.2.2.2.1) or Wild Card (C.2.2.2.4), case-sensitive
    PN = "pn"  # as TEXT, with the PN latitude of C.2.2.2.1.1
    DATE = "date"  # Single Value or Range (C.2.2.2.5.1)
    TIME = "time"  # Single Value or Range (C.2.2.2.5.2)
    UID = "uid"  # Single Value or List of UID (C.2.2.2.2)
    NUMBER = "number"  # Single Value only
    SEQUENCE = "sequence"  # Sequence Matching (C.2.2.2.6)


_KIND_BY_VR = {
    "AE": Kind.TEXT,
    "CS": Kind.TEXT,
    "LO": Kind.TEXT,
    "LT": Kind.TEXT,
    "SH": Kind.TEXT,
    "ST": Kind.TEXT,
    "UC": Kind.TEXT,
    "UT": Kind.TEXT,
    "PN": Kind.PN,
    "DA": Kind.DATE,
    "TM": Kind.TIME,
    "UI": Kind.UID,
    "DS": Kind.NUMBER,
    "IS": Kind.NUMBER,
    "US": Kind.NUMBER,
    "SQ": Kind.SEQUENCE,
}


@dataclass(frozen=True, slots=True)
class Attr:
    """One attribute of the worklist information model.

    Parameters
    ----------
    keyword : str
        pydicom keyword; the tag is looked up from it.
    vr : str
        Value Representation used in responses.
    get : callable
        Context -> value: ``str`` (``""`` when unknown), ``int | None`` for US, or
        for SQ a tuple of item contexts.
    children : tuple of Attr
        The item attributes of a sequence.
    optional : bool
        Type 3/1C: left out of :func:`full_dataset` when empty. A C-FIND response
        still returns it, empty, when requested.
    """

    keyword: str
    vr: str
    get: Callable[[Any], Any]
    children: tuple[Attr, ...] = ()
    optional: bool = False
    tag: int = field(init=False)
    kind: Kind = field(init=False)

    def __post_init__(self) -> None:
        tag = tag_for_keyword(self.keyword)
        if tag is None:  # pragma: no cover - a typo in the table below
            raise ValueError(f"unknown DICOM keyword {self.keyword}")
        object.__setattr__(self, "tag", tag)
        object.__setattr__(self, "kind", _KIND_BY_VR[self.vr])


def _da(value: date | None) -> str:
    return value.strftime("%Y%m%d") if value else ""


def _ds(value: float | None) -> str:
    # DS is at most 16 characters (PS3.5 6.2); %g keeps weights and sizes short.
    return "" if value is None else f"{value:.6g}"


def _codes(code: Code | None) -> tuple[Code, ...]:
    return () if code is None else (code,)


# PS3.3 Table 8.8-1 Code Sequence Macro (basic code attributes).
CODE: tuple[Attr, ...] = (
    Attr("CodeValue", "SH", lambda c: c.value),
    Attr("CodingSchemeDesignator", "SH", lambda c: c.scheme),
    Attr("CodingSchemeVersion", "SH", lambda c: c.scheme_version, optional=True),
    Attr("CodeMeaning", "LO", lambda c: c.meaning),
)

# SOP Instance Reference Macro; we never hold referenced studies or patients, so these
# sequences are returned empty (they are Type 2 in Table K.6-1).
REF: tuple[Attr, ...] = (
    Attr("ReferencedSOPClassUID", "UI", lambda r: r[0]),
    Attr("ReferencedSOPInstanceUID", "UI", lambda r: r[1]),
)

# PS3.4 Table K.6-1, Scheduled Procedure Step: items of (0040,0100).
SPS: tuple[Attr, ...] = (
    Attr("Modality", "CS", lambda s: s.modality),
    Attr("RequestedContrastAgent", "LO", lambda s: s.contrast_agent),
    Attr("ScheduledStationAETitle", "AE", lambda s: s.station_ae_title),
    Attr("ScheduledProcedureStepStartDate", "DA", lambda s: s.start.strftime("%Y%m%d")),
    Attr("ScheduledProcedureStepStartTime", "TM", lambda s: s.start.strftime("%H%M%S")),
    Attr("ScheduledPerformingPhysicianName", "PN", lambda s: s.performing_physician),
    Attr("ScheduledProcedureStepDescription", "LO", lambda s: s.description),
    Attr("ScheduledProtocolCodeSequence", "SQ", lambda s: s.protocol_codes, CODE),
    Attr("ScheduledProcedureStepID", "SH", lambda s: s.step_id),
    Attr("ScheduledStationName", "SH", lambda s: s.station_name),
    Attr("ScheduledProcedureStepLocation", "SH", lambda s: s.location),
    Attr("PreMedication", "LO", lambda s: s.pre_medication),
    Attr("ScheduledProcedureStepStatus", "CS", lambda s: str(s.status)),
    Attr("CommentsOnTheScheduledProcedureStep", "LT", lambda s: s.comments, optional=True),
)

# PS3.4 Table K.6-1, top level. Order does not matter (datasets sort by tag).
ITEM: tuple[Attr, ...] = (
    # Scheduled Procedure Step: one item per worklist entry.
    Attr("ScheduledProcedureStepSequence", "SQ", lambda e: (e.sps,), SPS),
    # Requested Procedure
    Attr("RequestedProcedureID", "SH", lambda e: e.item.order.requested_procedure_id),
    Attr(
        "RequestedProcedureDescription",
        "LO",
        lambda e: e.item.order.requested_procedure_description,
    ),
    Attr(
        "RequestedProcedureCodeSequence",
        "SQ",
        lambda e: _codes(e.item.order.requested_procedure_code),
        CODE,
    ),
    Attr("StudyInstanceUID", "UI", lambda e: e.item.order.study_instance_uid),
    Attr("ReferencedStudySequence", "SQ", lambda e: (), REF),
    Attr("RequestedProcedurePriority", "SH", lambda e: e.item.order.priority),
    Attr("PatientTransportArrangements", "LO", lambda e: e.item.order.transport_arrangements),
    # Imaging Service Request
    Attr("AccessionNumber", "SH", lambda e: e.item.order.accession_number),
    Attr("RequestingPhysician", "PN", lambda e: e.item.order.requesting_physician),
    Attr("ReferringPhysicianName", "PN", lambda e: e.item.order.referring_physician),
    # Visit Identification, Status, Relationship
    Attr("AdmissionID", "LO", lambda e: e.item.order.admission_id),
    Attr("CurrentPatientLocation", "LO", lambda e: e.item.order.current_location),
    Attr("ReferencedPatientSequence", "SQ", lambda e: (), REF),
    # Patient Identification, Demographic, Medical
    Attr("PatientName", "PN", lambda e: e.item.patient.name),
    Attr("PatientID", "LO", lambda e: e.item.patient.id),
    Attr("IssuerOfPatientID", "LO", lambda e: e.item.patient.issuer, optional=True),
    Attr("PatientBirthDate", "DA", lambda e: _da(e.item.patient.birth_date)),
    Attr("PatientSex", "CS", lambda e: e.item.patient.sex),
    Attr("PatientWeight", "DS", lambda e: _ds(e.item.patient.weight_kg)),
    Attr("PatientSize", "DS", lambda e: _ds(e.item.patient.size_m), optional=True),
    Attr(
        "ConfidentialityConstraintOnPatientDataDescription",
        "LO",
        lambda e: e.item.patient.confidentiality,
    ),
    Attr("PatientState", "LO", lambda e: e.item.patient.patient_state),
    Attr("PregnancyStatus", "US", lambda e: e.item.patient.pregnancy_status),
    Attr("MedicalAlerts", "LO", lambda e: e.item.patient.medical_alerts),
    Attr("Allergies", "LO", lambda e: e.item.patient.allergies),
    Attr("SpecialNeeds", "LO", lambda e: e.item.patient.special_needs),
)

#: Tag -> row, per level, for the query parser.
ITEM_BY_TAG: dict[int, Attr] = {a.tag: a for a in ITEM}
CHILDREN_BY_TAG: dict[int, dict[int, Attr]] = {
    a.tag: {c.tag: c for c in a.children} for a in (*ITEM, *SPS) if a.vr == "SQ"
}


def element_value(attr: Attr, value: Any) -> Any:
    """Convert a ``get`` result to what pydicom stores for an element of ``attr.vr``,
    bounded to what the VR allows (:func:`bound_value`)."""
    if isinstance(value, str):
        value = bound_value(attr.tag, attr.vr, value)
    if value == "" and attr.vr in ("US", "DS", "IS"):
        return None
    return value


class UnboundedValueError(ValueError):
    """An identifying value does not fit its VR: the entry must not be sent.

    Cutting an identifier would make it another one (a truncated Patient ID or
    Accession Number can name another patient's order), so such an entry is left out
    of the response rather than bounded.
    """


#: PS3.5 Table 6.2-1 maximum value lengths (characters; PN per component group).
MAX_LENGTH = {
    "AE": 16, "AS": 4, "CS": 16, "DA": 8, "DS": 16, "DT": 26, "IS": 12, "LO": 64,
    "LT": 10240, "PN": 64, "SH": 16, "ST": 1024, "TM": 14, "UI": 64,
    "UC": 65536, "UT": 65536, "UR": 65536,
}  # fmt: skip
#: Identifying attributes: refused (the entry left out), never cut.
IDENTIFIERS = frozenset(
    int(tag_for_keyword(k) or 0)
    for k in (
        "PatientID", "IssuerOfPatientID", "AccessionNumber", "RequestedProcedureID",
        "ScheduledProcedureStepID", "StudyInstanceUID", "AdmissionID",
        "ReferencedSOPInstanceUID", "ReferencedSOPClassUID", "ScheduledStationAETitle",
    )
)  # fmt: skip
#: Values that a cut would make wrong rather than short: emptied (Type 2: present,
#: no value) instead.
_EXACT_VRS = frozenset({"AS", "DA", "DS", "DT", "IS", "TM", "UI", "AE"})
#: ST, LT, UT may hold CR, LF, FF and TAB (PS3.5 6.1.3); no other control characters
#: anywhere. ESC only introduces ISO 2022 code extensions, which our responses
#: (ISO_IR 100 or ISO_IR 192, PS3.5 6.1.2.5) never use.
_TEXT_CONTROLS = "\t\n\f\r"
_CONTROL = {c: None for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
_TEXT_CONTROL = {c: None for c in _CONTROL if chr(c) not in _TEXT_CONTROLS}
_CS_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _")


def bound_value(tag: int, vr: str, value: str) -> str:
    """``value`` made valid for ``vr`` (PS3.5 6.2), with a WARNING when changed.

    Display text (PN, LO, SH, ST, LT, UT, UC) is cut to the VR's length and loses
    control characters: an order whose name is too long must still reach the
    modality readable. CS is upper-cased and limited to its repertoire. Dates, times,
    numbers, UIDs and AE titles are emptied instead: a cut one is a wrong one.
    Identifying attributes (:data:`IDENTIFIERS`) that do not fit raise.

    Raises
    ------
    UnboundedValueError
        An identifier longer than its VR or with characters it does not allow.
    """
    limit = MAX_LENGTH.get(vr)
    if limit is None:
        return value
    table = _TEXT_CONTROL if vr in ("ST", "LT", "UT") else _CONTROL
    multi = vr not in ("ST", "LT", "UT", "UR")
    cleaned = value.translate(table)
    if multi and "\\" in cleaned and dictionary_VM(tag) == "1":
        cleaned = cleaned.replace("\\", " ")  # a delimiter would make it two values
    parts = cleaned.split("\\") if multi else [cleaned]
    bounded = [_bound_one(vr, part, limit) for part in parts]
    out = "\\".join(bounded) if multi else bounded[0]
    if out != value:
        if tag in IDENTIFIERS:
            raise UnboundedValueError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) out of VR {vr}")
        logger.warning(
            "worklist value of (%04X,%04X) %s bounded: %d characters sent of %d",
            tag >> 16,
            tag & 0xFFFF,
            vr,
            len(out),
            len(value),
        )
    return out


def _bound_group(group: str, limit: int) -> str:
    """A PN component group within ``limit``: the longest component is cut first, so
    an over-long family name still leaves the given name (PS3.5 6.2.1)."""
    parts = group.split("^")[:5]
    while len("^".join(parts)) > limit:
        longest = max(range(len(parts)), key=lambda i: len(parts[i]))
        excess = len("^".join(parts)) - limit
        parts[longest] = parts[longest][: max(len(parts[longest]) - excess, 0)]
    return "^".join(parts)


def _bound_one(vr: str, part: str, limit: int) -> str:
    if vr == "PN":
        # 64 characters per component group, at most 3 groups of 5 components.
        return "=".join(_bound_group(g, limit) for g in part.split("=")[:3])
    if vr == "CS":
        # Accents dropped first (NFKD), so "ÇT" becomes "CT" rather than "T".
        decomposed = unicodedata.normalize("NFKD", part)
        upper = "".join(c for c in decomposed if not unicodedata.combining(c)).upper()
        return "".join(c for c in upper if c in _CS_CHARS)[:limit]
    if vr in _EXACT_VRS:
        return part if len(part) <= limit and part.isascii() else ""
    return part[:limit]


#: One response element before encoding: (tag, VR, value). A SQ value is a list of
#: items, each a list of nodes; other values are what pydicom stores for the VR.
Node = tuple[int, str, Any]


def collect(attrs: tuple[Attr, ...], ctx: Any, non_ascii: list[str]) -> list[Node]:
    """Every attribute of ``attrs`` read from ``ctx``, as nodes in table order.

    Type 3/1C attributes without a value are left out. Non-ASCII text values are
    appended to ``non_ascii`` so the caller can choose the Specific Character Set.
    """
    out: list[Node] = []
    for attr in attrs:
        value = attr.get(ctx)
        if attr.vr == "SQ":
            out.append((attr.tag, "SQ", [collect(attr.children, c, non_ascii) for c in value]))
            continue
        if attr.optional and value in ("", None):
            continue
        value = element_value(attr, value)
        if isinstance(value, str) and not value.isascii():
            non_ascii.append(value)
        out.append((attr.tag, attr.vr, value))
    return out


def add_nodes(ds: Dataset, nodes: list[Node]) -> Dataset:
    """Add ``nodes`` to ``ds`` as pydicom elements; return ``ds``."""
    for tag, vr, value in nodes:
        if vr == "SQ":
            ds.add_new(tag, vr, [add_nodes(Dataset(), item) for item in value])
        else:
            ds.add_new(tag, vr, value)
    return ds


def fill(attrs: tuple[Attr, ...], ctx: Any, ds: Dataset, non_ascii: list[str]) -> None:
    """Add every attribute of ``attrs`` read from ``ctx`` to ``ds`` (see :func:`collect`)."""
    add_nodes(ds, collect(attrs, ctx, non_ascii))


def full_dataset(item: WorklistItem, sps: ScheduledProcedureStep) -> Dataset:
    """All attributes of one worklist entry; see :func:`worklist.model.to_dataset`."""
    ds = Dataset()
    non_ascii: list[str] = []
    fill(ITEM, Entry(item, sps), ds, non_ascii)
    if non_ascii:
        ds.SpecificCharacterSet = "ISO_IR 192"
    return ds
