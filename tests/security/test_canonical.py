"""RFC 8785 (JCS) canonicalization: the examples of the RFC."""

from __future__ import annotations

import json

import pytest

from core.canonical import canonical_json, canonicalize


def test_rfc8785_section_3_2_2_example() -> None:
    text = ('{"numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],'
            ' "string": "\\u20ac$\\u000F\\u000aA\'\\u0042\\u0022\\u005c\\\\\\"\\/",'
            ' "literals": [null, true, false]}')
    expected = ('{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
                '"string":"€$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}')
    assert canonical_json(text).decode() == expected


def test_rfc8785_sorting_by_utf16_code_units() -> None:
    value = {"\u20ac": "Euro Sign", "\r": "Carriage Return",
             "\ufb33": "Hebrew Letter Dalet With Dagesh",
             "1": "One", "\U0001f600": "Emoji: Grinning Face", "\u0080": "Control",
             "\u00f6": "Latin Small Letter O With Diaeresis"}
    keys = list(json.loads(canonicalize(value)))
    assert keys == ["\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001f600", "\ufb33"]


@pytest.mark.parametrize("bad", ['{"a":1,"a":2}', '[NaN]', '[9007199254740993]'])
def test_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        canonical_json(bad)


def test_flat_string_objects_take_the_same_bytes_as_the_general_path() -> None:
    import rfc8785  # the general RFC 8785 writer behind canonicalize()

    values = [
        {"b": "Nguyễn Văn An", "a": "\u000f\n\t\"\\/\u007f\u2028", "c": ""},
        {"resource": "Instance/1.2.3", "agent": "CT01", "detail": '{"k":"v"}'},
        {"\r": "control key", "z": "\U0001f600"},  # a non-ASCII-safe key order case
    ]
    for value in values:
        out = rfc8785.dumps(value)  # the element-by-element RFC 8785 writer
        assert canonicalize(value) == out
    with pytest.raises(ValueError):
        canonicalize({"a": "\ud800"})  # lone surrogate


# RFC 8785 Appendix B: IEEE 754 doubles and their canonical text. They were the
# cross-check of our own number writer; they now check the rfc8785 package's.
_APPENDIX_B = [
    ("0000000000000000", "0"),
    ("8000000000000000", "0"),
    ("0000000000000001", "5e-324"),
    ("8000000000000001", "-5e-324"),
    ("7fefffffffffffff", "1.7976931348623157e+308"),
    ("ffefffffffffffff", "-1.7976931348623157e+308"),
    ("4340000000000000", "9007199254740992"),
    ("c340000000000000", "-9007199254740992"),
    ("4430000000000000", "295147905179352830000"),
    ("44b52d02c7e14af5", "9.999999999999997e+22"),
    ("44b52d02c7e14af6", "1e+23"),
    ("44b52d02c7e14af7", "1.0000000000000001e+23"),
    ("444b1ae4d6e2ef4e", "999999999999999700000"),
    ("444b1ae4d6e2ef4f", "999999999999999900000"),
    ("444b1ae4d6e2ef50", "1e+21"),
    ("3eb0c6f7a0b5ed8c", "9.999999999999997e-7"),
    ("3eb0c6f7a0b5ed8d", "0.000001"),
    ("41b3de4355555553", "333333333.3333332"),
    ("41b3de4355555554", "333333333.33333325"),
    ("41b3de4355555555", "333333333.3333333"),
    ("41b3de4355555556", "333333333.3333334"),
    ("41b3de4355555557", "333333333.33333343"),
    ("becbf647612f3696", "-0.0000033333333333333333"),
    ("43143ff3c1cb0959", "1424953923781206.2"),
]


@pytest.mark.parametrize(("bits", "text"), _APPENDIX_B)
def test_rfc8785_appendix_b_numbers(bits: str, text: str) -> None:
    import struct

    (value,) = struct.unpack(">d", bytes.fromhex(bits))
    assert canonicalize([value]) == f"[{text}]".encode()
