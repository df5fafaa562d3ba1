"""Conditional requests (RFC 9110 §13.1): one ``If-None-Match`` check for every route that
sends an ETag (tiles, the OHIF build), and one reading of a FHIR version ``If-Match``
(FHIR R4 http.html#concurrency) for the resources updated version-aware."""

from __future__ import annotations

import re

from starlette.requests import Request

from core.errors import PreconditionFailedError

__all__ = ["if_match_version", "not_modified"]


def not_modified(request: Request, etag: str) -> bool:
    """``If-None-Match`` matches ``etag`` by the weak comparison GET uses."""
    header = request.headers.get("if-none-match")
    if not header:
        return False
    if header.strip() == "*":
        return True
    return etag in {t.strip().removeprefix("W/") for t in header.split(",")}


_IF_MATCH = re.compile(r'\s*(?:W/)?"(\d{1,18})"\s*')


def if_match_version(request: Request) -> int | None:
    """The version an ``If-Match: W/"n"`` names (None: no header, a plain update).

    Anything else, ``*`` included, is not a version we ever gave: RFC 9110 §13.1.1
    makes the condition false, so :class:`PreconditionFailedError` (412)."""
    raw = request.headers.get("if-match")
    if raw is None:
        return None
    m = _IF_MATCH.fullmatch(raw)
    if m is None:
        raise PreconditionFailedError('If-Match must be a version ETag W/"n"')
    return int(m.group(1))
