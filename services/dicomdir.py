"""The DICOMDIR of a file-set (PS3.10 8, PS3.3 F, PS3.11 General Purpose profiles).

Pure: instance headers in, the DICOMDIR's bytes and every file's File ID out, so an
export can stream the DICOMDIR first and the files after it without holding them.

Why not :class:`pydicom.fileset.FileSet`: it writes the instances itself (it stages a
copy of each data set on disk and copies them into the file-set directory), and its
``add`` is quadratic in the number of instances (28 s for 500 header-only CT data
sets here). We need only the DICOMDIR, as bytes, before any file is written. The
record contents still come from pydicom (:data:`pydicom.fileset.DIRECTORY_RECORDERS`,
one recorder per record type of PS3.3 F.5), so RT, SR, presentation state and other
leaf records carry the keys PS3.3 F.5 asks for.

File IDs follow STD-GEN-CD (PS3.11 D.3.2, PS3.10 8.2): at most 8 components, each
of 1-8 characters from ``A-Z 0-9 _``: ``DICOM/PT000000/ST000000/SE000000/IM000000``.
Type 1 record keys an instance lacks (Study ID, Study Date …) are filled with dummy
values in the record only, as DCMTK's ``dcmmkdir --invent`` does.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from io import BytesIO
from typing import Final

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.fileset import DIRECTORY_RECORDERS
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    MediaStorageDirectoryStorage,
    generate_uid,
)

__all__ = ["FileSetMember", "build_dicomdir", "record_type", "slim"]

_FIRST: Final = "OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity"
_LAST: Final = "OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity"
_NEXT: Final = "OffsetOfTheNextDirectoryRecord"
_LOWER: Final = "OffsetOfReferencedLowerLevelDirectoryEntity"

#: Leaf record types by SOP Class (PS3.3 F.5; others are IMAGE).
_LEAF_BY_SOP_CLASS: Final = {
    "1.2.840.10008.5.1.4.1.1.481.2": "RT DOSE",
    "1.2.840.10008.5.1.4.1.1.481.3": "RT STRUCTURE SET",
    "1.2.840.10008.5.1.4.1.1.481.5": "RT PLAN",
    "1.2.840.10008.5.1.4.1.1.481.4": "RT TREAT RECORD",
    "1.2.840.10008.5.1.4.1.1.481.6": "RT TREAT RECORD",
    "1.2.840.10008.5.1.4.1.1.481.7": "RT TREAT RECORD",
    "1.2.840.10008.5.1.4.1.1.481.9": "RT TREAT RECORD",
    "1.2.840.10008.5.1.4.1.1.11.1": "PRESENTATION",
    "1.2.840.10008.5.1.4.1.1.11.2": "PRESENTATION",
    "1.2.840.10008.5.1.4.1.1.11.3": "PRESENTATION",
    "1.2.840.10008.5.1.4.1.1.11.4": "PRESENTATION",
    "1.2.840.10008.5.1.4.1.1.88.11": "SR DOCUMENT",
    "1.2.840.10008.5.1.4.1.1.88.22": "SR DOCUMENT",
    "1.2.840.10008.5.1.4.1.1.88.33": "SR DOCUMENT",
    "1.2.840.10008.5.1.4.1.1.88.34": "SR DOCUMENT",
    "1.2.840.10008.5.1.4.1.1.88.35": "SR DOCUMENT",
    "1.2.840.10008.5.1.4.1.1.88.40": "SR DOCUMENT",
    "1.2.840.10008.5.1.4.1.1.88.50": "SR DOCUMENT",
    "1.2.840.10008.5.1.4.1.1.88.59": "KEY OBJECT DOC",
    "1.2.840.10008.5.1.4.1.1.88.67": "SR DOCUMENT",
    "1.2.840.10008.5.1.4.1.1.88.22.1": "SR DOCUMENT",
    "1.2.840.10008.5.1.4.1.1.104.1": "ENCAP DOC",
    "1.2.840.10008.5.1.4.1.1.104.2": "ENCAP DOC",
    "1.2.840.10008.5.1.4.1.1.4.2": "SPECTROSCOPY",
}

#: Dummies for Type 1 keys missing from an instance (in the record only).
_INVENTED: Final = {
    "PatientID": "UNKNOWN",
    "StudyDate": "19000101",
    "StudyTime": "000000",
    "StudyID": "1",
    "Modality": "OT",
    "SeriesNumber": "1",
    "InstanceNumber": "1",
}


@dataclass(frozen=True, slots=True)
class FileSetMember:
    """One instance on the medium: its header and where it goes (``file_id``)."""

    header: Dataset  # the instance's data set (pixel data not needed)
    file_id: tuple[str, ...]  # components, e.g. ("DICOM", "PT000000", …, "IM000000")
    transfer_syntax_uid: str


@dataclass(slots=True)
class _Node:
    record: Dataset | None  # None: ``encoded`` was written directly (IMAGE leaves)
    children: list[_Node] = field(default_factory=list)
    encoded: bytes = b""


def _element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    """One short Explicit VR Little Endian element (PS3.5 7.1.2), value padded even."""
    if len(value) % 2:
        value += b"\x00" if vr == b"UI" else b" "
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _image_record(header: Dataset, member: FileSetMember, number: int) -> bytes | None:
    """An IMAGE record encoded directly (PS3.3 F.5.18: Instance Number is its only
    key), or None when the instance needs pydicom's general path.

    A series of thousands of images would otherwise cost a pydicom Dataset, a
    recorder call and an encoding each: most of the time a large DICOMDIR takes.
    """
    charset = header.get("SpecificCharacterSet")
    number_value = header.get("InstanceNumber")
    if number_value in (None, ""):
        number_value = number
    parts = [
        _element(0x0004, 0x1400, b"UL", b"\x00\x00\x00\x00"),
        _element(0x0004, 0x1410, b"US", struct.pack("<H", 0xFFFF)),
        _element(0x0004, 0x1420, b"UL", b"\x00\x00\x00\x00"),
        _element(0x0004, 0x1430, b"CS", b"IMAGE"),
        _element(0x0004, 0x1500, b"CS", "\\".join(member.file_id).encode("ascii")),
        _element(0x0004, 0x1510, b"UI", str(header.SOPClassUID).encode("ascii")),
        _element(0x0004, 0x1511, b"UI", str(header.SOPInstanceUID).encode("ascii")),
        _element(0x0004, 0x1512, b"UI", member.transfer_syntax_uid.encode("ascii")),
    ]
    if charset:
        values = charset if isinstance(charset, str) else "\\".join(charset)
        parts.append(_element(0x0008, 0x0005, b"CS", values.encode("ascii")))
    parts.append(_element(0x0020, 0x0013, b"IS", str(number_value).encode("ascii")))
    # (0008,0005) sorts before (0020,0013) and after group 0004: order is by tag.
    encoded = b"".join(parts)
    return encoded if len(encoded) < 0x10000 else None


def record_type(header: Dataset) -> str:
    """The leaf Directory Record Type (0004,1430) of an instance (PS3.3 F.5)."""
    return _LEAF_BY_SOP_CLASS.get(str(header.get("SOPClassUID", "")), "IMAGE")


#: What the PATIENT, STUDY, SERIES and IMAGE records read (PS3.3 F.5.1-F.5.4, F.5.18).
_IMAGE_KEYS: Final = (
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "Modality",
    "StudyDescription",
    "PatientName",
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "StudyID",
    "SeriesNumber",
    "InstanceNumber",
)


def slim(header: Dataset) -> Dataset:
    """The part of an IMAGE instance's header its records need; other leaf types
    (SR, presentation states, RT …) keep the whole header for their recorders.

    A plan holds one header per instance until the DICOMDIR is built: a study of
    tens of thousands of images would otherwise hold every full header at once.
    """
    if record_type(header) != "IMAGE":
        return header
    out = Dataset()
    for keyword in _IMAGE_KEYS:
        if keyword in header:
            out[keyword] = header[keyword]
    return out


def _filled(header: Dataset, number: int) -> Dataset:
    """A copy of ``header``'s elements with the Type 1 gaps filled (for the recorders)."""
    ds = Dataset()
    for tag in header.keys():  # noqa: SIM118 (iterating a Dataset converts elements)
        if tag.group not in (0x0002, 0x7FE0) and not tag.is_private:
            ds[tag] = header[tag]
    for keyword, dummy in _INVENTED.items():
        if ds.get(keyword) in (None, ""):
            if keyword in ds:
                del ds[keyword]  # the element is the header's: never change it
            value = str(number) if keyword == "InstanceNumber" else dummy
            setattr(ds, keyword, value)
    return ds


def _record(kind: str, header: Dataset, number: int) -> Dataset:
    record = Dataset()
    setattr(record, _NEXT, 0)
    record.RecordInUseFlag = 0xFFFF
    setattr(record, _LOWER, 0)
    record.DirectoryRecordType = kind
    try:
        # The recorders read only their keys (no copy of the whole header) …
        body = DIRECTORY_RECORDERS[kind](header)
    except (KeyError, ValueError):
        # … and refuse a missing or empty Type 1 key: fill it (dcmmkdir --invent).
        body = DIRECTORY_RECORDERS[kind](_filled(header, number))
    # The recorders copy the character set only for some records; the records hold
    # names and descriptions, so each says how it is encoded.
    if "SpecificCharacterSet" in header:
        record.SpecificCharacterSet = header.SpecificCharacterSet
    record.update(body)
    return record


def _tree(members: Sequence[FileSetMember]) -> list[_Node]:
    patients: dict[str, _Node] = {}
    studies: dict[str, _Node] = {}
    series: dict[str, _Node] = {}
    for number, member in enumerate(members, start=1):
        ds = member.header
        pkey = str(ds.get("PatientID", "") or "")
        if pkey not in patients:
            patients[pkey] = _Node(_record("PATIENT", ds, number))
        skey = str(ds.StudyInstanceUID)
        if skey not in studies:
            studies[skey] = _Node(_record("STUDY", ds, number))
            patients[pkey].children.append(studies[skey])
        sekey = str(ds.SeriesInstanceUID)
        if sekey not in series:
            series[sekey] = _Node(_record("SERIES", ds, number))
            studies[skey].children.append(series[sekey])
        kind = record_type(ds)
        fast = _image_record(ds, member, number) if kind == "IMAGE" else None
        if fast is not None:
            series[sekey].children.append(_Node(None, encoded=fast))
            continue
        leaf = _record(kind, ds, number)
        leaf.ReferencedFileID = list(member.file_id)
        leaf.ReferencedSOPClassUIDInFile = ds.SOPClassUID
        leaf.ReferencedSOPInstanceUIDInFile = ds.SOPInstanceUID
        leaf.ReferencedTransferSyntaxUIDInFile = member.transfer_syntax_uid
        series[sekey].children.append(_Node(leaf))
    return list(patients.values())


def _encode(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_dataset(fp, ds)
    return fp.getvalue()


#: Where the two offsets sit in an encoded record: (0004,1400) UL, (0004,1410) US and
#: (0004,1420) UL are its first three elements (lowest tags), 12 + 10 + 12 bytes in
#: Explicit VR Little Endian; each value is the last 4 bytes of its element.
_NEXT_AT: Final = 8
_LOWER_AT: Final = 12 + 10 + 8


def build_dicomdir(members: Sequence[FileSetMember], *, file_set_id: str = "") -> bytes:
    """The DICOMDIR file (PS3.10 7.1 file with the Basic Directory IOD, PS3.3 F.3).

    Records are in depth-first order (patient, its studies, each study's series, each
    series' instances); (0004,1400) links siblings, (0004,1420) a record to its first
    child, both as byte offsets from the first byte of the file (the preamble), as
    PS3.3 F.3.2.2 defines them. Explicit VR Little Endian, as PS3.11 requires.
    """
    roots = _tree(members)
    order: list[_Node] = []

    def flatten(nodes: list[_Node]) -> None:
        for node in nodes:
            order.append(node)
            flatten(node.children)

    flatten(roots)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MediaStorageDirectoryStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    head = DicomBytesIO()
    head.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(head, meta, enforce_standard=True)

    top = Dataset()
    top.FileSetID = file_set_id
    setattr(top, _FIRST, 0)
    setattr(top, _LAST, 0)
    top.FileSetConsistencyFlag = 0x0000
    top_len = len(_encode(top))
    sq_header = 12  # (0004,1220) tag, "SQ", 2 reserved bytes, 32-bit length
    first_item = len(head.getvalue()) + top_len + sq_header

    # Offsets are fixed-length UL values: records are encoded once with zeros and
    # the offsets patched in (encoding is the costly part for thousands of records).
    encoded = [
        bytearray(_encode(node.record) if node.record is not None else node.encoded)
        for node in order
    ]
    for item in encoded:
        assert item[:4] == b"\x04\x00\x00\x14" and item[22:26] == b"\x04\x00\x20\x14"
    offsets: dict[int, int] = {}
    position = first_item
    for node, item in zip(order, encoded, strict=True):
        offsets[id(node)] = position
        position += 8 + len(item)  # item tag + 32-bit length, then the record
    slot = {id(node): item for node, item in zip(order, encoded, strict=True)}

    def link(nodes: list[_Node]) -> None:
        for i, node in enumerate(nodes):
            after = nodes[i + 1] if i + 1 < len(nodes) else None
            item = slot[id(node)]
            struct.pack_into("<I", item, _NEXT_AT, offsets[id(after)] if after else 0)
            lower = offsets[id(node.children[0])] if node.children else 0
            struct.pack_into("<I", item, _LOWER_AT, lower)
            link(node.children)

    link(roots)
    if roots:
        setattr(top, _FIRST, offsets[id(roots[0])])
        setattr(top, _LAST, offsets[id(roots[-1])])

    out = BytesIO()
    out.write(head.getvalue())
    out.write(_encode(top))
    total = sum(8 + len(item) for item in encoded)
    out.write(struct.pack("<HH2sHI", 0x0004, 0x1220, b"SQ", 0, total))
    for item in encoded:
        out.write(struct.pack("<HHI", 0xFFFE, 0xE000, len(item)))
        out.write(item)
    return out.getvalue()
