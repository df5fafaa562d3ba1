"""One FHIR R4 search machinery for every resource (FHIR R4 3.1.1, search.html).

A resource's search is declared once as a :class:`ResourceSpec` (its parameters with
type, modifiers and definition URL, its ``_sort`` keys and ``_include`` values). The
routes parse requests with :func:`parse_search` against that spec, and the
CapabilityStatement is generated from the same specs (:mod:`api.fhir.registry`), so
what is advertised and what is accepted cannot drift apart.

Rules implemented here, the same for every resource:

* a parameter repeated is ANDed, comma-separated values are ORed (3.1.1.4);
* unknown or unsupported parameters follow ``Prefer: handling=strict|lenient``
  (3.1.1.4, http.html#prefer), strict by default: 400 naming the parameter; lenient
  drops them, and they are absent from the ``self`` link;
* an unsupported modifier is always refused (3.1.1.5: servers SHALL reject it);
* ``_count`` / ``_offset`` page, ``_sort`` only where declared, ``_format`` is
  honoured for JSON and refused (406) otherwise; ``_total`` (search.html#total) is
  ``none``, ``estimate`` or ``accurate`` (anything else: 400): only ``accurate``
  counts every match of a full page, the default (``estimate``) counts up to
  :data:`TOTAL_ESTIMATE_BOUND` beyond the page and leaves Bundle.total out past it,
  ``none`` leaves it out (:func:`total_bound`, :func:`reported_total`);
  ``_summary``, ``_elements`` and friends are not supported, hence refused under
  strict handling;
* values are bounded (length, no control characters) before anything parses them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from api.fhir._core import DEFAULT_COUNT, MAX_COUNT, MAX_OFFSET, Paging
from core.errors import InvalidQueryError, ServiceError
from storage.index.queries import total_from_page

__all__ = [
    "TOTAL_ESTIMATE_BOUND",
    "Criterion",
    "ResourceSpec",
    "Search",
    "SearchParam",
    "TooCostlyError",
    "TotalMode",
    "handling",
    "page_total",
    "parse_search",
    "reported_total",
    "split_or",
    "total_bound",
]

class TooCostlyError(ServiceError):
    """A search that would read too many rows (FHIR ``too-costly``, HTTP 400)."""

    title = "Search too costly"
    http_status = 400
    fhir_code = "too-costly"


ParamType = Literal["token", "reference", "date", "string", "number", "uri", "quantity"]

#: Longest accepted search value (a whole parameter value, before splitting at commas).
MAX_VALUE_LENGTH = 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-.:]{0,127}")

#: Result parameters every search understands (3.1.1.5.7): they page or format.
_PAGING = frozenset({"_count", "_offset"})
_FORMAT = "_format"

TotalMode = Literal["none", "estimate", "accurate"]
_TOTAL_MODES: tuple[TotalMode, ...] = ("none", "estimate", "accurate")
#: How many matches past the page Bundle.total is counted when the search does not ask
#: for ``_total=accurate``: a full page of a name that a third of the archive matches
#: counted every match (issue 21); the count is now bounded, like the page.
TOTAL_ESTIMATE_BOUND = 1000


@dataclass(frozen=True, slots=True)
class SearchParam:
    """One advertised search parameter (CapabilityStatement.rest.resource.searchParam).

    ``modifiers`` lists the modifiers accepted after ``:`` (for example ``identifier``
    on a reference). ``definition`` is the canonical URL of the SearchParameter.
    """

    name: str
    type: ParamType
    definition: str
    documentation: str
    modifiers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ResourceSpec:
    """What the server does with one resource type: interactions, search, sort, include."""

    type: str
    interactions: tuple[str, ...]
    params: tuple[SearchParam, ...] = ()
    #: ``_sort`` values accepted (``-`` marks descending); empty: no ``_sort``.
    sorts: tuple[str, ...] = ()
    #: ``_include`` values accepted.
    includes: tuple[str, ...] = ()
    #: Profile/documentation shown in the CapabilityStatement.
    documentation: str = ""
    #: Operations on the type or instance: ``(name, OperationDefinition canonical)``.
    operations: tuple[tuple[str, str], ...] = ()
    #: With ``update``: may an update create a resource at a client-chosen id?
    update_create: bool = True
    #: CapabilityStatement.rest.resource.versioning (``versioned-update``: ``If-Match``
    #: is honoured, FHIR R4 http.html#concurrency); empty: not stated.
    versioning: str = ""

    def param(self, name: str) -> SearchParam | None:
        return next((p for p in self.params if p.name == name), None)


@dataclass(frozen=True, slots=True)
class Criterion:
    """One occurrence of a search parameter: ``name[:modifier]=value``."""

    name: str
    modifier: str | None
    value: str


@dataclass(frozen=True, slots=True)
class Search:
    """A parsed search request: criteria, paging, sort and includes.

    ``applied`` are the ``(name, value)`` pairs that were honoured, for the Bundle's
    ``self`` link (lenient handling leaves the dropped ones out).
    """

    spec: ResourceSpec
    criteria: tuple[Criterion, ...]
    paging: Paging
    sort: tuple[str, ...] = ()
    includes: tuple[str, ...] = ()
    applied: tuple[tuple[str, str], ...] = field(default=())
    #: ``_total`` (FHIR R4 search.html#total); ``estimate`` when not given.
    total: TotalMode = "estimate"

    def all(self, name: str) -> list[Criterion]:
        """Every occurrence of ``name`` (each an AND term)."""
        return [c for c in self.criteria if c.name == name]

    def has(self, *names: str) -> bool:
        return any(c.name in names for c in self.criteria)


def total_bound(search: Search) -> int | None:
    """How far a search's total may be counted: None for every match
    (``_total=accurate``), else ``offset + count + TOTAL_ESTIMATE_BOUND`` (nothing
    for ``none``): the page's own read already passes ``offset + count`` rows, so the
    count costs at most a bounded amount more. A store counts at most this many + 1."""
    if search.total == "accurate":
        return None
    if search.total == "none":
        return 0
    return search.paging.offset + search.paging.count + TOTAL_ESTIMATE_BOUND


def page_total(search: Search, page: int, count: Callable[[int | None], int]) -> int | None:
    """Bundle.total of a search whose page held ``page`` matches: the page itself
    when it is not full (nor past the end), else ``count(total_bound(search))`` (the
    store's count, stopped at that bound + 1), as :func:`reported_total` reports it."""
    if search.total == "none":
        return None
    known = total_from_page(page, search.paging.offset, search.paging.count)
    if known is not None:
        return reported_total(search, known)
    return reported_total(search, count(total_bound(search)))


def reported_total(search: Search, counted: int) -> int | None:
    """Bundle.total of a search whose store counted ``counted`` matches (at most
    :func:`total_bound` + 1): None, to leave it out, for ``_total=none`` or past the
    bound (R4: Bundle.total is optional; the ``next`` link still pages on)."""
    bound = total_bound(search)
    if search.total == "none" or (bound is not None and counted > bound):
        return None
    return counted


def handling(prefer: str | None) -> Literal["strict", "lenient"]:
    """``handling`` of a ``Prefer`` header (FHIR R4 http.html#prefer); strict by default."""
    for part in (prefer or "").split(","):
        for item in part.split(";"):
            key, _, value = item.strip().partition("=")
            if key.strip().lower() == "handling" and value.strip().strip('"').lower() == "lenient":
                return "lenient"
    return "strict"


def split_or(value: str) -> list[str]:
    """The comma-separated alternatives of one value (``\\,`` is a literal comma)."""
    parts = re.split(r"(?<!\\),", value)
    out = [p.replace("\\,", ",") for p in parts]
    if not all(out):
        raise InvalidQueryError("empty value in a comma-separated list")
    return out


def _check_value(name: str, value: str) -> None:
    if len(value) > MAX_VALUE_LENGTH:
        raise InvalidQueryError(f"value of search parameter {name!r} is too long")
    if _CONTROL.search(value):
        raise InvalidQueryError(f"value of search parameter {name!r} has control characters")


def _int(name: str, value: str, *, upper: int) -> int:
    if not re.fullmatch(r"\d{1,10}", value):
        raise InvalidQueryError(f"{name} must be a non-negative integer")
    number = int(value)
    if number > upper:
        if name == "_count":
            return upper  # 3.1.1.5.7: the server may return fewer than asked
        raise InvalidQueryError(f"{name} must not exceed {upper}")
    return number


def _split_name(raw: str, spec: ResourceSpec) -> tuple[str, str | None]:
    """``name``, ``name:modifier``; chains ``x.identifier``/``x:Patient.identifier``
    on a reference with the ``identifier`` modifier are read as ``x:identifier``."""
    name, colon, modifier = raw.partition(":")
    if not colon and "." in name:
        base, _, rest = name.partition(".")
        param = spec.param(base)
        if param is not None and param.type == "reference" and rest == "identifier":
            return base, "identifier"
    if colon and "." in modifier:
        target, _, rest = modifier.partition(".")
        param = spec.param(name)
        if param is not None and param.type == "reference" and rest == "identifier":
            if target != "Patient":
                raise InvalidQueryError(f"{raw}: only Patient may be chained")
            return name, "identifier"
    return name, modifier if colon else None


def parse_search(
    spec: ResourceSpec,
    items: Iterable[tuple[str, str]],
    *,
    prefer: str | None = None,
    default_count: int = DEFAULT_COUNT,
) -> Search:
    """Read a search request's parameters against ``spec``.

    Raises
    ------
    InvalidQueryError
        An unknown or unsupported parameter under strict handling (the message names
        it), an unsupported modifier, a bad ``_count``/``_offset``/``_sort``/
        ``_include``, a value too long or holding control characters.
    """
    strict = handling(prefer) == "strict"
    criteria: list[Criterion] = []
    applied: list[tuple[str, str]] = []
    count, offset = default_count, 0
    sort: tuple[str, ...] = ()
    includes: list[str] = []
    total: TotalMode | None = None
    for raw_name, value in items:
        if not _NAME.fullmatch(raw_name):
            if strict:
                raise InvalidQueryError("unknown search parameter (malformed name)")
            continue
        _check_value(raw_name, value)
        if raw_name in _PAGING:
            if raw_name == "_count":
                count = _int("_count", value, upper=MAX_COUNT)
            else:
                offset = _int("_offset", value, upper=MAX_OFFSET)
            continue
        if raw_name == _FORMAT:
            applied.append((raw_name, value))  # checked by the route (406 if not JSON)
            continue
        if raw_name == "_total":
            # Refused whatever the handling: a client that asks for an accurate total
            # must not get a bundle without one.
            if total is not None:
                raise InvalidQueryError("_total given twice")
            mode = next((m for m in _TOTAL_MODES if m == value), None)
            if mode is None:
                raise InvalidQueryError("_total must be none, estimate or accurate")
            total = mode
            applied.append((raw_name, value))
            continue
        if raw_name == "_sort" and spec.sorts:
            keys = tuple(split_or(value))
            for key in keys:
                if key not in spec.sorts:
                    raise InvalidQueryError(
                        f"_sort {key!r} is not supported; use {', '.join(spec.sorts)}"
                    )
            sort = keys
            applied.append((raw_name, value))
            continue
        if raw_name == "_include" and spec.includes:
            if value not in spec.includes:
                raise InvalidQueryError(
                    f"_include {value!r} is not supported; use {', '.join(spec.includes)}"
                )
            includes.append(value)
            applied.append((raw_name, value))
            continue
        name, modifier = _split_name(raw_name, spec)
        param = spec.param(name)
        if param is None:
            if strict:
                raise InvalidQueryError(
                    f"unknown or unsupported search parameter {raw_name!r} for "
                    f"{spec.type}; supported: {', '.join(p.name for p in spec.params)}"
                )
            continue
        if modifier is not None and modifier not in param.modifiers:
            # 3.1.1.5: an unsupported modifier is refused whatever the handling.
            raise InvalidQueryError(f"modifier :{modifier} of {name!r} is not supported")
        if not value:
            raise InvalidQueryError(f"search parameter {raw_name!r} has an empty value")
        criteria.append(Criterion(name, modifier, value))
        applied.append((raw_name, value))
    return Search(
        spec=spec,
        criteria=tuple(criteria),
        paging=Paging(count, offset),
        sort=sort,
        includes=tuple(includes),
        applied=tuple(applied),
        total=total or "estimate",
    )


def items_of(params: Mapping[str, str] | Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Parameters as ``(name, value)`` pairs (helper for tests and internal callers)."""
    return list(params.items()) if isinstance(params, Mapping) else list(params)
