"""JSON Canonicalization Scheme (RFC 8785): the exact bytes a signed result covers.

Why JCS rather than FHIR's own ``http://hl7.org/fhir/canonicalization/json`` (FHIR
R4 §2.6.2.1): JCS is a published, tool-independent algorithm (libraries exist for
most languages), so a third party can recompute the signed bytes from any copy of the
report. Properties are sorted by UTF-16 code units, there is no whitespace, strings
use the ECMAScript escapes and numbers the ECMAScript shortest form (RFC 8785 3.2).
A FHIR ``decimal`` therefore loses trailing zeros (``1.50`` → ``1.5``) in the signed
form; the service stores and returns the canonical bytes, so what is signed is what
is served.

The general writer is the ``rfc8785`` package (Trail of Bits, PyPI) rather than our
own: a library first (issue 15). tests/security/test_canonical.py keeps the RFC's
own examples as the cross-check of it. Flat objects of strings, every audit entry,
keep a faster path through the C ``json`` encoder, checked against the library by
the same tests.
"""

from __future__ import annotations

import json
from typing import Any

import rfc8785

__all__ = ["canonical_json", "canonicalize"]


def canonicalize(value: Any) -> bytes:
    """RFC 8785 canonical UTF-8 bytes of a JSON value (as ``json.loads`` returns it).

    Raises
    ------
    ValueError
        For values JCS cannot represent (NaN, unsafe integers, lone surrogates).
    """
    if isinstance(value, dict) and all(
        type(k) is str and k.isascii() and type(v) is str for k, v in value.items()
    ):
        # A flat object of strings with ASCII keys (every audit entry): code-point
        # order is UTF-16 order there, and json.dumps escapes as RFC 8785 3.2.2.2 does, in C.
        text = json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError("lone surrogate in a string (RFC 8785 3.2.2.2)") from exc
    # rfc8785's errors (CanonicalizationError and its Integer/FloatDomainError) are
    # ValueErrors, as ours were.
    return rfc8785.dumps(value)


def canonical_json(text: str | bytes) -> bytes:
    """Parse JSON text (duplicate keys refused, RFC 8785 3.1) and canonicalize it."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, val in pairs:
            if key in seen:
                raise ValueError("duplicate object key")
            seen[key] = val
        return seen

    return canonicalize(json.loads(text, object_pairs_hook=no_duplicates))
