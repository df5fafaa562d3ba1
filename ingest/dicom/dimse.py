"""The few DIMSE command sets the storage fast path reads and writes (PS3.7 Annex E).

Command sets are always Implicit VR Little Endian (PS3.7 6.3.1). Encoding them by hand
is a handful of bytes; building a pydicom Dataset for each response costs more than
the rest of the receive path put together.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "C_ECHO_RQ",
    "C_ECHO_RSP",
    "C_STORE_RQ",
    "C_STORE_RSP",
    "Command",
    "decode_command",
    "encode_response",
]

C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
NO_DATASET = 0x0101

_AFFECTED_SOP_CLASS = 0x0002
_COMMAND_FIELD = 0x0100
_MESSAGE_ID = 0x0110
_MESSAGE_ID_RESPONDED = 0x0120
_DATASET_TYPE = 0x0800
_STATUS = 0x0900
_ERROR_COMMENT = 0x0902
_AFFECTED_SOP_INSTANCE = 0x1000
_MOVE_ORIGINATOR_AET = 0x1030


@dataclass(frozen=True, slots=True)
class Command:
    """The fields of a request command set we act on (PS3.7 9.3.1.1, 9.3.5.1)."""

    command_field: int
    message_id: int
    has_dataset: bool
    affected_sop_class_uid: str = ""
    affected_sop_instance_uid: str = ""
    move_originator_aet: str = ""


def _text(value: bytes) -> str:
    return value.rstrip(b"\x00 ").decode("ascii", "replace")


def decode_command(data: bytes) -> Command:
    """Decode an Implicit VR Little Endian group 0000 command set.

    Raises
    ------
    ValueError
        The bytes are not a well-formed command set.
    """
    fields: dict[int, bytes] = {}
    pos, end = 0, len(data)
    while pos < end:
        if pos + 8 > end:
            raise ValueError("truncated command element")
        group, elem, length = struct.unpack_from("<HHI", data, pos)
        pos += 8
        if group != 0x0000 or pos + length > end:
            raise ValueError("not a command set")
        fields[elem] = data[pos : pos + length]
        pos += length
    try:
        command_field = struct.unpack("<H", fields[_COMMAND_FIELD])[0]
        message_id = struct.unpack("<H", fields.get(_MESSAGE_ID, b"\x00\x00"))[0]
        dataset_type = struct.unpack("<H", fields[_DATASET_TYPE])[0]
    except (KeyError, struct.error) as exc:
        raise ValueError("command set lacks Command Field or Data Set Type") from exc
    return Command(
        command_field=command_field,
        message_id=message_id,
        has_dataset=dataset_type != NO_DATASET,
        affected_sop_class_uid=_text(fields.get(_AFFECTED_SOP_CLASS, b"")),
        affected_sop_instance_uid=_text(fields.get(_AFFECTED_SOP_INSTANCE, b"")),
        move_originator_aet=_text(fields.get(_MOVE_ORIGINATOR_AET, b"")),
    )


def _element(elem: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, elem, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _lo(value: str) -> bytes:
    # ErrorComment is LO: at most 64 characters, padded with a space (PS3.5 6.2).
    raw = value[:64].encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw


def encode_response(
    command_field: int, request: Command, status: int, error_comment: str = ""
) -> bytes:
    """Encode a C-STORE-RSP or C-ECHO-RSP command set (PS3.7 9.3.1.2, 9.3.5.2)."""
    body = [
        _element(_AFFECTED_SOP_CLASS, _uid(request.affected_sop_class_uid)),
        _element(_COMMAND_FIELD, struct.pack("<H", command_field)),
        _element(_MESSAGE_ID_RESPONDED, struct.pack("<H", request.message_id)),
        _element(_DATASET_TYPE, struct.pack("<H", NO_DATASET)),
        _element(_STATUS, struct.pack("<H", status)),
    ]
    if error_comment:
        body.append(_element(_ERROR_COMMENT, _lo(error_comment)))
    if request.affected_sop_instance_uid:
        body.append(_element(_AFFECTED_SOP_INSTANCE, _uid(request.affected_sop_instance_uid)))
    rest = b"".join(body)
    return _element(0x0000, struct.pack("<I", len(rest))) + rest
