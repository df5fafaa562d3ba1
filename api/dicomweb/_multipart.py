"""Media types of DICOMweb messages: Accept negotiation and multipart/related bodies.

PS3.18 8.7 (media types, Accept), 8.6.1.2 (multipart/related payloads, RFC 2387) and
RFC 9110 12.5.1 (Accept with quality values). Pure: STOW-RS bodies are parsed from a
buffer (a memory map of the spooled request), responses are built as byte iterators
so that large instances stream.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from core.errors import InvalidQueryError

__all__ = [
    "Buffer",
    "MediaRange",
    "Part",
    "content_type_params",
    "iter_parts",
    "multipart_body",
    "new_boundary",
    "parse_accept",
]


@dataclass(frozen=True, slots=True)
class MediaRange:
    """One element of an Accept header.

    ``media_type`` is the payload type: for ``multipart/related; type="X"`` it is X.
    ``multipart`` tells whether a multipart/related wrapper was asked for.
    """

    media_type: str
    multipart: bool
    transfer_syntax: str | None
    q: float
    params: dict[str, str] = field(default_factory=dict)

    def matches(self, media_type: str) -> bool:
        mine, theirs = self.media_type, media_type.lower()
        if mine in ("*/*", "*"):
            return True
        if mine.endswith("/*"):
            return theirs.split("/")[0] == mine.split("/")[0]
        return mine == theirs


_PARAM = re.compile(r';\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;,\s]*)')


def content_type_params(value: str) -> tuple[str, dict[str, str]]:
    """Split ``type/subtype; a=b; c="d"`` into the lower-cased type and its parameters."""
    main, _, rest = value.partition(";")
    params = {}
    for m in _PARAM.finditer(";" + rest):
        raw = m.group(2)
        params[m.group(1).lower()] = raw[1:-1].replace('\\"', '"') if raw[:1] == '"' else raw
    return main.strip().lower(), params


def _split_header(value: str) -> list[str]:
    out: list[str] = []
    current: list[str] = []
    depth = False
    for ch in value:
        if ch == '"':
            depth = not depth
        if ch == "," and not depth:
            out.append("".join(current))
            current = []
        else:
            current.append(ch)
    out.append("".join(current))
    return [item.strip() for item in out if item.strip()]


def parse_accept(header: str | None) -> list[MediaRange]:
    """The Accept header's media ranges, most preferred first (RFC 9110 12.5.1).

    An absent or empty header yields ``[*/*]``.
    """
    if not header or not header.strip():
        return [MediaRange("*/*", False, None, 1.0)]
    ranges: list[tuple[float, int, MediaRange]] = []
    for order, item in enumerate(_split_header(header)):
        main, params = content_type_params(item)
        try:
            q = float(params.pop("q", "1"))
        except ValueError:
            q = 1.0
        if q <= 0:
            continue
        multipart = main == "multipart/related"
        inner = params.get("type", "*/*").lower() if multipart else main
        rng = MediaRange(inner, multipart, params.get("transfer-syntax"), q, params)
        ranges.append((-q, order, rng))
    ranges.sort(key=lambda t: (t[0], t[1]))
    return [r for *_, r in ranges]


def new_boundary() -> str:
    return uuid.uuid4().hex


def multipart_body(
    parts: Iterable[tuple[str, Iterable[bytes]]], boundary: str, *, location: bool = False
) -> Iterator[bytes]:
    """Encode ``(content_type, chunks)`` parts as a multipart/related body (RFC 2387)."""
    delimiter = f"--{boundary}".encode("ascii")
    for content_type, chunks in parts:
        yield delimiter + b"\r\nContent-Type: " + content_type.encode("ascii") + b"\r\n\r\n"
        yield from chunks
        yield b"\r\n"
    yield delimiter + b"--\r\n"


@dataclass(frozen=True, slots=True)
class Part:
    """One body part: its headers (lower-cased names) and where its content lies."""

    headers: dict[str, str]
    start: int
    end: int


class Buffer(Protocol):
    """What :func:`iter_parts` needs: ``bytes`` or an ``mmap``."""

    def find(self, sub: bytes, start: int = ..., end: int = ..., /) -> int: ...

    def __getitem__(self, index: slice, /) -> bytes: ...


def iter_parts(buffer: Buffer, boundary: str) -> Iterator[Part]:
    """The parts of a multipart body in ``buffer`` (RFC 2046 5.1.1).

    Tolerates a preamble (dicomweb-client starts with CRLF) and transport padding.

    Raises
    ------
    InvalidQueryError
        No opening delimiter, or the closing delimiter is missing.
    """
    data = buffer
    find = buffer.find
    delimiter = b"--" + boundary.encode("latin-1")
    pos = find(delimiter)
    if pos < 0:
        raise InvalidQueryError("multipart body without an opening boundary")
    next_delimiter = b"\r\n" + delimiter
    while True:
        pos += len(delimiter)
        if (data[pos : pos + 2]) == b"--":
            return
        line_end = find(b"\r\n", pos)
        if line_end < 0:
            raise InvalidQueryError("multipart body truncated")
        start = line_end + 2
        end = find(next_delimiter, start)
        if end < 0:
            raise InvalidQueryError("multipart body without a closing boundary")
        headers: dict[str, str] = {}
        content = start
        if (data[start : start + 2]) != b"\r\n":
            header_end = find(b"\r\n\r\n", start, end)
            if header_end < 0:
                raise InvalidQueryError("multipart part headers not terminated")
            for line in (data[start:header_end]).decode("latin-1").split("\r\n"):
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            content = header_end + 4
        else:
            content = start + 2
        yield Part(headers, content, end)
        pos = end + 2
