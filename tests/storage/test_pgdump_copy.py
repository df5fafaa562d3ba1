"""The COPY text-format decoder that lets a pg_dump backup be verified without a server."""

from __future__ import annotations

from storage._pgdump import parse_copy


def test_copy_blocks_are_decoded() -> None:
    script = (
        b"SET client_encoding = 'UTF8';\n"
        b"COPY public.audit_head (id, seq, hash) FROM stdin;\n"
        b"1\t2\tab\n"
        b"\\.\n"
        b"COPY public.\"audit_events\" (seq, resource, detail) FROM stdin;\n"
        b"1\t/x\\ty\\\\z\\nw\t\\N\n"
        b"2\tNguy\xe1\xbb\x85n\t\\101\\x42\\q\n"
        b"\\.\n"
    )
    rows = parse_copy(script)
    assert rows["audit_head"] == [{"id": "1", "seq": "2", "hash": "ab"}]
    assert rows["audit_events"] == [
        {"seq": "1", "resource": "/x\ty\\z\nw", "detail": None},
        {"seq": "2", "resource": "Nguyễn", "detail": "ABq"},
    ]
