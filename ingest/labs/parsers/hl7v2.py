"""HL7 v2.3-2.5.1 result messages (ORU^R01, OUL^R22, ORU^R30-R32): bytes → messages.

Reads the segments HL7 v2.5.1 chapter 7 (Observation Reporting) defines for
results: MSH (§2.15.9), PID (§3.4.2), ORC (§4.5.1), OBR (§7.4.1), TQ1 (§4.5.4),
OBX (§7.4.2), NTE (§2.15.10) and SPM (§7.4.3). Other segments (PV1, NK1, SFT…)
are skipped. A file may hold several messages (split at MSH); every message must
be a result: orders (ORM, OML), order responses (ORL, ORR), acknowledgements and
administrative messages raise :class:`~core.errors.LabMessageError` naming the
type, unless the caller asks to skip them.

OBX-5 is read according to OBX-2 (table 0125): NM as a number (a comparator
prefix such as ``<0.5`` is accepted), SN as comparator^num1^separator^num2,
CE/CWE/CNE as a coded answer, ST/TX/FT as text (repeats joined by line breaks),
ED as encapsulated data (the data component is the text). An unknown type
(``FN``) is read as text, with a warning.

Specimens (SPM) follow their results in ORU^R01 and precede their orders in
OUL^R22; real OUL senders also put them last, so an SPM fills the current order
when that order has no specimen yet.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

from core.errors import LabMessageError
from core.lab_values import (
    DecimalComma,
    parse_birth_date,
    parse_number,
    parse_reference_range,
    parse_status,
    parse_timestamp,
)
from core.labs import (
    Coding,
    Comparator,
    LabMessage,
    LabObservation,
    LabOrder,
    LabPatient,
    ParseResult,
    ParseWarning,
)
from ingest.labs.parsers._hl7 import (
    Delimiters,
    HL7Message,
    read_message,
    read_message_type,
    split_messages,
    unescaper,
)
from ingest.labs.units import normalise_unit

__all__ = ["describe_message_type", "message_type", "parse"]

_RESULT_CODES: Final = frozenset({"ORU", "OUL"})
_KINDS: Final[dict[str, str]] = {
    **dict.fromkeys(
        ("ORM", "OML", "OMG", "OMB", "OMD", "OMI", "OMN", "OMP", "OMS", "OMQ", "RDE"),
        "an order",
    ),
    **dict.fromkeys(
        ("ORR", "ORL", "ORG", "ORB", "ORD", "ORI", "ORN", "ORP", "ORS", "RRE"),
        "an order response",
    ),
    **dict.fromkeys(("ACK", "MCF"), "an acknowledgement"),
    "ADT": "a patient administration message",
    **dict.fromkeys(("QRY", "QBP", "VXQ", "QSB", "QCN"), "a query"),
    **dict.fromkeys(("RSP", "RTB", "RDY", "RSP", "TBR"), "a query response"),
    "MDM": "a medical document message",
    "SIU": "a scheduling message",
    **dict.fromkeys(("DFT", "BAR"), "a financial message"),
    "MFN": "a master file message",
}
_NUMERIC: Final = frozenset({"NM", "SN"})
_CODED: Final = frozenset({"CE", "CWE", "CNE", "CF"})
_TEXT: Final = frozenset({"ST", "TX", "FT"})
#: HL7 v2.5.1 table 0125, value types allowed in OBX-2.
_VALUE_TYPES: Final = frozenset(
    {
        *("AD", "CE", "CF", "CK", "CN", "CNE", "CP", "CWE", "CX", "DT", "DTM", "ED"),
        *("FT", "ID", "IS", "MA", "MO", "NA", "NM", "PN", "RP", "SN", "ST", "TM"),
        *("TN", "TS", "TX", "XAD", "XCN", "XON", "XPN", "XTN"),
    }
)
#: HL7 v2.5.1 table 0369 specimen roles that are not patient samples.
_QC_ROLES: Final = frozenset({"C", "E", "F", "O", "Q", "V"})
_SN_COMPARATORS: Final[dict[str, Comparator]] = {
    "<": "<",
    ">": ">",
    "<=": "<=",
    ">=": ">=",
}


def describe_message_type(kind: str) -> str | None:
    """Why a message type is not a result, or ``None`` when it is one.

    Parameters
    ----------
    kind : str
        ``CODE^TRIGGER`` as returned by :func:`message_type`.

    Returns
    -------
    str or None
        E.g. ``"ORM^O01 is an order, not a result message"``.
    """
    code = kind.split("^", 1)[0]
    if not code:
        return "MSH-9 message type is empty"
    if code in _RESULT_CODES:
        return None
    what = _KINDS.get(code)
    if what is None:
        return f"{kind} is not a result message (expected ORU or OUL)"
    return f"{kind} is {what}, not a result message"


def message_type(raw: bytes) -> str:
    """The type of the first HL7 message in ``raw``, as ``CODE^TRIGGER``.

    Pure and cheap: it reads only the first MSH segment. The lab watcher uses it to
    send orders (ORM/OML) to the worklist side and results here.

    Parameters
    ----------
    raw : bytes
        A file with one or more HL7 v2 messages.

    Returns
    -------
    str
        ``"ORU^R01"``, ``"OML^O21"``, ``"ACK"``…

    Raises
    ------
    LabMessageError
        When there is no MSH segment or it declares unusable delimiters.
    """
    message, _ = read_message(split_messages(raw)[0], 1)
    return read_message_type(message.segments[0], message.delimiters)


def parse(
    raw: bytes, *, skip_non_results: bool = False, decimal_comma: DecimalComma = False
) -> ParseResult:
    """Parse HL7 v2 result messages.

    Parameters
    ----------
    raw : bytes
        One file: one or more messages, segments ended by CR, LF or CRLF,
        optionally MLLP-wrapped or after a UTF-8 BOM. Each message is decoded
        with its MSH-18 character set, or as UTF-8 falling back to Latin-1.
    skip_non_results : bool
        Leave out messages that are not results with a warning instead of
        rejecting the file; for batch files that mix orders and results.
    decimal_comma : bool or "auto"
        How a comma in an NM/SN value (OBX-5) or a range (OBX-7) is read
        (:func:`core.lab_values.parse_number`); HL7 v2.5.1 §2.A.47 says NM
        uses ``.``, but Vietnamese-locale senders write ``7,85``. Each value read
        with a decimal comma is counted in one warning.

    Returns
    -------
    ParseResult

    Raises
    ------
    LabMessageError
        For a file without MSH, a message that is not a result (unless skipped),
        unusable delimiters or an unsupported MSH-18 character set.
    """
    messages: list[LabMessage] = []
    warnings: list[ParseWarning] = []
    comma_values: list[str] = []
    for index, piece in enumerate(split_messages(raw), 1):
        message, read_warnings = read_message(piece, index)
        warnings.extend(read_warnings)
        kind = read_message_type(message.segments[0], message.delimiters)
        reason = describe_message_type(kind)
        if reason is not None:
            if skip_non_results:
                warnings.append(ParseWarning(f"skipped: {reason}", f"message {index}"))
                continue
            raise LabMessageError(reason, where=f"message {index}, segment 1 (MSH)")
        reader = _MessageReader(message, kind, warnings)
        reader.decimal_comma = decimal_comma
        reader.comma_values = comma_values
        messages.append(reader.read())
    if comma_values:
        warnings.append(
            ParseWarning(
                f"comma read as the decimal mark in {len(comma_values)} value(s)", comma_values[0]
            )
        )
    return ParseResult(tuple(messages), tuple(warnings))


@dataclass(slots=True)
class _Order:
    where: str
    patient_index: int | None
    placer: str = ""
    filler: str = ""
    test_code: str = ""
    panel: Coding | None = None
    priority: str = ""
    specimen_action: str = ""
    order_control: str = ""
    orc_priority: str = ""
    tq1_priority: str = ""
    specimens: list[str] = field(default_factory=list)
    is_qc: bool = False
    comments: list[str] = field(default_factory=list)
    has_observations: bool = False


@dataclass(slots=True)
class _Specimen:
    specimen_id: str
    is_qc: bool


class _MessageReader:
    """One message's segments → :class:`LabMessage` (HL7 v2.5.1 chapter 7 structures)."""

    def __init__(self, message: HL7Message, kind: str, warnings: list[ParseWarning]) -> None:
        self.message = message
        self.kind = kind
        self.warnings = warnings
        self.d: Delimiters = message.delimiters
        self.unescape = unescaper(message.delimiters, message.codec)
        # OUL^R22 puts SPM before the OBRs it applies to; ORU puts it after.
        self.specimen_first = kind.startswith("OUL")
        self.patients: list[LabPatient] = []
        self.orders: list[_Order] = []
        self.observations: list[dict[str, object]] = []
        self.comments: list[str] = []
        self.current: _Order | None = None
        self.pending_specimen: _Specimen | None = None
        self.pending_orc: tuple[str, str, str, str] | None = None
        self.nte_target: str = "message"
        self.decimal_comma: DecimalComma = False
        self.comma_values: list[str] = []

    # -- field access -------------------------------------------------------

    def components(self, text: str) -> list[str]:
        """Decoded components of the first repeat, trailing empties removed."""
        d = self.d
        if d.repeat in text:
            text = text.split(d.repeat, 1)[0]
        if d.component not in text:
            return [self.unescape(text)] if text else []
        parts = text.split(d.component)
        while parts and not parts[-1]:
            parts.pop()
        unescape = self.unescape
        return [unescape(p) for p in parts]

    def first(self, text: str) -> str:
        """The first component of the first repeat, decoded."""
        d = self.d
        if d.repeat in text:
            text = text.split(d.repeat, 1)[0]
        if d.component in text:
            text = text.split(d.component, 1)[0]
        return self.unescape(text)

    def coding(self, text: str) -> Coding | None:
        """A CE/CWE (identifier^text^coding system), or None when it has no identifier."""
        comps = self.components(text)
        if not _component(comps, 1):
            return None
        return Coding(_component(comps, 1), _component(comps, 2), _component(comps, 3) or "local")

    def assigning_authority(self, text: str) -> str:
        """CX.4 (HD) of the first repeat: namespace ID, else universal ID (PID-3.4)."""
        d = self.d
        first = text.split(d.repeat, 1)[0]
        parts = first.split(d.component)
        if len(parts) < 4:
            return ""
        hd = [self.unescape(p).strip() for p in parts[3].split(d.subcomponent)]
        return hd[0] or (hd[1] if len(hd) > 1 else "")

    def entity(self, text: str) -> str:
        """The entity identifier of an EI, ignoring misplaced subcomponents."""
        value = self.first(text)
        return value.split(self.d.subcomponent, 1)[0] if self.d.subcomponent in value else value

    def stamp(self, text: str, name: str, where: str) -> datetime | None:
        value = self.first(text)
        if not value:
            return None
        parsed = parse_timestamp(value)
        if parsed is None:
            self.warnings.append(ParseWarning(f"{name} is not a valid date/time", where))
        return parsed

    # -- segments ------------------------------------------------------------

    def read(self) -> LabMessage:
        msh = self.message.segments[0]
        index = self.message.index
        for number, seg in enumerate(self.message.segments, 1):
            name = seg[0]
            where = f"message {index}, segment {number} ({name})"
            if name == "OBX":
                self.obx(seg, where)
            elif name == "NTE":
                self.nte(seg)
            elif name == "OBR":
                self.obr(seg, where)
            elif name == "ORC":
                self.orc(seg)
            elif name == "SPM":
                self.spm(seg)
            elif name == "TQ1":
                if self.current is not None:
                    self.current.tq1_priority = self.first(_get(seg, 9))
            elif name == "PID":
                self.pid(seg, where)
        where = f"message {index}, segment 1 (MSH)"
        orders = tuple(self.build_order(o) for o in self.orders)
        observations = tuple(self.build_observation(o, orders) for o in self.observations)
        return LabMessage(
            format="hl7v2",
            where=where,
            message_type=self.kind,
            sender=self.first(_get(msh, 3)),
            control_id=self.unescape(_get(msh, 10)),
            timestamp=self.stamp(_get(msh, 7), "MSH-7", where),
            patients=tuple(self.patients),
            orders=orders,
            observations=observations,
            comments=tuple(self.comments),
            is_qc=bool(orders) and all(o.is_qc for o in orders),
        )

    def pid(self, seg: list[str], where: str) -> None:
        pid3 = _get(seg, 3) if self.entity(_get(seg, 3)) else _get(seg, 2)
        patient_id = self.entity(pid3)
        dob = self.first(_get(seg, 7))
        birth_date = parse_birth_date(dob) if dob else None
        if dob and birth_date is None:
            self.warnings.append(ParseWarning("PID-7 birth date is not a valid date", where))
        self.patients.append(
            LabPatient(
                where=where,
                patient_id=patient_id,
                issuer=self.assigning_authority(pid3),
                name="^".join(self.components(_get(seg, 5))),
                birth_date=birth_date,
                sex=self.first(_get(seg, 8)),
            )
        )
        self.current = None
        self.pending_specimen = None
        self.nte_target = "message"

    def orc(self, seg: list[str]) -> None:
        info = (
            self.first(_get(seg, 1)),
            self.entity(_get(seg, 2)),
            self.entity(_get(seg, 3)),
            _component(self.components(_get(seg, 7)), 6),
        )
        current = self.current
        if current is not None and self.nte_target == "order" and not current.order_control:
            # The OUL^R22 structure puts OBR before ORC: merge into the order just read.
            self.apply_orc(current, info)
        else:
            self.pending_orc = info

    @staticmethod
    def apply_orc(order: _Order, info: tuple[str, str, str, str]) -> None:
        order.order_control = info[0]
        order.placer = order.placer or info[1]
        order.filler = order.filler or info[2]
        order.orc_priority = info[3]

    def obr(self, seg: list[str], where: str) -> None:
        order = _Order(
            where=where,
            patient_index=len(self.patients) - 1 if self.patients else None,
            placer=self.entity(_get(seg, 2)),
            filler=self.entity(_get(seg, 3)),
            test_code=self.first(_get(seg, 4)),
            panel=self.coding(_get(seg, 4)),
            priority=self.first(_get(seg, 5)),
            specimen_action=self.first(_get(seg, 11)),
        )
        if self.pending_orc is not None:
            self.apply_orc(order, self.pending_orc)
            self.pending_orc = None
        if self.pending_specimen is not None:
            order.specimens.append(self.pending_specimen.specimen_id)
            order.is_qc = self.pending_specimen.is_qc
        self.orders.append(order)
        self.current = order
        self.nte_target = "order"

    def spm(self, seg: list[str]) -> None:
        d = self.d
        eip = _get(seg, 2).split(d.repeat, 1)[0].split(d.component)
        specimen_id = ""
        for ei in eip:
            specimen_id = self.unescape(ei.split(d.subcomponent, 1)[0]).strip()
            if specimen_id:
                break
        role = self.first(_get(seg, 11)).upper()
        spec = _Specimen(specimen_id, role in _QC_ROLES)
        current = self.current
        if current is not None and (not self.specimen_first or not current.specimens):
            current.specimens.append(spec.specimen_id)
            current.is_qc = current.is_qc or spec.is_qc
        else:
            # A specimen group opens: following OBX without OBR describe the specimen.
            self.pending_specimen = spec
            self.current = None
        self.nte_target = "order" if self.current is not None else "message"

    def nte(self, seg: list[str]) -> None:
        d = self.d
        text = "\n".join(self.unescape(rep) for rep in _get(seg, 3).split(d.repeat))
        if self.nte_target == "observation" and self.observations:
            comments = self.observations[-1]["comments"]
            assert isinstance(comments, list)
            comments.append(text)
        elif self.nte_target == "order" and self.current is not None:
            self.current.comments.append(text)
        else:
            self.comments.append(text)

    def obx(self, seg: list[str], where: str) -> None:
        d = self.d
        unescape = self.unescape
        value_type = _get(seg, 2).strip().upper()
        id_comps = self.components(_get(seg, 3))
        test = Coding(
            _component(id_comps, 1), _component(id_comps, 2), _component(id_comps, 3) or "local"
        )
        alternates: tuple[Coding, ...] = ()
        if _component(id_comps, 4):
            alternates = (
                Coding(
                    _component(id_comps, 4),
                    _component(id_comps, 5),
                    _component(id_comps, 6) or "local",
                ),
            )
        raw_value = _get(seg, 5)
        reading = self.read_value(value_type, raw_value, where)
        unit_comps = self.components(_get(seg, 6))
        unit = _component(unit_comps, 1) or _component(unit_comps, 2)
        if _component(unit_comps, 3).upper() == "UCUM" and unit:
            ucum: str | None = unit
        else:
            ucum = normalise_unit(unit) if unit else None
        range_text = unescape(_get(seg, 7))
        low, high = (
            parse_reference_range(range_text, decimal_comma=self.decimal_comma)
            if range_text
            else (None, None)
        )
        flags_field = _get(seg, 8)
        flags = (
            tuple(f for f in (self.first(rep) for rep in flags_field.split(d.repeat)) if f)
            if flags_field
            else ()
        )
        status_code = self.first(_get(seg, 11))
        performed = _get(seg, 19) or _get(seg, 14)
        self.observations.append(
            {
                "where": where,
                "test": test,
                "test_alternates": alternates,
                "test_raw": unescape(_get(seg, 3)),
                "sub_id": unescape(_get(seg, 4)),
                "value_type": value_type,
                "raw_value": raw_value,
                "text": reading.text,
                "value_components": reading.components,
                "value": reading.value,
                "comparator": reading.comparator,
                "coded_value": reading.coded,
                "unit": unit,
                "ucum_unit": ucum,
                "reference_range": range_text,
                "reference_low": low,
                "reference_high": high,
                "flags": flags,
                "status": parse_status(status_code),
                "status_code": status_code,
                "instrument_id": self.entity(_get(seg, 18)),
                "performed_at": self.stamp(performed, "OBX-19/OBX-14", where),
                "comments": [],
                "order": len(self.orders) - 1 if self.current is not None else None,
                "specimen": self.pending_specimen if self.current is None else None,
                "patient_index": len(self.patients) - 1 if self.patients else None,
            }
        )
        if self.current is not None:
            self.current.has_observations = True
        self.nte_target = "observation"

    def read_value(self, value_type: str, raw: str, where: str) -> _Reading:
        d = self.d
        comps = self.components(raw)
        if value_type and value_type not in _VALUE_TYPES:
            self.warnings.append(
                ParseWarning(
                    f"OBX-2 value type {value_type!r} is not in HL7 table 0125; read as text",
                    where,
                )
            )
        if value_type == "SN":
            reading = _structured_numeric(comps, self.decimal_comma)
            if reading.value is not None and "," in reading.text:
                self.comma_values.append(where)
            return reading
        if value_type in _CODED:
            coded = Coding(
                _component(comps, 1), _component(comps, 2), _component(comps, 3) or "local"
            )
            return _Reading(coded.display or coded.code, tuple(comps), coded=coded)
        if value_type == "ED":
            return _Reading(_component(comps, 5), tuple(comps))
        if value_type in _TEXT or d.repeat in raw:
            text = "\n".join("^".join(self.components(rep)) for rep in raw.split(d.repeat))
        else:
            text = "^".join(comps)
        if value_type == "NM":
            number, comparator = parse_number(text, decimal_comma=self.decimal_comma)
            if number is not None and "," in text:
                self.comma_values.append(where)
            if number is None and text:
                self.warnings.append(
                    ParseWarning("OBX-5 is not a number though OBX-2 is NM", where)
                )
            return _Reading(text, tuple(comps), number, comparator)
        return _Reading(text, tuple(comps))

    # -- assembly ------------------------------------------------------------

    def build_order(self, order: _Order) -> LabOrder:
        return LabOrder(
            where=order.where,
            specimen_id=(order.specimens[0] if order.specimens else "")
            or order.filler
            or order.placer,
            placer_order_id=order.placer,
            filler_order_id=order.filler,
            test_codes=(order.test_code,) if order.test_code else (),
            panel=order.panel,
            priority=order.priority or order.tq1_priority or order.orc_priority,
            action_code=order.specimen_action or order.order_control,
            is_qc=order.is_qc,
            comments=tuple(order.comments),
            patient_index=order.patient_index,
        )

    def build_observation(
        self, obs: dict[str, object], orders: tuple[LabOrder, ...]
    ) -> LabObservation:
        order = obs.pop("order")
        specimen = obs.pop("specimen")
        comments = obs.pop("comments")
        assert isinstance(comments, list)
        if isinstance(order, int):
            index: int | None = order
            specimen_id = orders[order].specimen_id
            is_qc = orders[order].is_qc
        else:
            index = None
            specimen_id = specimen.specimen_id if isinstance(specimen, _Specimen) else ""
            is_qc = specimen.is_qc if isinstance(specimen, _Specimen) else False
        return LabObservation(
            **obs,  # type: ignore[arg-type]
            comments=tuple(comments),
            specimen_id=specimen_id,
            is_qc=is_qc,
            order_index=index,
        )


@dataclass(frozen=True, slots=True)
class _Reading:
    text: str
    components: tuple[str, ...]
    value: float | None = None
    comparator: Comparator | None = None
    coded: Coding | None = None


def _structured_numeric(comps: list[str], decimal_comma: DecimalComma = False) -> _Reading:
    """SN (v2.5.1 §2.A, structured numeric): ``comparator^num1^separator^num2``.

    ``^182`` is 182, ``<^0.5`` is <0.5, ``^1^:^128`` a ratio and ``^2^-^5`` a
    range (no single number). Senders also shift the comparator one component
    right (``^>^8``); that is read as >8.
    """
    parts = [*comps, "", "", "", ""][:4]
    if not parts[0] and parts[1] in _SN_COMPARATORS and parts[2] and not parts[3]:
        parts = [parts[1], parts[2], "", ""]
    comparator_text, num1, separator, num2 = parts
    text = "".join(parts)
    comparator = _SN_COMPARATORS.get(comparator_text.strip())
    if separator or num2:
        return _Reading(text, tuple(comps), None, comparator)
    number, inner = parse_number(num1, decimal_comma=decimal_comma)
    if inner is not None and comparator is None:
        comparator = inner
    return _Reading(text, tuple(comps), number, comparator if number is not None else None)


def _get(seg: list[str], number: int) -> str:
    """Field ``number`` of a segment (``seg[0]`` is the segment ID)."""
    return seg[number] if len(seg) > number else ""


def _component(comps: list[str], number: int) -> str:
    """Component ``number`` (1-based) or empty."""
    return comps[number - 1] if len(comps) >= number else ""
