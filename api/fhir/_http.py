"""The HTTP side of the FHIR layer, shared by every FHIR route: media types, the
search request, searchset Bundles and references to this server (FHIR R4 http.html)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse

from api.deps import base_url
from api.dicomweb import parse_accept
from api.fhir._core import DEFAULT_COUNT, FHIR_JSON, searchset_bundle
from api.fhir._search import ResourceSpec, Search, parse_search
from core.errors import InvalidQueryError

__all__ = [
    "FHIR_PREFIX",
    "check_accept",
    "fhir_base",
    "fhir_response",
    "parse_reference",
    "search_bundle",
    "search_request",
]

FHIR_PREFIX = "/fhir"
_JSON_FORMATS = frozenset({"json", "application/json", FHIR_JSON})
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def fhir_response(
    body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(body, status_code=status, media_type=FHIR_JSON, headers=headers)


def check_accept(request: Request) -> None:
    """JSON only: ``_format`` (R4 http.html#mime-type) and ``Accept`` must allow it (406)."""
    fmt = request.query_params.get("_format")
    if fmt is not None and fmt.split(";")[0].strip() not in _JSON_FORMATS:
        raise HTTPException(406, detail="only JSON is supported (_format)")
    for rng in parse_accept(request.headers.get("accept")):
        if rng.matches(FHIR_JSON) or rng.matches("application/json"):
            return
    raise HTTPException(406, detail="only application/fhir+json is supported")


def fhir_base(request: Request) -> str:
    """This server's FHIR base URL: ``http.public_url`` or the local address (honours
    ``root_path``), never the ``Host`` header (issue 14.9, see ``api.deps.base_url``)."""
    return base_url(request, FHIR_PREFIX)


def search_request(
    request: Request, spec: ResourceSpec, *, default_count: int = DEFAULT_COUNT
) -> Search:
    """Check the media type and parse the query against ``spec`` (with ``Prefer``)."""
    check_accept(request)
    return parse_search(
        spec,
        request.query_params.multi_items(),
        prefer=request.headers.get("prefer"),
        default_count=default_count,
    )


def search_bundle(
    request: Request,
    search: Search,
    entries: Sequence[dict[str, Any]],
    total: int | None,
    included: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """The searchset Bundle of ``search``: total, self/first/previous/next/last links."""
    return searchset_bundle(
        base=fhir_base(request),
        path=search.spec.type,
        params=search.applied,
        entries=entries,
        total=total,
        paging=search.paging,
        included=included,
    )


def parse_reference(value: str, *, target: str, base: str) -> str:
    """The id a reference search value names (R4 3.1.1.5.5): ``[target]/[id]``, ``[id]``
    or ``[base]/[target]/[id]`` (this server's absolute URL).

    Raises
    ------
    InvalidQueryError
        Another resource type, another server, or not a FHIR id.
    """
    text = value
    if text.startswith(("http://", "https://")):
        prefix = base.rstrip("/") + "/"
        if not text.startswith(prefix):
            raise InvalidQueryError(f"reference {value!r} is not on this server")
        text = text.removeprefix(prefix)
    kind, slash, ident = text.rpartition("/")
    if slash and kind != target:
        raise InvalidQueryError(f"reference must be {target}/[id]")
    if not _ID.fullmatch(ident):
        raise InvalidQueryError(f"reference {value!r} has no valid id")
    return ident
