"""JSON Canonicalization Scheme (RFC 8785): the exact bytes a signed result covers.

Why JCS rather than FHIR's own ``http://hl7.org/fhir/canonicalization/json`` (FHIR
R4 §2.6.2.1): JCS is a published, tool-independent algorithm (libraries exist for
most languages), so a third party can recompute the signed bytes from any copy of the
report. Properties are sorted by UTF-16 code units, there is no whitespace, strings
use the ECMAScript escapes and numbers the ECMAScript shortest form (RFC 8785 3.2).
A FHIR ``decimal`` therefore loses trailing zeros (``1.50`` → ``1.5``) in the signed
form; the service stores and returns the canonical bytes, so what is signed is what
is served.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

__all__ = ["canonical_json", "canonicalize"]

_MAX_SAFE_INT = 2**53 - 1


def _number(value: float) -> str:
    # ECMAScript Number::toString (ECMA-262 7.1.12.1), from Python's shortest repr.
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError("NaN and Infinity are not JSON (RFC 8785 3.2.2.3)")
    if value == 0:
        return "0"
    sign = "-" if value < 0 else ""
    _, digit_tuple, exponent = Decimal(repr(abs(value))).as_tuple()
    assert isinstance(exponent, int)
    digits = "".join(map(str, digit_tuple))
    n = len(digits) + exponent  # value = 0.digits × 10**n
    digits = digits.rstrip("0") or "0"
    k = len(digits)
    if k <= n <= 21:
        body = digits + "0" * (n - k)
    elif 0 < n <= 21:
        body = f"{digits[:n]}.{digits[n:]}"
    elif -6 < n <= 0:
        body = "0." + "0" * (-n) + digits
    else:
        e = n - 1
        mantissa = digits if k == 1 else f"{digits[0]}.{digits[1:]}"
        body = f"{mantissa}e{'+' if e > 0 else '-'}{abs(e)}"
    return sign + body


def _string(value: str) -> str:
    # json.dumps with ensure_ascii=False escapes exactly what ECMAScript's
    # JSON.stringify escapes: \" \\ \b \f \n \r \t and other C0 controls as \u00xx.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("lone surrogate in a string (RFC 8785 3.2.2.2)") from exc
    return json.dumps(value, ensure_ascii=False)


def _sort_key(key: str) -> bytes:
    return key.encode("utf-16-be")  # RFC 8785 3.2.3: sort by UTF-16 code units


def _emit(value: Any, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        if abs(value) > _MAX_SAFE_INT:
            raise ValueError("integer outside IEEE 754 double precision (RFC 8785 3.2.2.3)")
        out.append(str(value))
    elif isinstance(value, float):
        out.append(_number(value))
    elif isinstance(value, str):
        out.append(_string(value))
    elif isinstance(value, list | tuple):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _emit(item, out)
        out.append("]")
    elif isinstance(value, dict):
        out.append("{")
        for i, key in enumerate(sorted(value, key=_sort_key)):
            if not isinstance(key, str):
                raise ValueError("object keys must be strings")
            if i:
                out.append(",")
            out.append(_string(key))
            out.append(":")
            _emit(value[key], out)
        out.append("}")
    else:
        raise ValueError(f"not a JSON value: {type(value).__name__}")


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
        # order is UTF-16 order there, and json.dumps escapes as _string does, in C.
        text = json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError("lone surrogate in a string (RFC 8785 3.2.2.2)") from exc
    out: list[str] = []
    _emit(value, out)
    return "".join(out).encode("utf-8")


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
