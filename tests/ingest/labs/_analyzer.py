"""An analyzer that keeps sending: real captures from ``tests/data/lab`` (their origin
and license are in ``tests/data/lab/SOURCES.md``), each drop with a fresh message
control id, as an instrument numbers every message it sends.

The committed files stay byte for byte as captured; only the copy dropped into an
inbox carries the new id (HL7 MSH-10, ASTM E1394 header field 7.1.3 "Message Control
ID", empty in these captures). Without it the watcher would file every repeat as a
duplicate of the first drop (same SHA-256) and parse nothing after the first round.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterator
from pathlib import Path

LAB_DATA = Path(__file__).resolve().parents[2] / "data" / "lab"

#: Result messages that the ``auto`` inbox ingests (see test_lab_inbox_files.py).
HL7_RESULTS = (
    "cdc_oru_r01_v251_result_linked.hl7",
    "python_hl7_oru_r01_v24_sn_value.hl7",
    "cdc_oracle_oru_r01_v23_refrange_flags.hl7",
    "cdc_epic_oru_r01_v23_nte_dualcoding.hl7",
    "cdc_oru_r01_v251_utf8_micro_lf.hl7",
    "cepheid_genexpert_oru_r32_v25_subcomponents.hl7",
)
ASTM_RESULTS = (
    "abbott_architect_multi_message.astm",
    "biorad_ihcom_bloodtype_two_patients.astm",
    "immucor_galileo_result.astm",
)

_MSH10 = re.compile(rb"(?m)^(MSH(?:\|[^|\r\n]*){8}\|)([^|\r\n]*)")
_ASTM_H3 = re.compile(rb"(?m)^(\d?H\|[^|\r\n]*\|)([^|\r\n]*)")


def with_control_id(name: str, raw: bytes, tag: str) -> bytes:
    """``raw`` with ``tag`` appended to each message's control id."""
    pattern = _MSH10 if name.endswith(".hl7") else _ASTM_H3
    out, n = pattern.subn(lambda m: m.group(1) + m.group(2) + tag.encode("ascii"), raw)
    assert n, f"no message header in {name}"
    return out


def drops(kind: str, source: str) -> Iterator[tuple[str, bytes]]:
    """Endless (file name, bytes) of one analyzer: ``kind`` is ``hl7`` or ``astm``."""
    names = HL7_RESULTS if kind == "hl7" else ASTM_RESULTS
    captures = [(n, (LAB_DATA / kind / n).read_bytes()) for n in names]
    for i, (name, raw) in enumerate(itertools.cycle(captures)):
        tag = f"{source}{i:06d}"
        stem, dot, ext = name.rpartition(".")
        yield f"{stem}-{tag}{dot}{ext}", with_control_id(name, raw, tag)


def drop(inbox: Path, name: str, raw: bytes) -> Path:
    """Write then rename, as analyzer middleware does: the watcher never sees half a file."""
    final = inbox / name
    partial = inbox / f"{name}.tmp"  # a partial name: skipped, then taken at the rename
    partial.write_bytes(raw)
    os.replace(partial, final)
    return final
