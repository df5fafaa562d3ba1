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
    from core.canonical import _emit

    values = [
        {"b": "Nguyễn Văn An", "a": "\u000f\n\t\"\\/\u007f\u2028", "c": ""},
        {"resource": "Instance/1.2.3", "agent": "CT01", "detail": '{"k":"v"}'},
        {"\r": "control key", "z": "\U0001f600"},  # a non-ASCII-safe key order case
    ]
    for value in values:
        out: list[str] = []
        _emit(value, out)  # the element-by-element RFC 8785 writer
        assert canonicalize(value) == "".join(out).encode("utf-8")
    with pytest.raises(ValueError):
        canonicalize({"a": "\ud800"})  # lone surrogate
