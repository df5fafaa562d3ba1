"""Bounds on FHIR resources received for writes (treat every body as hostile).

* the body is read with a byte limit (413 beyond it, before anything parses it);
* JSON nesting is bounded (a 100,000-deep array is a 400, never a 500);
* every string is bounded and holds no control characters other than tab, CR and LF
  (FHIR R4 datatypes.html#string: "Strings SHALL NOT contain ... control
  characters other than U+0009, U+000A, U+000D"), named by its element path;
* :func:`expect` checks an element's JSON type, so ``"subject": "#p"`` or
  ``"code": [1]`` is a 400 naming the element.
"""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import Request

from core.errors import InvalidDatasetError, ServiceError

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_DEPTH",
    "MAX_STRING",
    "BodyTooLargeError",
    "MalformedResourceError",
    "check_strings",
    "expect",
    "read_resource",
]

#: Largest FHIR request body accepted (an order with its Patient is a few kB).
MAX_BODY_BYTES = 1024 * 1024
#: Deepest JSON nesting accepted (ServiceRequest with a contained Patient needs < 10).
MAX_DEPTH = 32
#: Longest string anywhere in a resource (DICOM LT, the longest text an order feeds).
MAX_STRING = 10_240
# FHIR string: no C0 controls except tab, LF, CR (and no DEL).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class MalformedResourceError(InvalidDatasetError):
    """A resource failing basic FHIR rules: types, bounds (FHIR ``invalid``, HTTP 400;
    R4 http.html#create)."""

    title = "Invalid resource"
    http_status = 400


class BodyTooLargeError(ServiceError):
    """The request body exceeds :data:`MAX_BODY_BYTES` (HTTP 413, FHIR ``too-costly``)."""

    title = "Request body too large"
    http_status = 413
    fhir_code = "too-costly"


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if (declared is not None and declared.isascii() and declared.isdigit()
            and int(declared) > limit):
        raise BodyTooLargeError(f"body exceeds {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLargeError(f"body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_resource(request: Request, *, limit: int = MAX_BODY_BYTES) -> dict[str, Any]:
    """The request body as a JSON object, within every bound of this module.

    Raises
    ------
    BodyTooLargeError
        More than ``limit`` bytes.
    MalformedResourceError
        Not UTF-8 JSON, not an object, nested deeper than :data:`MAX_DEPTH`, or a
        string too long or holding control characters.
    """
    raw = await _read_body(request, limit)
    try:
        body = json.loads(raw)
    except RecursionError:
        # CPython's decoder guards its C recursion and raises cleanly; the walk
        # below then bounds what the mapping code may recurse into.
        raise MalformedResourceError(f"JSON nested deeper than {MAX_DEPTH} levels") from None
    except ValueError:
        raise MalformedResourceError("body is not JSON") from None
    if not isinstance(body, dict):
        raise MalformedResourceError("body must be a JSON object (a FHIR resource)")
    check_strings(body, str(body.get("resourceType") or "resource"))
    return body


def check_strings(value: Any, path: str, depth: int = 0) -> None:
    """Refuse any string (or key) under ``value`` that is too long or holds a control
    character, and nesting deeper than :data:`MAX_DEPTH`; the message names the
    element (``ServiceRequest.contained[0].name[0]...``)."""
    if depth > MAX_DEPTH:
        raise MalformedResourceError(f"{path}: JSON nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise MalformedResourceError(f"{path}: longer than {MAX_STRING} characters")
        if _CONTROL.search(value):
            raise MalformedResourceError(f"{path}: control characters are not allowed")
    elif isinstance(value, dict):
        for key, item in value.items():
            if len(key) > 64 or _CONTROL.search(key):
                raise MalformedResourceError(f"{path}: invalid element name")
            check_strings(item, f"{path}.{key}", depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_strings(item, f"{path}[{i}]", depth + 1)


_KIND = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}


def expect(value: Any, kind: type, path: str, *, max_length: int | None = None) -> Any:
    """``value`` if it is JSON ``kind`` (None passes: the element is absent), else a
    400 naming ``path``; strings also checked against ``max_length``."""
    if value is None:
        return None
    if kind is str and not isinstance(value, str):
        raise MalformedResourceError(f"{path} must be a string")
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise MalformedResourceError(f"{path} must be {_KIND.get(kind, kind.__name__)}")
    if max_length is not None and isinstance(value, str) and len(value) > max_length:
        raise MalformedResourceError(f"{path} is longer than {max_length} characters")
    return value
