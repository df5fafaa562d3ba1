"""ASTM E1381 framed captures: our framed fixture and corrupted copies of it."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from core.errors import LabMessageError
from ingest.labs.parsers import astm, detect
from ingest.labs.parsers._e1381 import unframe
from tests.ingest.labs._framing import ACK, ENQ, EOT, frame, frame_capture, with_long_comment

LabFile = Callable[[str], bytes]
FRAMED = "astm/ours_e1381_framed_architect_etb_wrap_long.astm"
ARCHITECT = "astm/abbott_architect_multi_message.astm"


def _frames(capture: bytes) -> list[bytes]:
    return re.findall(rb"\x02.*?[\x03\x17][0-9A-F]{2}\r\n", capture, flags=re.S)


def test_fixture_is_what_the_helper_builds(lab_file: LabFile) -> None:
    text, index = with_long_comment(lab_file(ARCHITECT), after_line=4, length=300)
    assert lab_file(FRAMED) == frame_capture(text, max_text=64, whole={index})


def test_fixture_shows_etb_wrapping_and_a_long_frame(lab_file: LabFile) -> None:
    frames = _frames(lab_file(FRAMED))
    numbers = [f[1] - 0x30 for f in frames]
    assert numbers[:10] == [1, 2, 3, 4, 5, 6, 7, 0, 1, 2]
    assert sum(1 for f in frames if b"\x17" in f[-5:]) > 20  # intermediate frames
    assert max(len(f) for f in frames) > 240 + 7


def test_framed_capture_parses_like_the_unframed_file(lab_file: LabFile) -> None:
    framed = astm.parse(lab_file(FRAMED))
    text, _ = with_long_comment(lab_file(ARCHITECT), after_line=4, length=300)
    plain = astm.parse(text)
    assert framed.warnings == ()
    assert len(framed.messages) == 5
    assert len(framed.observations) == 14
    assert [o.value for o in framed.observations] == [o.value for o in plain.observations]
    first = framed.observations[0]
    assert (first.value, first.unit, first.specimen_id) == (0.15, "S/CO", "276056250158121")
    assert len(first.comments) == 1 and len(first.comments[0]) == 300
    assert framed.observations[-1].raw_value == "1006"


def test_detect_names_framed_captures_astm(lab_file: LabFile) -> None:
    capture = lab_file(FRAMED)
    assert detect(capture) == "astm"
    assert detect(capture[1:]) == "astm"  # starting at ACK
    assert detect(capture[2:]) == "astm"  # starting at STX


def test_bad_checksum_is_rejected(lab_file: LabFile) -> None:
    capture = bytearray(lab_file(FRAMED))
    third = [m.start() for m in re.finditer(rb"\x02", capture)][2]
    capture[third + 5] ^= 0x01  # one bit in the text of frame 3
    with pytest.raises(LabMessageError, match="checksum mismatch") as info:
        astm.parse(bytes(capture))
    assert info.value.where is not None and info.value.where.startswith("frame 3,")


def test_frame_number_out_of_sequence_is_rejected() -> None:
    capture = ENQ + frame(1, b"H|\\^&\r", last=True) + frame(3, b"L|1|N\r", last=True) + EOT
    with pytest.raises(LabMessageError, match="frame number 3 where 2 was expected"):
        astm.parse(capture)


def test_retransmitted_frame_is_skipped_with_a_warning() -> None:
    header = frame(1, b"H|\\^&\r", last=True)
    capture = ENQ + header + header + frame(2, b"L|1|N\r", last=True) + EOT
    result = astm.parse(capture)
    assert len(result.messages) == 1
    assert [w.message for w in result.warnings] == ["repeated frame skipped (retransmission)"]


def test_capture_ending_inside_a_record_is_rejected() -> None:
    capture = ENQ + frame(1, b"H|\\^&|||Sen", last=False)
    with pytest.raises(LabMessageError, match="last frame ended with ETB"):
        astm.parse(capture)


def test_truncated_frame_is_rejected(lab_file: LabFile) -> None:
    capture = lab_file(FRAMED)
    with pytest.raises(LabMessageError, match=r"truncated|checksum"):
        astm.parse(capture[: len(capture) // 2])


def test_etx_frame_without_cr_still_ends_the_record() -> None:
    capture = (
        ENQ
        + frame(1, b"H|\\^&", last=True)
        + frame(2, b"P|1", last=True)
        + frame(3, b"O|1|S1||^^^GLU", last=True)
        + frame(4, b"R|1|^^^GLU|5.5|mmol/L", last=True)
        + frame(5, b"L|1|N", last=True)
        + EOT
    )
    (obs,) = astm.parse(capture).observations
    assert (obs.value, obs.unit, obs.specimen_id) == (5.5, "mmol/L", "S1")


def test_two_sessions_restart_frame_numbers_at_one(lab_file: LabFile) -> None:
    session = frame_capture(lab_file("astm/immucor_galileo_result.astm"), max_text=240)
    result = astm.parse(session + session)
    assert len(result.messages) == 2 and len(result.observations) == 28


def test_garbage_between_frames_is_rejected() -> None:
    capture = ENQ + frame(1, b"H|\\^&\r", last=True) + b"XYZ" + EOT
    with pytest.raises(LabMessageError, match="outside an E1381 frame"):
        unframe(capture)


def test_lower_case_checksum_and_missing_lf_are_accepted() -> None:
    good = frame(1, b"H|\\^&\r", last=True)
    lowered = good[:-4] + good[-4:-2].lower() + b"\r"
    text, warnings = unframe(ENQ + lowered + ACK + EOT)
    assert text == b"H|\\^&\r" and warnings == []
