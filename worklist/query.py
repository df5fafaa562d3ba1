"""Modality Worklist C-FIND: identifier -> query -> matching responses (pure).

:func:`build_query` turns a C-FIND identifier into a :class:`WorklistQuery` once;
:func:`match` then tests a :class:`~worklist.model.WorklistItem` and returns one
response identifier per matching Scheduled Procedure Step (PS3.4 K.6.1.2.1: each
response carries one step).

Matching follows PS3.4 C.2.2.2 as Annex K uses it:

* Single Value Matching (C.2.2.2.1), case-sensitive except for PN, where case and
  accent insensitivity are options (C.2.2.2.1.1).
* List of UID Matching (C.2.2.2.2).
* Universal Matching (C.2.2.2.3): every key is returned, empty when we hold no value.
* Wild Card Matching with ``*`` and ``?`` (C.2.2.2.4) on AE, CS, LO, LT, PN, SH, ST,
  UC, UT; a wildcard in a DA, TM, UI or numeric key is refused.
* Range Matching of DA (C.2.2.2.5.1) and TM (C.2.2.2.5.2). When Scheduled Procedure
  Step Start Date and Start Time are both ranges they are one datetime range (remark
  on (0040,0003) in Table K.6-1, and C.2.2.2.5.4).
* Sequence Matching (C.2.2.2.6): a sequence key has one item; a stored sequence
  matches if one of its items matches, and only matching items are returned.
* An entity with an empty value fails every non-universal key (K.2.2.1.1.1), except
  a lone ``*`` (note 1 there).

Conformance choices (implementation-defined in the standard, listed here so the
conformance statement can quote them):

* Scheduled Station AE Title, Modality and Patient ID are Single Value Matching keys in
  Table K.6-1; we also apply C.2.2.2.4 wild cards to them, since their VRs allow it.
* A key with several values (backslash) that is not a UID list matches if any value
  matches.
* PN keys are compared with trailing empty components removed, against the whole
  value and against each component group (``=``).
* Truncated times are ranges of their precision at an upper bound: ``-18`` ends at
  18:59:59.999999.
* Keys outside the table are returned empty and the pending status becomes 0xFF01
  (PS3.4 Table K.4-1: optional keys not supported).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from core.errors import InvalidQueryError
from core.person_name import fold_person_name
from worklist._attributes import (
    CHILDREN_BY_TAG,
    ITEM_BY_TAG,
    Attr,
    Entry,
    Kind,
    Node,
    add_nodes,
    collect,
    element_value,
)
from worklist.model import OFFERED, SpsStatus, WorklistItem
from worklist.ports import CandidateFilter

if TYPE_CHECKING:
    from core.settings import WorklistSettings

__all__ = [
    "KeyQuery",
    "MatchOptions",
    "Projection",
    "WorklistQuery",
    "build_query",
    "fold_person_name",
    "iter_matches",
    "match",
    "matching_entries",
    "project",
    "respond",
]

Predicate = Callable[[Any], bool]

_SPECIFIC_CHARACTER_SET = 0x00080005
_TIMEZONE_OFFSET = 0x00080201
_SPS_SEQUENCE = 0x00400100
_SPS_START_DATE = 0x00400002
_SPS_START_TIME = 0x00400003
_STATION_AE = 0x00400001
_MODALITY = 0x00080060
_ACCESSION_NUMBER = 0x00080050
_PATIENT_ID = 0x00100020
_WILDCARDS = frozenset("*?")
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_TM = re.compile(r"(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?")


@dataclass(frozen=True, slots=True)
class MatchOptions:
    """Choices PS3.4 leaves to the SCP, and our limits.

    Parameters
    ----------
    pn_case_insensitive : bool
        PN keys ignore case (C.2.2.2.1.1).
    pn_accent_insensitive : bool
        PN keys ignore accents (C.2.2.2.1.1 note 1): Unicode canonical decomposition
        with combining marks dropped, plus ``Đ``/``đ`` -> ``D``/``d``, which Unicode
        does not decompose. Vietnamese names are often typed without diacritics at
        the modality console, so ``NGUYEN^VAN AN`` must find ``NGUYỄN^VĂN AN``.
    statuses : frozenset of SpsStatus
        Steps offered on the worklist; others never match.
    limit : int
        Most responses to one C-FIND; the shell ends with 0xA700 past it.
    """

    pn_case_insensitive: bool = True
    pn_accent_insensitive: bool = True
    statuses: frozenset[SpsStatus] = OFFERED
    limit: int = 500

    @classmethod
    def from_settings(cls, settings: WorklistSettings) -> MatchOptions:
        """Options from the ``worklist`` settings section."""
        return cls(
            pn_case_insensitive=settings.pn_case_insensitive,
            pn_accent_insensitive=settings.pn_accent_insensitive,
            limit=settings.max_results,
        )


@dataclass(frozen=True, slots=True)
class KeyQuery:
    """One key of the identifier: what to return, and how to test it.

    ``attr`` is None for keys outside our table (returned empty). For a sequence key
    ``keys`` holds its item keys; ``whole`` means the key had no item key attributes,
    so entire items are returned (C.2.2.2.6, last paragraph; K.2.2.1.2 note 4).
    """

    tag: int
    vr: str
    attr: Attr | None
    test: Predicate | None = None
    keys: tuple[KeyQuery, ...] = ()
    item_tests: tuple[Predicate, ...] = ()
    whole: bool = False


@dataclass(frozen=True, slots=True)
class WorklistQuery:
    """A parsed Modality Worklist identifier.

    Attributes
    ----------
    keys : tuple of KeyQuery
        Top-level keys in request order.
    tests : tuple of callables
        Predicates over an :class:`~worklist._attributes.Entry`; all must hold.
    prefilter : CandidateFilter
        What a :class:`~worklist.ports.WorklistSource` may use to narrow candidates.
    unsupported : tuple of int
        Tags of requested keys we do not support (returned empty; status 0xFF01).
    charset : tuple of str
        The request's Specific Character Set, used to pick the response's.
    """

    keys: tuple[KeyQuery, ...]
    tests: tuple[Predicate, ...]
    prefilter: CandidateFilter
    unsupported: tuple[int, ...] = ()
    charset: tuple[str, ...] = ()
    options: MatchOptions = field(default_factory=MatchOptions)


# --------------------------------------------------------------------------- parsing


def _values(elem: DataElement) -> list[str]:
    """The key's values as text; empty list for a zero-length key."""
    value = elem.value
    if value is None:
        return []
    raw = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    values = [str(v).strip() for v in raw]
    return [] if all(v == "" for v in values) else values


def _wildcard(pattern: str) -> re.Pattern[str]:
    out = []
    for ch in pattern:
        out.append(".*" if ch == "*" else "." if ch == "?" else re.escape(ch))
    return re.compile("".join(out), re.DOTALL)


def _stored(value: Any) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, tuple | list):
        return tuple(str(v) for v in value if str(v) != "")
    return (str(value),)


def _text_test(keyword: str, values: list[str], kind: Kind, opts: MatchOptions) -> Predicate | None:
    """Single Value (C.2.2.2.1) or Wild Card (C.2.2.2.4) matching of text values."""
    if any(set(v) <= {"*"} for v in values):
        return None  # "*" is Universal Matching (C.2.2.2.4 note 1)
    if kind is Kind.PN:
        case, accent = opts.pn_case_insensitive, opts.pn_accent_insensitive

        def norm(s: str) -> str:
            return fold_person_name(s, case=case, accent=accent)

        def candidates(s: str) -> list[str]:
            folded = norm(s)
            groups = folded.split("=")
            return [folded, *groups] if len(groups) > 1 else [folded]

    else:

        def norm(s: str) -> str:
            return s

        def candidates(s: str) -> list[str]:
            return [s]

    exact = frozenset(norm(v) for v in values if not _WILDCARDS & set(v))
    patterns = tuple(_wildcard(norm(v)) for v in values if _WILDCARDS & set(v))

    def test(value: Any) -> bool:
        for stored in _stored(value):
            for cand in candidates(stored):
                if cand in exact or any(p.fullmatch(cand) for p in patterns):
                    return True
        return False

    return test


def _parse_date(keyword: str, text: str) -> str:
    if len(text) != 8 or not text.isdigit():
        raise InvalidQueryError(f"{keyword}: not a DA value (YYYYMMDD)")
    try:
        datetime.strptime(text, "%Y%m%d")
    except ValueError as exc:
        raise InvalidQueryError(f"{keyword}: not a valid date") from exc
    return text


def _parse_time(keyword: str, text: str, *, upper: bool) -> str:
    """A TM value as ``HHMMSS.ffffff``; missing parts are zero, or maximal if ``upper``."""
    m = _TM.fullmatch(text.replace(":", ""))
    if m is None:
        raise InvalidQueryError(f"{keyword}: not a TM value (HH[MM[SS[.F]]])")
    hh, mm, ss, frac = m.groups()
    if int(hh) > 23 or (mm and int(mm) > 59) or (ss and int(ss) > 60):
        raise InvalidQueryError(f"{keyword}: time out of range")
    fill = "9" if upper else "0"
    mm = mm or ("59" if upper else "00")
    ss = ss or ("59" if upper else "00")
    frac = (frac or "").ljust(6, fill)
    return f"{hh}{mm}{ss}.{frac}"


def _split_range(keyword: str, values: list[str]) -> tuple[str, str] | None:
    """``a-b`` -> (a, b), ``a-``/``-b`` with one side empty; None for a single value."""
    if len(values) != 1:
        raise InvalidQueryError(f"{keyword}: several values are not allowed for DA/TM keys")
    text = values[0]
    if _WILDCARDS & set(text):
        raise InvalidQueryError(f"{keyword}: wild cards are not allowed for DA/TM (C.2.2.2.4)")
    if "-" not in text:
        return None
    parts = text.split("-")
    if len(parts) != 2 or parts == ["", ""]:
        raise InvalidQueryError(f"{keyword}: malformed range (C.2.2.2.5)")
    return parts[0].strip(), parts[1].strip()


def _date_bounds(keyword: str, values: list[str]) -> tuple[str | None, str | None]:
    rng = _split_range(keyword, values)
    if rng is None:
        day = _parse_date(keyword, values[0])
        return day, day
    lo = _parse_date(keyword, rng[0]) if rng[0] else None
    hi = _parse_date(keyword, rng[1]) if rng[1] else None
    if lo and hi and lo > hi:
        raise InvalidQueryError(f"{keyword}: range start after its end (C.2.2.2.5.1)")
    return lo, hi


def _time_bounds(keyword: str, values: list[str]) -> tuple[str | None, str | None, bool]:
    """(low, high, is_range) of a TM key, as ``HHMMSS.ffffff``."""
    rng = _split_range(keyword, values)
    if rng is None:
        exact = _parse_time(keyword, values[0], upper=False)
        return exact, exact, False
    lo = _parse_time(keyword, rng[0], upper=False) if rng[0] else None
    hi = _parse_time(keyword, rng[1], upper=True) if rng[1] else None
    return lo, hi, True


def _between(lo: str | None, hi: str | None) -> Callable[[str], bool]:
    def inside(v: str) -> bool:
        return (lo is None or v >= lo) and (hi is None or v <= hi)

    return inside


def _date_test(keyword: str, values: list[str]) -> Predicate:
    inside = _between(*_date_bounds(keyword, values))
    return lambda value: bool(value) and inside(value)


def _time_test(keyword: str, values: list[str]) -> Predicate:
    # A range crossing midnight is refused in _parse_level, once it is known that it
    # is not half of a combined date-time range.
    lo, hi, _ = _time_bounds(keyword, values)
    inside = _between(lo, hi)
    return lambda value: bool(value) and inside(_parse_time(keyword, value, upper=False))


def _uid_test(keyword: str, values: list[str]) -> Predicate:
    for v in values:
        if not _UID.fullmatch(v):
            raise InvalidQueryError(f"{keyword}: not a UID list (C.2.2.2.2; no wild cards)")
    wanted = frozenset(values)
    return lambda value: any(v in wanted for v in _stored(value))


def _number_test(keyword: str, values: list[str]) -> Predicate:
    try:
        wanted = frozenset(float(v) for v in values)
    except ValueError as exc:
        raise InvalidQueryError(f"{keyword}: not a number") from exc
    return lambda value: any(float(v) in wanted for v in _stored(value))


def _combined_datetime(
    date_attr: Attr, date_values: list[str], time_attr: Attr, time_values: list[str]
) -> Predicate | None:
    """Start Date and Start Time both given as ranges: one datetime range (Table K.6-1)."""
    drange = _split_range(date_attr.keyword, date_values)
    trange = _split_range(time_attr.keyword, time_values)
    if drange is None or trange is None:
        return None
    d_lo = _parse_date(date_attr.keyword, drange[0]) if drange[0] else None
    d_hi = _parse_date(date_attr.keyword, drange[1]) if drange[1] else None
    t_lo = _parse_time(time_attr.keyword, trange[0] or "00", upper=False)
    t_hi = _parse_time(time_attr.keyword, trange[1] or "23", upper=True)
    lo = d_lo + t_lo if d_lo else None
    hi = d_hi + t_hi if d_hi else None
    if lo and hi and lo > hi:
        raise InvalidQueryError("ScheduledProcedureStepStartDate/Time: range start after its end")
    inside = _between(lo, hi)
    get_date, get_time = date_attr.get, time_attr.get

    def test(sps: Any) -> bool:
        day, tm = get_date(sps), get_time(sps)
        if not day or not tm:
            return False
        return inside(day + _parse_time(time_attr.keyword, tm, upper=False))

    return test


def _key_test(attr: Attr, values: list[str], opts: MatchOptions) -> Predicate | None:
    kind = attr.kind
    if kind in (Kind.TEXT, Kind.PN):
        return _text_test(attr.keyword, values, kind, opts)
    if kind is Kind.DATE:
        return _date_test(attr.keyword, values)
    if kind is Kind.TIME:
        return _time_test(attr.keyword, values)
    if kind is Kind.UID:
        return _uid_test(attr.keyword, values)
    if _WILDCARDS & set("".join(values)):
        raise InvalidQueryError(f"{attr.keyword}: wild cards are not allowed (C.2.2.2.4)")
    return _number_test(attr.keyword, values)


def _lift(get: Callable[[Any], Any], test: Predicate) -> Predicate:
    return lambda ctx: test(get(ctx))


def _parse_level(
    ds: Dataset,
    table: dict[int, Attr],
    opts: MatchOptions,
    unsupported: list[int],
    *,
    parent: int | None,
) -> tuple[tuple[KeyQuery, ...], tuple[Predicate, ...], dict[int, list[str]]]:
    """Parse one dataset level into keys, predicates over its context, and raw values."""
    keys: list[KeyQuery] = []
    tests: list[tuple[int, Predicate]] = []
    raw: dict[int, list[str]] = {}
    for elem in ds:
        tag = int(elem.tag)
        if tag in (_SPECIFIC_CHARACTER_SET, _TIMEZONE_OFFSET) or tag & 0xFFFF == 0:
            continue  # never matched (C.2.2.2); group lengths are not keys
        if elem.tag.is_private:
            unsupported.append(tag)
            continue
        attr = table.get(tag)
        if attr is None:
            unsupported.append(tag)
            keys.append(KeyQuery(tag, elem.VR, None))
            continue
        if elem.VR not in (attr.vr, "UN"):
            raise InvalidQueryError(f"{attr.keyword}: VR {elem.VR} instead of {attr.vr}")
        if attr.vr == "SQ":
            key, seq_test = _parse_sequence(attr, elem, opts, unsupported)
            keys.append(key)
            if seq_test is not None:
                tests.append((tag, seq_test))
            continue
        values = _values(elem)
        raw[tag] = values
        test = _key_test(attr, values, opts) if values else None
        keys.append(KeyQuery(tag, attr.vr, attr, test))
        if test is not None:
            tests.append((tag, _lift(attr.get, test)))
    if parent == _SPS_SEQUENCE and raw.get(_SPS_START_DATE) and raw.get(_SPS_START_TIME):
        date_attr, time_attr = table[_SPS_START_DATE], table[_SPS_START_TIME]
        combined = _combined_datetime(
            date_attr, raw[_SPS_START_DATE], time_attr, raw[_SPS_START_TIME]
        )
        if combined is not None:
            # One datetime range replaces the two separate tests.
            tests = [(t, p) for t, p in tests if t not in (_SPS_START_DATE, _SPS_START_TIME)]
            tests.append((_SPS_START_DATE, combined))
    for tag, values in raw.items():
        attr = table[tag]
        if attr.kind is Kind.TIME and values and any(t == tag for t, _ in tests):
            lo, hi, is_range = _time_bounds(attr.keyword, values)
            if is_range and lo and hi and lo > hi:
                raise InvalidQueryError(f"{attr.keyword}: range crosses midnight (C.2.2.2.5.2)")
    return tuple(keys), tuple(p for _, p in tests), raw


def _parse_sequence(
    attr: Attr,
    elem: DataElement,
    opts: MatchOptions,
    unsupported: list[int],
) -> tuple[KeyQuery, Predicate | None]:
    """A sequence key and the test of its stored items (C.2.2.2.6)."""
    items = list(elem.value or [])
    if len(items) > 1:
        raise InvalidQueryError(f"{attr.keyword}: a sequence key has one item (C.2.2.2.6)")
    if not items or len(items[0]) == 0:
        return KeyQuery(attr.tag, "SQ", attr, whole=True), None
    keys, item_tests, _ = _parse_level(
        items[0], CHILDREN_BY_TAG[attr.tag], opts, unsupported, parent=attr.tag
    )
    key = KeyQuery(attr.tag, "SQ", attr, keys=keys, item_tests=item_tests)
    if not item_tests:
        return key, None
    get = attr.get

    def test(ctx: Any) -> bool:
        return any(all(t(child) for t in item_tests) for child in get(ctx))

    return key, test


def _single_exact(values: list[str] | None) -> str | None:
    if values and len(values) == 1 and not _WILDCARDS & set(values[0]):
        return values[0]
    return None


def _exact_values(values: list[str] | None) -> frozenset[str] | None:
    """Every value of a text key when none has a wild card (any of them may match)."""
    if not values or any(_WILDCARDS & set(v) for v in values):
        return None
    return frozenset(values)


def _prefilter(
    top_raw: dict[int, list[str]], sps_raw: dict[int, list[str]], opts: MatchOptions
) -> CandidateFilter:
    lo = hi = None
    date_values = sps_raw.get(_SPS_START_DATE)
    if date_values:
        d_lo, d_hi = _date_bounds("ScheduledProcedureStepStartDate", date_values)
        lo = datetime.strptime(d_lo, "%Y%m%d").date() if d_lo else None
        hi = datetime.strptime(d_hi, "%Y%m%d").date() if d_hi else None
    return CandidateFilter(
        station_ae_title=_single_exact(sps_raw.get(_STATION_AE)),
        modality=_single_exact(sps_raw.get(_MODALITY)),
        start_from=lo,
        start_until=hi,
        statuses=opts.statuses,
        accession_numbers=_exact_values(top_raw.get(_ACCESSION_NUMBER)),
        patient_ids=_exact_values(top_raw.get(_PATIENT_ID)),
    )


def build_query(identifier: Dataset, options: MatchOptions | None = None) -> WorklistQuery:
    """Parse a Modality Worklist C-FIND identifier (PS3.4 K.4.1.1.3.1).

    Parameters
    ----------
    identifier : pydicom.dataset.Dataset
        The request identifier. Text is decoded with its Specific Character Set
        (ISO_IR 100, ISO_IR 192 and whatever else pydicom supports) before matching.
    options : MatchOptions, optional
        PN matching choices, offered statuses and the result limit.

    Returns
    -------
    WorklistQuery

    Raises
    ------
    InvalidQueryError
        A key PS3.4 does not allow: a malformed or reversed date/time range, a wild
        card in a DA/TM/UI/numeric key, a malformed UID list, a sequence key with
        more than one item, a key sent with the wrong VR.
    """
    opts = options or MatchOptions()
    # No explicit decode(): pydicom converts each raw (wire) element on access with the
    # dataset's Specific Character Set, items inheriting it from their parent.
    unsupported: list[int] = []
    keys, tests, top_raw = _parse_level(identifier, ITEM_BY_TAG, opts, unsupported, parent=None)
    sps_raw: dict[int, list[str]] = {}
    sps_elem = identifier.get(_SPS_SEQUENCE)
    if sps_elem is not None and sps_elem.value:
        first = sps_elem.value[0]
        for tag in (_STATION_AE, _MODALITY, _SPS_START_DATE):
            if tag in first:
                values = _values(first[tag])
                if values:
                    sps_raw[tag] = values
    charset = identifier.get("SpecificCharacterSet") or ()
    charset_values = (charset,) if isinstance(charset, str) else tuple(charset)
    return WorklistQuery(
        keys=keys,
        tests=tests,
        prefilter=_prefilter(top_raw, sps_raw, opts),
        unsupported=tuple(unsupported),
        charset=charset_values,
        options=opts,
    )


# --------------------------------------------------------------------------- matching


def _empty(vr: str) -> Any:
    return [] if vr == "SQ" else None if vr in ("US", "SS", "UL", "SL", "FL", "FD") else ""


def _collect(keys: tuple[KeyQuery, ...], ctx: Any, non_ascii: list[str]) -> list[Node]:
    out: list[Node] = []
    for key in keys:
        attr = key.attr
        if attr is None:
            out.append((key.tag, key.vr, _empty(key.vr)))
            continue
        value = attr.get(ctx)
        if attr.vr == "SQ":
            items = []
            for child in value:
                if key.item_tests and not all(t(child) for t in key.item_tests):
                    continue  # only matching items are returned (C.2.2.2.6)
                if key.whole:
                    items.append(collect(attr.children, child, non_ascii))
                else:
                    items.append(_collect(key.keys, child, non_ascii))
            out.append((key.tag, "SQ", items))
            continue
        value = element_value(attr, value)  # bounded to the VR (PS3.5 6.2)
        if isinstance(value, str) and not value.isascii():
            non_ascii.append(value)
        out.append((key.tag, attr.vr, value))
    return out


def _response_charset(query_charset: tuple[str, ...], non_ascii: list[str]) -> str | None:
    """ASCII needs none; Latin-1 if the SCU asked for it and it suffices; else UTF-8."""
    if not non_ascii:
        return None
    if query_charset and query_charset[0] == "ISO_IR 100":
        try:
            for text in non_ascii:
                text.encode("latin-1")
        except UnicodeEncodeError:
            pass
        else:
            return "ISO_IR 100"
    return "ISO_IR 192"


@dataclass(frozen=True, slots=True)
class Projection:
    """One response identifier before encoding (PS3.4 K.4.1.1.3.2).

    ``nodes`` are the requested keys with this entry's values, in request order;
    ``charset`` is the Specific Character Set the response needs (None for ASCII).
    """

    nodes: list[Node]
    charset: str | None

    def to_dataset(self) -> Dataset:
        """The response as a pydicom Dataset."""
        ds = add_nodes(Dataset(), self.nodes)
        if self.charset:
            ds.SpecificCharacterSet = self.charset
        return ds


def project(query: WorklistQuery, entry: Entry) -> Projection:
    """Every requested key of one matching entry, nothing else, and the charset it needs."""
    non_ascii: list[str] = []
    nodes = _collect(query.keys, entry, non_ascii)
    return Projection(nodes, _response_charset(query.charset, non_ascii))


def respond(query: WorklistQuery, entry: Entry) -> Dataset:
    """The response identifier for one matching entry: every requested key, nothing else."""
    return project(query, entry).to_dataset()


def matching_entries(query: WorklistQuery, item: WorklistItem) -> list[Entry]:
    """The entries (item, step) of ``item`` that match ``query``; see :func:`match`."""
    statuses = query.options.statuses
    tests = query.tests
    out = []
    for sps in item.steps:
        if sps.status not in statuses:
            continue
        entry = Entry(item, sps)
        if all(test(entry) for test in tests):
            out.append(entry)
    return out


def match(query: WorklistQuery, item: WorklistItem) -> list[Dataset]:
    """Return one response identifier per step of ``item`` that matches ``query``.

    Steps whose status is not offered (``query.options.statuses``, by default
    SCHEDULED and ARRIVED) never match. Each response holds all requested keys
    (PS3.4 K.4.1.1.3.2), empty where the item has no value, and its Scheduled
    Procedure Step Sequence holds only that step (Table K.6-1).
    """
    return [respond(query, entry) for entry in matching_entries(query, item)]


def iter_matches(query: WorklistQuery, items: Iterable[WorklistItem]) -> Iterator[Dataset]:
    """Responses for every matching entry of ``items``, in their order."""
    for item in items:
        yield from match(query, item)
