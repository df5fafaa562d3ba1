"""Conditional GET (RFC 9110 §13.1.2): one ``If-None-Match`` check for every route that
sends an ETag (tiles, the OHIF build)."""

from __future__ import annotations

from starlette.requests import Request

__all__ = ["not_modified"]


def not_modified(request: Request, etag: str) -> bool:
    """``If-None-Match`` matches ``etag`` by the weak comparison GET uses."""
    header = request.headers.get("if-none-match")
    if not header:
        return False
    if header.strip() == "*":
        return True
    return etag in {t.strip().removeprefix("W/") for t in header.split(",")}
