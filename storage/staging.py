"""Receiving a data set to disk: Part-10 file written as it streams in, hashed on the way.

The SHA-256 covers only the data set bytes (not the File Meta Information, PS3.10
7.1), so the same instance sent by two modalities, or by C-STORE and STOW-RS, has
one key and is stored once. The meta we write is canonical (no Source AE, no
timestamps) so equal keys mean equal files.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

from core.errors import InvalidDatasetError, OutOfResourcesError

__all__ = [
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION",
    "StagedFile",
    "StagedWriter",
    "part10_prefix",
    "read_file_meta",
    "stage_part10",
]

# pydicom's root (1.2.826.0.1.3680043.8.498) with our own suffix until pacslab has a root.
IMPLEMENTATION_CLASS_UID = f"{PYDICOM_IMPLEMENTATION_UID.rsplit('.', 2)[0]}.77.1"
IMPLEMENTATION_VERSION = "PACSLAB_01"


def _meta_element(tag_elem: int, vr: bytes, value: bytes) -> bytes:
    # Explicit VR Little Endian, group 0002 (PS3.10 7.1, PS3.5 7.1.2).
    if vr in (b"OB", b"UN", b"SQ", b"UT"):
        return struct.pack("<HH2sHI", 0x0002, tag_elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, tag_elem, vr, len(value)) + value


def _ui(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


_VERSION_NAME = IMPLEMENTATION_VERSION.encode("ascii")
_VERSION_NAME += b" " * (len(_VERSION_NAME) % 2)


def part10_prefix(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble, ``DICM`` and File Meta Information (PS3.10 7.1) for one instance.

    Encoded by hand: it runs once per received instance, and building a pydicom
    ``FileMetaDataset`` (with its value validation) cost a third of the receive path.
    ``tests/storage/test_staging.py`` checks the bytes against pydicom's own writer.
    """
    body = b"".join(
        (
            _meta_element(0x0001, b"OB", b"\x00\x01"),
            _meta_element(0x0002, b"UI", _ui(sop_class_uid)),
            _meta_element(0x0003, b"UI", _ui(sop_instance_uid)),
            _meta_element(0x0010, b"UI", _ui(transfer_syntax_uid)),
            _meta_element(0x0012, b"UI", _ui(IMPLEMENTATION_CLASS_UID)),
            _meta_element(0x0013, b"SH", _VERSION_NAME),
        )
    )
    group_length = _meta_element(0x0000, b"UL", struct.pack("<I", len(body)))
    return b"\x00" * 128 + b"DICM" + group_length + body


@dataclass(frozen=True, slots=True)
class StagedFile:
    """A complete Part-10 file in the staging area, not yet published."""

    path: Path
    key: str  # SHA-256 hex of the data set bytes
    size: int  # bytes of the whole file
    dataset_offset: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)


def _translate(exc: OSError) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return OutOfResourcesError("no space left for originals")
    return exc


class StagedWriter:
    """Write one data set to ``staging/<random>.part`` fragment by fragment.

    ``fsync`` happens in :meth:`finish`, i.e. in the receiving thread, so parallel
    associations overlap their flushes (the journal groups them).
    """

    def __init__(
        self, staging: Path, sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str
    ) -> None:
        self._ids = (sop_class_uid, sop_instance_uid, transfer_syntax_uid)
        self.path = staging / f"{uuid.uuid4().hex}.part"
        self._hash = hashlib.sha256()
        prefix = part10_prefix(sop_class_uid, sop_instance_uid, transfer_syntax_uid)
        self._offset = len(prefix)
        self._size = len(prefix)
        try:
            self._file: BinaryIO | None = self.path.open("wb", buffering=0)
            self._file.write(prefix)
        except OSError as exc:
            self.abort()
            raise _translate(exc) from exc

    def write(self, data: bytes | memoryview) -> None:
        assert self._file is not None
        try:
            self._file.write(data)
        except OSError as exc:
            self.abort()
            raise _translate(exc) from exc
        self._hash.update(data)
        self._size += len(data)

    def finish(self, *, fsync: bool = True) -> StagedFile:
        assert self._file is not None
        try:
            if fsync:
                os.fsync(self._file.fileno())
            self._file.close()
        except OSError as exc:
            self.abort()
            raise _translate(exc) from exc
        self._file = None
        cls, inst, ts = self._ids
        return StagedFile(
            self.path, self._hash.hexdigest(), self._size, self._offset, cls, inst, ts
        )

    def abort(self) -> None:
        """Remove the partial file: nothing half-written is left behind."""
        if getattr(self, "_file", None) is not None:
            with contextlib.suppress(OSError):
                self._file.close()  # type: ignore[union-attr]
        self._file = None
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)


_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"})


def read_file_meta(head: bytes) -> tuple[dict[int, bytes], int]:
    """File Meta elements (PS3.10 7.1, Explicit VR Little Endian) and where the data set
    starts. Parsed by hand: the group length may be absent or wrong in what peers send,
    so elements are read until the group changes."""
    if len(head) < 132 or head[128:132] != b"DICM":
        raise InvalidDatasetError("not a DICOM Part-10 file (no DICM prefix)")
    pos = 132
    found: dict[int, bytes] = {}
    while pos + 8 <= len(head):
        group, elem = struct.unpack_from("<HH", head, pos)
        if group != 0x0002:
            return found, pos
        vr = head[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            if pos + 12 > len(head):
                break
            (length,) = struct.unpack_from("<I", head, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", head, pos + 6)
            start = pos + 8
        if length == 0xFFFFFFFF or start + length > len(head):
            break
        found[elem] = head[start : start + length]
        pos = start + length
    raise InvalidDatasetError("File Meta Information truncated or too long")


class Readable(Protocol):
    """A binary stream: a file, or a view of one part of a STOW-RS body."""

    def read(self, size: int = -1, /) -> bytes: ...


def stage_part10(
    staging: Path, fp: Readable, *, fsync: bool = True, chunk_size: int = 1 << 20
) -> StagedFile:
    """Stage a Part-10 file read from ``fp`` (STOW-RS parts, files on disk).

    Only the data set is kept as it came: the File Meta Information is rewritten
    canonically by :class:`StagedWriter`, so the content key equals the one a C-STORE of
    the same data set gets.

    Raises
    ------
    InvalidDatasetError
        Not a Part-10 file, or its meta lacks the SOP Class/Instance or Transfer Syntax
        UID (PS3.10 7.1 Type 1 elements).
    """
    head = fp.read(65536)
    meta, offset = read_file_meta(head)

    def uid(elem: int, name: str) -> str:
        value = meta.get(elem, b"").rstrip(b"\x00 ").decode("ascii", "replace")
        if not value:
            raise InvalidDatasetError(f"File Meta Information lacks {name}")
        return value

    writer = StagedWriter(
        staging,
        uid(0x0002, "MediaStorageSOPClassUID"),
        uid(0x0003, "MediaStorageSOPInstanceUID"),
        uid(0x0010, "TransferSyntaxUID"),
    )
    try:
        writer.write(memoryview(head)[offset:])
        while chunk := fp.read(chunk_size):
            writer.write(chunk)
    except BaseException:
        writer.abort()
        raise
    return writer.finish(fsync=fsync)
