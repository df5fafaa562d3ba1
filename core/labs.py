"""Value objects for parsed lab results: what every lab parser returns
(``ingest/labs/parsers/``) and the lab result service files
(``services/lab_results.py``), so they live below both.

The shape follows what the wire formats carry in common: ASTM E1394-97 (CLSI
LIS2-A2) records H/P/O/R/C and HL7 v2.5.1 chapter 7 (ORU^R01, OUL^R22) segments
MSH/PID/OBR/OBX/NTE/SPM. Values are kept twice where meaning could be lost: as sent
(``raw_value``, ``unit``, ``reference_range``, ``status_code``) and interpreted
(``value``, ``ucum_unit``, ``reference_low``/``reference_high``, ``status``), so the
caller can always show what the analyzer said.

Patient data lives only in :class:`LabPatient`, whose fields are excluded from
``repr`` so that logging a message by accident does not leak it (STYLE.md §5).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from enum import StrEnum
from typing import Literal

__all__ = [
    "Coding",
    "Comparator",
    "LabMessage",
    "LabObservation",
    "LabOrder",
    "LabPatient",
    "MessageFormat",
    "ParseResult",
    "ParseWarning",
    "ResultStatus",
]

#: A numeric comparator prefixed to a value (``<0.5``) or given as SN component 1.
Comparator = Literal["<", ">", "<=", ">="]

#: Which parser produced a message.
MessageFormat = Literal["astm", "hl7v2", "delimited"]


class ResultStatus(StrEnum):
    """Interpreted result status.

    Mapped from ASTM E1394 R.9 (result status, §10.1.9) and HL7 v2.5.1 OBX-11
    (table 0085). Codes with no equivalent map to ``None`` on the observation; the
    code as sent is always kept in :attr:`LabObservation.status_code`.
    """

    PRELIMINARY = "preliminary"
    FINAL = "final"
    CORRECTED = "corrected"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class Coding:
    """A coded concept: code, display text and coding system.

    ``system`` is ``"LN"`` for LOINC (HL7 table 0396), ``"local"`` for an analyzer's
    or laboratory's own code when the sender names none, or the name the sender gave
    (``"MAYO"``, ``"L"``, ``"C4"``).
    """

    code: str
    display: str = ""
    system: str = "local"


@dataclass(frozen=True, slots=True, kw_only=True)
class LabObservation:
    """One result: an ASTM R record (E1394 §10), an HL7 OBX segment or an export row.

    Attributes
    ----------
    where : str
        Location for error reports, e.g. ``"message 2, line 14 (R)"``.
    test : Coding
        The test: ASTM universal test ID (R.3, §10.1.3; component 4 is the
        manufacturer's code), HL7 OBX-3 identifier, or the export's test column.
    test_alternates : tuple of Coding
        Further codings of the same test: HL7 CE/CWE alternate identifier (OBX-3
        components 4-6, e.g. LOINC beside a local code), or a profile's code map.
    test_raw : str
        The test identifier field exactly as sent (vendors put result kinds and lot
        numbers in extra components, e.g. ARCHITECT's ``…^F`` / ``…^I`` / ``…^P``).
    sub_id : str
        HL7 OBX-4 observation sub-ID; empty for ASTM.
    value_type : str
        HL7 OBX-2 (``NM``, ``SN``, ``ST``, ``TX``, ``FT``, ``CE``, ``CWE``, ``ED``…).
        ASTM and exports carry no type: ``"NM"`` when the value is a number, else
        ``"ST"``.
    raw_value : str
        The value field exactly as sent, escapes and separators included
        (``>8``, ``***.**``, ``3+^3+^45``, ``^>^8``).
    text : str
        The value decoded for display: escapes resolved, SN rebuilt (``>8``),
        CE/CWE display text, components joined by ``^``.
    value_components : tuple of str
        The decoded components of the first repeat of the value.
    value : float or None
        The number, when the value is numeric (NM, SN, or a numeric ASTM/export
        value), with any comparator moved to ``comparator``.
    comparator : {"<", ">", "<=", ">="} or None
    coded_value : Coding or None
        For CE/CWE values: the coded answer (e.g. ``LA12432-3^Acceptable^LN``).
    unit : str
        Units as sent (ASTM R.5, HL7 OBX-6 identifier).
    ucum_unit : str or None
        The UCUM form, where the unit is in our table (:mod:`ingest.labs.units`).
    reference_range : str
        As sent (ASTM R.6, HL7 OBX-7).
    reference_low, reference_high : float or None
        Limits read from the range; a one-sided range (``<30``) sets one.
    flags : tuple of str
        Abnormal flags as sent, one per repeat (ASTM R.7, HL7 OBX-8 table 0078):
        ``N``, ``L``, ``H``, ``LL``, ``HH``, ``A``, ``<``, ``>``…
    status : ResultStatus or None
    status_code : str
        ASTM R.9 or HL7 OBX-11 as sent.
    specimen_id : str
        Sample barcode/accession: ASTM O.3, HL7 SPM-2 or OBR-3.
    instrument_id : str
        ASTM R.14, HL7 OBX-18 (first repeat), or the export's serial column.
    performed_at : datetime or None
        ASTM R.13 (completed) else R.12; HL7 OBX-19 (analysis) else OBX-14.
        Timezone-aware when the sender gave an offset.
    is_qc : bool
        Quality-control material, not a patient sample.
    comments : tuple of str
        ASTM C records or HL7 NTE segments that follow this result.
    order_index : int or None
        Index into :attr:`LabMessage.orders` of the order this result belongs to.
    patient_index : int or None
        Index into :attr:`LabMessage.patients`.
    """

    where: str
    test: Coding
    test_alternates: tuple[Coding, ...] = ()
    test_raw: str = ""
    sub_id: str = ""
    value_type: str = "ST"
    raw_value: str = ""
    text: str = ""
    value_components: tuple[str, ...] = ()
    value: float | None = None
    comparator: Comparator | None = None
    coded_value: Coding | None = None
    unit: str = ""
    ucum_unit: str | None = None
    reference_range: str = ""
    reference_low: float | None = None
    reference_high: float | None = None
    flags: tuple[str, ...] = ()
    status: ResultStatus | None = None
    status_code: str = ""
    specimen_id: str = ""
    instrument_id: str = ""
    performed_at: datetime | None = None
    is_qc: bool = False
    comments: tuple[str, ...] = ()
    order_index: int | None = None
    patient_index: int | None = None

    @property
    def test_code(self) -> str:
        """The primary test code (``test.code``)."""
        return self.test.code

    @property
    def loinc(self) -> str | None:
        """The LOINC code among ``test`` and ``test_alternates``, if any."""
        for coding in (self.test, *self.test_alternates):
            if coding.system == "LN":
                return coding.code
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class LabPatient:
    """The patient a result is for: ASTM P record (E1394 §8.1) or HL7 PID.

    Every identifying field is left out of ``repr``: keep it, never log it.

    Attributes
    ----------
    where : str
    patient_id : str
        ASTM P.3, else P.4, else P.5; HL7 PID-3 (first repeat, ID component).
    issuer : str
        Assigning authority of ``patient_id``: HL7 PID-3.4 (namespace ID, else
        universal ID); ASTM carries none (the profile's or hospital's applies).
    name : str
        As sent, components joined by ``^`` (family^given^middle…).
    birth_date : date or None
    sex : str
        ASTM P.9 / HL7 PID-8 as sent (``M``, ``F``, ``U``…).
    """

    where: str
    patient_id: str = field(default="", repr=False)
    issuer: str = ""
    name: str = field(default="", repr=False)
    birth_date: date | None = field(default=None, repr=False)
    sex: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class LabOrder:
    """An order a result answers: ASTM O record (E1394 §9) or HL7 OBR/ORC/SPM.

    Attributes
    ----------
    where : str
    specimen_id : str
        Sample barcode / accession: ASTM O.3 (else O.4 component 1); HL7 SPM-2,
        else OBR-3 (filler order number), else OBR-2.
    instrument_specimen_id : str
        ASTM O.4 as sent (``barcode^rack^position`` on many analyzers).
    placer_order_id, filler_order_id : str
        HL7 OBR-2 / OBR-3 entity identifiers; empty for ASTM.
    test_codes : tuple of str
        ASTM O.5 (one per repeat) or HL7 OBR-4 identifier.
    panel : Coding or None
        The ordered panel/test as a coding (HL7 OBR-4 identifier^text^system; ASTM
        O.5 when it names one test): FHIR DiagnosticReport.code.
    priority : str
        ASTM O.6 (``S`` stat, ``A`` ASAP, ``R`` routine); HL7 OBR-5, TQ1-9 or
        ORC-7 component 6.
    action_code : str
        ASTM O.12 (``Q`` = QC); HL7 OBR-11, else ORC-1 (order control).
    is_qc : bool
    comments : tuple of str
    patient_index : int or None
    """

    where: str
    specimen_id: str = ""
    instrument_specimen_id: str = ""
    placer_order_id: str = ""
    filler_order_id: str = ""
    test_codes: tuple[str, ...] = ()
    panel: Coding | None = None
    priority: str = ""
    action_code: str = ""
    is_qc: bool = False
    comments: tuple[str, ...] = ()
    patient_index: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class LabMessage:
    """One message: an ASTM H…L transmission, one HL7 MSH…, or one export file.

    Attributes
    ----------
    format : {"astm", "hl7v2", "delimited"}
    where : str
    message_type : str
        ``"ORU^R01"``/``"OUL^R22"`` for HL7; ``"ASTM"`` or the profile name.
    sender : str
        ASTM H.5 component 1; HL7 MSH-3 (namespace ID); profile's instrument.
    control_id : str
        ASTM H.3; HL7 MSH-10.
    timestamp : datetime or None
        ASTM H.14; HL7 MSH-7.
    patients : tuple of LabPatient
        ASTM allows several P records per message (one per patient), so this is a
        tuple; :attr:`patient` gives the first.
    orders : tuple of LabOrder
    observations : tuple of LabObservation
    queries : tuple of str
        Specimen IDs asked for by ASTM Q records (E1394 §12), a host query.
    comments : tuple of str
        Comments not attached to an order or result (HL7 NTE after MSH/PID).
    is_qc : bool
        ASTM H.12 processing ID ``Q``, or every order in the message is QC.
    """

    format: MessageFormat
    where: str
    message_type: str = ""
    sender: str = ""
    control_id: str = ""
    timestamp: datetime | None = None
    patients: tuple[LabPatient, ...] = ()
    orders: tuple[LabOrder, ...] = ()
    observations: tuple[LabObservation, ...] = ()
    queries: tuple[str, ...] = ()
    comments: tuple[str, ...] = ()
    is_qc: bool = False

    @property
    def patient(self) -> LabPatient | None:
        """The first patient, or ``None`` (QC messages often carry none)."""
        return self.patients[0] if self.patients else None


@dataclass(frozen=True, slots=True)
class ParseWarning:
    """Something odd that was handled; never contains patient data."""

    message: str
    where: str = ""

    def __str__(self) -> str:
        return self.message if not self.where else f"{self.message} (at {self.where})"


@dataclass(frozen=True, slots=True)
class ParseResult:
    """What a parser returns: the messages of one file plus handled anomalies."""

    messages: tuple[LabMessage, ...]
    warnings: tuple[ParseWarning, ...] = ()

    @property
    def observations(self) -> tuple[LabObservation, ...]:
        """All observations of all messages, in file order."""
        return tuple(obs for msg in self.messages for obs in msg.observations)
