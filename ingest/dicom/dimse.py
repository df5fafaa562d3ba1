"""The few DIMSE command sets the plain-socket paths read and write (PS3.7 Annex E).

C-STORE and C-ECHO (PS3.7 9.3.1, 9.3.5), C-FIND, C-MOVE and C-CANCEL (PS3.7 9.3.2,
9.3.4, 9.3.2.3) as an SCP, and C-STORE as the SCU of C-MOVE sub-operations.

Command sets are always Implicit VR Little Endian (PS3.7 6.3.1). Encoding them by hand
is a handful of bytes; building a pydicom Dataset for each response costs more than
the rest of the receive path put together.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "C_CANCEL_RQ",
    "C_ECHO_RQ",
    "C_ECHO_RSP",
    "C_FIND_RQ",
    "C_FIND_RSP",
    "C_GET_RQ",
    "C_GET_RSP",
    "C_MOVE_RQ",
    "C_MOVE_RSP",
    "C_STORE_RQ",
    "C_STORE_RSP",
    "Command",
    "decode_command",
    "encode_response",
    "encode_store_rq",
]

C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
C_FIND_RQ, C_FIND_RSP = 0x0020, 0x8020
C_MOVE_RQ, C_MOVE_RSP = 0x0021, 0x8021
C_GET_RQ, C_GET_RSP = 0x0010, 0x8010
C_CANCEL_RQ = 0x0FFF
NO_DATASET = 0x0101
#: Any value but 0x0101 says a data set follows (PS3.7 E.1); pynetdicom and DCMTK send 1.
WITH_DATASET = 0x0001

_AFFECTED_SOP_CLASS = 0x0002
_COMMAND_FIELD = 0x0100
_MESSAGE_ID = 0x0110
_MESSAGE_ID_RESPONDED = 0x0120
_MOVE_DESTINATION = 0x0600
_PRIORITY = 0x0700
_DATASET_TYPE = 0x0800
_STATUS = 0x0900
_ERROR_COMMENT = 0x0902
_AFFECTED_SOP_INSTANCE = 0x1000
_REMAINING, _COMPLETED, _FAILED, _WARNING = 0x1020, 0x1021, 0x1022, 0x1023
_MOVE_ORIGINATOR_AET = 0x1030
_MOVE_ORIGINATOR_ID = 0x1031


@dataclass(frozen=True, slots=True)
class Command:
    """The fields of a command set we act on (PS3.7 9.3.1-9.3.5): a request's, or
    (``status`` set) the response to one of our C-STORE sub-operations."""

    command_field: int
    message_id: int
    has_dataset: bool
    affected_sop_class_uid: str = ""
    affected_sop_instance_uid: str = ""
    move_originator_aet: str = ""
    #: Message ID Being Responded To: of a C-CANCEL-RQ (PS3.7 9.3.2.3) or a response.
    message_id_responded: int = 0
    #: Move Destination of a C-MOVE-RQ (PS3.7 9.3.4.1).
    move_destination: str = ""
    status: int | None = None


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
        responded = struct.unpack("<H", fields.get(_MESSAGE_ID_RESPONDED, b"\x00\x00"))[0]
        status = struct.unpack("<H", fields[_STATUS])[0] if _STATUS in fields else None
    except (KeyError, struct.error) as exc:
        raise ValueError("command set lacks Command Field or Data Set Type") from exc
    return Command(
        message_id_responded=responded,
        move_destination=_text(fields.get(_MOVE_DESTINATION, b"")),
        status=status,
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


def _ae(value: str) -> bytes:
    raw = value[:16].encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def _group(body: list[bytes]) -> bytes:
    rest = b"".join(body)
    return _element(0x0000, struct.pack("<I", len(rest))) + rest


def encode_response(
    command_field: int,
    request: Command,
    status: int,
    error_comment: str = "",
    *,
    has_dataset: bool = False,
    counts: tuple[int | None, int, int, int] | None = None,
) -> bytes:
    """Encode a response command set: C-STORE-RSP, C-ECHO-RSP (PS3.7 9.3.1.2,
    9.3.5.2), C-FIND-RSP (9.3.2.2) or C-MOVE-RSP (9.3.4.2).

    ``counts`` are a C-MOVE-RSP's Number of Remaining (None: left out, as in a final
    response, PS3.4 C.4.2.1.5), Completed, Failed and Warning Sub-operations.
    """
    body = [
        _element(_AFFECTED_SOP_CLASS, _uid(request.affected_sop_class_uid)),
        _element(_COMMAND_FIELD, _us(command_field)),
        _element(_MESSAGE_ID_RESPONDED, _us(request.message_id)),
        _element(_DATASET_TYPE, _us(WITH_DATASET if has_dataset else NO_DATASET)),
        _element(_STATUS, _us(status)),
    ]
    if error_comment:
        body.append(_element(_ERROR_COMMENT, _lo(error_comment)))
    if request.affected_sop_instance_uid:
        body.append(_element(_AFFECTED_SOP_INSTANCE, _uid(request.affected_sop_instance_uid)))
    if counts is not None:
        remaining, completed, failed, warning = counts
        if remaining is not None:
            body.append(_element(_REMAINING, _us(remaining)))
        body.append(_element(_COMPLETED, _us(completed)))
        body.append(_element(_FAILED, _us(failed)))
        body.append(_element(_WARNING, _us(warning)))
    return _group(body)


def encode_store_rq(
    message_id: int,
    sop_class_uid: str,
    sop_instance_uid: str,
    *,
    move_originator_aet: str = "",
    move_originator_id: int | None = None,
) -> bytes:
    """Encode a C-STORE-RQ command set (PS3.7 9.3.1.1), medium priority; the Move
    Originator fields name the C-MOVE it is a sub-operation of (PS3.4 C.4.2.2.1)."""
    body = [
        _element(_AFFECTED_SOP_CLASS, _uid(sop_class_uid)),
        _element(_COMMAND_FIELD, _us(C_STORE_RQ)),
        _element(_MESSAGE_ID, _us(message_id)),
        _element(_PRIORITY, _us(0x0000)),
        _element(_DATASET_TYPE, _us(WITH_DATASET)),
        _element(_AFFECTED_SOP_INSTANCE, _uid(sop_instance_uid)),
    ]
    if move_originator_aet:
        body.append(_element(_MOVE_ORIGINATOR_AET, _ae(move_originator_aet)))
    if move_originator_id is not None:
        body.append(_element(_MOVE_ORIGINATOR_ID, _us(move_originator_id)))
    return _group(body)
