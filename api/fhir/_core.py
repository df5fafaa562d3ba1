"""Resource-independent FHIR R4 pieces: OperationOutcome, searchset Bundles, search
parameter parsing (dates with prefixes, tokens, ``_lastUpdated``, paging).

Pure functions over plain values, shared by every FHIR route (imaging now, lab
Observation/DiagnosticReport and ServiceRequest later). References are to FHIR R4
(http://hl7.org/fhir/R4/): Bundle 2.36, search 3.1.1, OperationOutcome 2.37.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlencode

from core.errors import InvalidQueryError

__all__ = [
    "DEFAULT_COUNT",
    "FHIR_JSON",
    "MAX_COUNT",
    "MAX_OFFSET",
    "DateParam",
    "Paging",
    "Token",
    "fhir_instant",
    "last_updated_bounds",
    "operation_outcome",
    "parse_date_param",
    "parse_paging",
    "parse_token",
    "searchset_bundle",
]

#: The FHIR JSON media type (FHIR R4 http.html#mime-type).
FHIR_JSON = "application/fhir+json"

DEFAULT_COUNT = 20
MAX_COUNT = 200
MAX_OFFSET = 2**31 - 1


def operation_outcome(severity: str, code: str, diagnostics: str = "") -> dict[str, Any]:
    """An OperationOutcome with one issue (FHIR R4 2.37; ``code`` from issue-type)."""
    issue: dict[str, Any] = {"severity": severity, "code": code}
    if diagnostics:
        issue["diagnostics"] = diagnostics
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def fhir_instant(value: datetime) -> str:
    """A FHIR ``instant`` (always with a time zone; naive values are taken as UTC)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- dates ------------------------------------------------------------------------

_PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
_SUPPORTED_PREFIXES = frozenset({"eq", "gt", "lt", "ge", "le"})
_DATE_RE = re.compile(
    r"(?P<y>\d{4})(-(?P<m>\d{2})(-(?P<d>\d{2})"
    r"(T(?P<H>\d{2}):(?P<M>\d{2})(:(?P<S>\d{2})(\.(?P<f>\d{1,6}))?)?(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?"
)


@dataclass(frozen=True, slots=True)
class DateParam:
    """A date search value as the half-open interval ``[start, end)`` it denotes
    (FHIR R4 3.1.1.5.2: a value of lower precision is an interval)."""

    prefix: str
    start: datetime
    end: datetime

    def da_range(self) -> str:
        """The equivalent DICOM DA range matching string (PS3.4 C.2.2.2.5).

        DA has day precision, so a value with a time compares at its day.
        """
        first = self.start.date()
        last = (self.end - timedelta(microseconds=1)).date()

        def da(d: date) -> str:
            return d.strftime("%Y%m%d")

        if self.prefix == "eq":
            return f"{da(first)}-{da(last)}"
        if self.prefix == "ge":
            return f"{da(first)}-"
        if self.prefix == "gt":
            return f"{da(last + timedelta(days=1))}-"
        if self.prefix == "le":
            return f"-{da(last)}"
        return f"-{da(first - timedelta(days=1))}"  # lt

    def bounds(self) -> tuple[datetime | None, bool, datetime | None, bool]:
        """``(after, after_inclusive, before, before_inclusive)`` for a timestamp column."""
        if self.prefix == "eq":
            return self.start, True, self.end, False
        if self.prefix == "ge":
            return self.start, True, None, False
        if self.prefix == "gt":
            return self.end, True, None, False
        if self.prefix == "le":
            return None, False, self.end, False
        return None, False, self.start, False  # lt


def parse_date_param(raw: str) -> DateParam:
    """Parse ``[prefix]YYYY[-MM[-DD[Thh:mm[:ss][zone]]]]`` (FHIR R4 3.1.1.5.2)."""
    raw = raw.replace(" ", "+")  # "+07:00" arrives as " 07:00" when the client did not escape it
    prefix = raw[:2] if raw[:2] in _PREFIXES else "eq"
    value = raw[2:] if raw[:2] in _PREFIXES else raw
    if prefix not in _SUPPORTED_PREFIXES:
        raise InvalidQueryError(f"date prefix {prefix!r} is not supported")
    m = _DATE_RE.fullmatch(value)
    if m is None:
        raise InvalidQueryError("date search value must be YYYY[-MM[-DD[Thh:mm[:ss]]]]")
    tz: timezone = UTC
    if m["tz"] and m["tz"] != "Z":
        sign = 1 if m["tz"][0] == "+" else -1
        hours, minutes = int(m["tz"][1:3]), int(m["tz"][4:6])
        tz = timezone(sign * timedelta(hours=hours, minutes=minutes))
    try:
        year = int(m["y"])
        if m["m"] is None:
            start = datetime(year, 1, 1, tzinfo=tz)
            end = datetime(year + 1, 1, 1, tzinfo=tz)
        elif m["d"] is None:
            start = datetime(year, int(m["m"]), 1, tzinfo=tz)
            end = (
                datetime(year + 1, 1, 1, tzinfo=tz)
                if start.month == 12
                else datetime(year, start.month + 1, 1, tzinfo=tz)
            )
        elif m["H"] is None:
            start = datetime(year, int(m["m"]), int(m["d"]), tzinfo=tz)
            end = start + timedelta(days=1)
        else:
            start = datetime(
                year,
                int(m["m"]),
                int(m["d"]),
                int(m["H"]),
                int(m["M"]),
                int(m["S"] or 0),
                int((m["f"] or "0").ljust(6, "0")),
                tzinfo=tz,
            )
            if m["f"]:
                end = start + timedelta(microseconds=10 ** (6 - len(m["f"])))
            else:
                end = start + (timedelta(seconds=1) if m["S"] else timedelta(minutes=1))
    except (ValueError, OverflowError) as exc:
        raise InvalidQueryError("date search value out of range") from exc
    return DateParam(prefix, start, end)


def last_updated_bounds(
    values: Sequence[str],
) -> tuple[datetime | None, bool, datetime | None, bool]:
    """Intersect every ``_lastUpdated`` value (repeated parameters are ANDed)."""
    after: datetime | None = None
    after_incl = True
    before: datetime | None = None
    before_incl = True
    for raw in values:
        a, a_incl, b, b_incl = parse_date_param(raw).bounds()
        if a is not None and (after is None or a > after or (a == after and not a_incl)):
            after, after_incl = a, a_incl
        if b is not None and (before is None or b < before or (b == before and not b_incl)):
            before, before_incl = b, b_incl
    return after, after_incl, before, before_incl


# -- tokens -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Token:
    """A token search value: ``code``, ``|code`` (no system) or ``system|code``.

    ``system`` is None when any system matches, ``""`` when none may be present.
    """

    system: str | None
    code: str


def parse_token(raw: str) -> Token:
    """Parse a token search value (FHIR R4 3.1.1.5.6)."""
    if "|" not in raw:
        if not raw:
            raise InvalidQueryError("empty token")
        return Token(None, raw)
    system, code = raw.split("|", 1)
    if not code:
        raise InvalidQueryError("token without a code")
    return Token(system, code)


# -- paging and Bundles -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Paging:
    count: int
    offset: int


def parse_paging(params: Mapping[str, str]) -> Paging:
    """``_count`` (FHIR R4 3.1.1.5.7, capped at 200) and ``_offset`` (page start)."""
    try:
        count = int(params.get("_count", DEFAULT_COUNT))
        offset = int(params.get("_offset", 0))
    except ValueError as exc:
        raise InvalidQueryError("_count and _offset must be integers") from exc
    if count < 0 or offset < 0:
        raise InvalidQueryError("_count and _offset must not be negative")
    if offset > MAX_OFFSET:  # beyond any result set; SQL integers are 64-bit at most
        raise InvalidQueryError(f"_offset must not exceed {MAX_OFFSET}")
    return Paging(min(count, MAX_COUNT), offset)


def searchset_bundle(
    *,
    base: str,
    path: str,
    params: Sequence[tuple[str, str]],
    entries: Sequence[dict[str, Any]],
    total: int | None,
    paging: Paging,
    included: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """A ``searchset`` Bundle with ``total`` and self/first/previous/next/last links.

    ``total`` None (``_total=none``, or more matches than were counted) leaves
    ``Bundle.total`` and the ``last`` link out; ``next`` is then given after a full page.

    ``params`` are the search parameters that were applied (``_count``/``_offset`` are
    set per link); ``entries`` are resources, each gets ``fullUrl`` and
    ``search.mode = match``; ``included`` ones get ``search.mode = include``.
    """
    kept = [(k, v) for k, v in params if k not in ("_count", "_offset")]
    url = f"{base.rstrip('/')}/{path.lstrip('/')}"

    def link(relation: str, offset: int) -> dict[str, str]:
        query = urlencode([*kept, ("_count", str(paging.count)), ("_offset", str(offset))])
        return {"relation": relation, "url": f"{url}?{query}"}

    links = [link("self", paging.offset), link("first", 0)]
    if paging.count:
        if paging.offset > 0:
            links.append(link("previous", max(0, paging.offset - paging.count)))
        more = len(entries) >= paging.count if total is None else (
            paging.offset + paging.count < total)
        if more:
            links.append(link("next", paging.offset + paging.count))
        if total is not None:
            last = ((total - 1) // paging.count) * paging.count if total else 0
            links.append(link("last", last))

    def entry(resource: dict[str, Any], mode: str) -> dict[str, Any]:
        full = f"{base.rstrip('/')}/{resource['resourceType']}/{resource['id']}"
        return {"fullUrl": full, "resource": resource, "search": {"mode": mode}}

    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "meta": {"lastUpdated": fhir_instant(datetime.now(UTC))},
    }
    if total is not None:
        bundle["total"] = total
    bundle["link"] = links
    bundle["entry"] = (
        [entry(r, "match") for r in entries] + [entry(r, "include") for r in included])
    return bundle
