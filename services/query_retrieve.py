"""Query/Retrieve use cases (PS3.4 Annex C): C-FIND answered from the index, C-MOVE/C-GET plans.

Pure parts (:func:`parse_find`, :func:`find_response`, :func:`parse_retrieve`) turn
identifiers into :class:`storage.index.queries.Query` values and index rows into
response identifiers; :class:`QueryRetrieveService` runs them against the index and
the original store. No file is read to answer a C-FIND: every value comes from the
index, and a requested key the index does not hold is returned empty (zero length),
never guessed (PS3.4 C.4.1.1.3.2).

Matching (PS3.4 C.2.2.2) is :mod:`storage.index.queries`: single value, wildcard
``*``/``?``, DA/TM ranges, list of UIDs, universal matching. Matching keys the index
cannot match on (optional keys, non-empty sequence items) are not applied and the
pending responses say so with 0xFF01 (PS3.4 C.4.1.1.4).

Text in identifiers is decoded by pydicom with the request's Specific Character Set
(PS3.5 6.1); the index holds Unicode, so a response declares the request's character
set when every value fits in it, and ISO_IR 192 (UTF-8) otherwise.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Any, Literal, Protocol

from pydicom import dcmread
from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset, read_preamble
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag
from pydicom.uid import UID

from core.audit import AuditEntry, patient_key
from core.coercion import (
    PatientAttributes,
    coerce_patient_module,
    patient_attributes_from_row,
    patient_differences,
)
from core.errors import InvalidQueryError, NotFoundError, OutOfResourcesError
from core.logging import correlation_id
from storage.abc import OriginalStore
from storage.audit import AuditLog
from storage.index.queries import ATTRIBUTES, Level, Match, Query, parse_match

__all__ = [
    "FIND_MODELS",
    "GET_MODELS",
    "MOVE_MODELS",
    "EncodedInstance",
    "FindRequest",
    "QueryIndex",
    "QueryRetrieveService",
    "RetrieveItem",
    "find_response",
    "parse_find",
    "parse_retrieve",
]

logger = logging.getLogger(__name__)

Model = Literal["patient", "study"]

#: Information models by SOP Class UID (PS3.4 C.6.1.3, C.6.2.3; PS3.6 Table A-1).
FIND_MODELS: Mapping[str, Model] = {
    "1.2.840.10008.5.1.4.1.2.1.1": "patient",
    "1.2.840.10008.5.1.4.1.2.2.1": "study",
}
MOVE_MODELS: Mapping[str, Model] = {
    "1.2.840.10008.5.1.4.1.2.1.2": "patient",
    "1.2.840.10008.5.1.4.1.2.2.2": "study",
}
GET_MODELS: Mapping[str, Model] = {
    "1.2.840.10008.5.1.4.1.2.1.3": "patient",
    "1.2.840.10008.5.1.4.1.2.2.3": "study",
}

_LEVELS: Mapping[str, Level] = {
    "PATIENT": "patient",
    "STUDY": "study",
    "SERIES": "series",
    "IMAGE": "instance",
}
_LEVEL_NAMES = {v: k for k, v in _LEVELS.items()}
_DEPTH: Mapping[str, int] = {"patient": 0, "study": 1, "series": 2, "instance": 3}

#: Unique keys of each level (PS3.4 C.6.1.1.2-5, C.6.2.1.2-4).
_UNIQUE: Mapping[str, str] = {
    "patient": "PatientID",
    "study": "StudyInstanceUID",
    "series": "SeriesInstanceUID",
    "instance": "SOPInstanceUID",
}

#: Keys that are returned, never matched (PS3.4 C.4.1.1.3 "return keys" of the
#: service itself, and the identifier's own control attributes).
_CONTROL = frozenset(
    {
        "QueryRetrieveLevel",
        "SpecificCharacterSet",
        "RetrieveAETitle",
        "InstanceAvailability",
        "TimezoneOffsetFromUTC",
        "QueryRetrieveView",
    }
)
_TEXT_VRS = frozenset({"PN", "LO", "SH", "LT", "ST", "UT", "UC"})
_INT_VRS = frozenset({"IS", "US", "UL", "SS", "SL"})
_MAX_KEYS = 256


class QueryIndex(Protocol):
    """What Query/Retrieve needs of the index (:class:`storage.index.sql.SqlIndex`)."""

    def find(self, query: Query) -> list[dict[str, Any]]: ...


@dataclass(frozen=True, slots=True)
class RequestedKey:
    """One element of a C-FIND identifier: returned in every response."""

    tag: int
    keyword: str
    vr: str


@dataclass(frozen=True, slots=True)
class FindRequest:
    """A parsed C-FIND identifier (PS3.4 C.4.1.1.3)."""

    model: Model
    level: Level
    query: Query
    keys: tuple[RequestedKey, ...]
    #: Matching keys we could not apply (returned empty, pending status 0xFF01).
    unsupported: tuple[str, ...]
    #: The request's Specific Character Set (empty: the default repertoire).
    charset: tuple[str, ...]


def _level(identifier: Dataset, model: Model) -> Level:
    raw = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    level = _LEVELS.get(raw)
    if level is None:
        raise InvalidQueryError("QueryRetrieveLevel must be PATIENT, STUDY, SERIES or IMAGE")
    if model == "study" and level == "patient":
        # PS3.4 C.6.2.1: the Study Root model has no PATIENT level.
        raise InvalidQueryError("PATIENT level is not part of the Study Root model")
    return level


def _element_value(keyword: str, vr: str, value: Any) -> str:
    """An identifier value as a DICOM matching string (multiple values joined by ``\\``)."""
    if value is None:
        return ""
    if isinstance(value, (list, MultiValue)):
        items = [str(v) for v in value]
        if len(items) > 1 and vr not in ("UI", "CS"):
            # Only UIDs (C.2.2.2.2) and code strings have list matching.
            raise InvalidQueryError(f"{keyword} has several values")
        return "\\".join(items)
    if isinstance(value, bytes):
        if not value:
            return ""  # an empty binary key asks for the value back (C.2.2.2.3)
        raise InvalidQueryError(f"matching on {keyword} is not supported")
    return str(value).strip()


def _charset(identifier: Dataset) -> tuple[str, ...]:
    raw = identifier.get("SpecificCharacterSet", "")
    if not raw:
        return ()
    values = [str(v) for v in raw] if isinstance(raw, (list, MultiValue)) else [str(raw)]
    return tuple(v.strip() for v in values)


def parse_find(identifier: Dataset, model: Model, *, limit: int | None = None) -> FindRequest:
    """Parse a C-FIND identifier of the Patient or Study Root model.

    Raises :class:`InvalidQueryError` (0xA900) for a missing or wrong level, a
    matching value on a key below the query level (PS3.4 C.4.1.2.2.1 hierarchical
    search), or a malformed value (a date range that is not one).
    """
    level = _level(identifier, model)
    depth = _DEPTH[level]
    keys: list[RequestedKey] = []
    matches: list[Match] = []
    unsupported: list[str] = []
    fields: set[str] = set()
    if len(identifier) > _MAX_KEYS:
        raise InvalidQueryError("too many keys in the identifier")
    for elem in identifier:
        if elem.tag.group in (0x0000, 0x0002) or elem.tag.is_private:
            continue
        keyword = elem.keyword or keyword_for_tag(elem.tag) or ""
        vr = str(elem.VR)
        keys.append(RequestedKey(int(elem.tag), keyword, vr))
        if keyword in _CONTROL:
            continue
        attr = ATTRIBUTES.get(keyword)
        if vr == "SQ":
            items = elem.value or []
            if any(any(not _empty(e.value) for e in item) for item in items):
                unsupported.append(keyword)  # sequence matching: nothing indexed
            continue
        value = _element_value(keyword, vr, elem.value)
        if attr is None:
            if value not in ("", "*"):
                unsupported.append(keyword or f"{int(elem.tag):08X}")
            continue
        if _DEPTH[attr.level] > depth:
            if value not in ("", "*"):
                raise InvalidQueryError(
                    f"{keyword} is a {_LEVEL_NAMES[attr.level]}-level key, "
                    f"the query is at {_LEVEL_NAMES[level]} level"
                )
            continue
        if attr.derived:
            fields.add(keyword)
            if value not in ("", "*") and keyword != "ModalitiesInStudy":
                unsupported.append(keyword)  # counts are returned, not matched
                continue
        if value in ("", "*"):
            continue
        matches.append(parse_match(keyword, value))
    if level == "instance" and any(
        k.keyword not in ATTRIBUTES and k.keyword not in _CONTROL for k in keys
    ):
        # Other image-level keys are returned from the DICOM JSON the index keeps for
        # each instance (filled by its instance job), still without reading a file.
        fields.add("metadata_json")
    query = Query(
        level=level,
        matches=tuple(matches),
        fields=frozenset(fields),
        limit=None if limit is None else limit + 1,
    )
    return FindRequest(model, level, query, tuple(keys), tuple(unsupported), _charset(identifier))


def _empty(value: Any) -> bool:
    return value is None or value == "" or value == [] or (
        isinstance(value, (list, MultiValue, DicomSequence)) and len(value) == 0
    )


def _codec(charset: tuple[str, ...]) -> str | None:
    """The Python codec of a single-byte or UTF-8 character set, else None."""
    if len(charset) != 1:
        return None
    try:
        codecs = convert_encodings(list(charset))
    except Exception:
        return None
    return codecs[0] if len(codecs) == 1 else None


def _response_charset(request: tuple[str, ...], texts: Sequence[str]) -> list[str] | None:
    """PS3.5 6.1.2.5: declare a set every text value of the response is written in."""
    if all(t.isascii() for t in texts):
        return list(request) if request else None
    codec = _codec(request) if request else None
    if codec is not None:
        try:
            for t in texts:
                t.encode(codec)
            return list(request)
        except (UnicodeEncodeError, LookupError):
            pass
    return ["ISO_IR 192"]


def _typed(vr: str, value: Any) -> Any:
    if value is None or value == "":
        return None
    if vr in ("US", "UL", "SS", "SL"):
        return int(value)
    if vr == "IS":
        return str(int(value))
    return str(value)


def find_response(request: FindRequest, row: Mapping[str, Any], *, retrieve_ae: str) -> Dataset:
    """The pending identifier for one index row (PS3.4 C.4.1.1.3.2).

    Every requested key is returned: with the index's value, or empty when the index
    does not hold it. The unique keys of the query level and above are always
    returned (PS3.4 C.4.1.2.2.1), and Retrieve AE Title says where to C-MOVE from.
    """
    ds = Dataset()
    texts: list[str] = []
    wanted: dict[str, RequestedKey] = {k.keyword: k for k in request.keys if k.keyword}
    depth = _DEPTH[request.level]
    for level, unique in _UNIQUE.items():
        if _DEPTH[level] <= depth and (level != "patient" or request.model == "patient"):
            wanted.setdefault(unique, RequestedKey(0, unique, ATTRIBUTES[unique].vr))
    stored = _stored_header(request, row)
    for key in request.keys:
        if not key.keyword:
            # An unknown (retired or private) tag: returned zero length.
            ds.add_new(key.tag, key.vr if key.vr != "UN" else "UN", None)
    for keyword, key in wanted.items():
        if keyword in ("SpecificCharacterSet",):
            continue
        if keyword == "QueryRetrieveLevel":
            continue
        if keyword == "RetrieveAETitle":
            ds.RetrieveAETitle = retrieve_ae
            continue
        if keyword == "InstanceAvailability":
            ds.InstanceAvailability = "ONLINE"
            continue
        vr = key.vr if key.vr and key.vr != "UN" else dictionary_VR(keyword)
        attr = ATTRIBUTES.get(keyword)
        if attr is None and key.tag in stored:
            elem = stored[key.tag]
            ds.add(elem)
            if isinstance(elem.value, str) and elem.VR in _TEXT_VRS:
                texts.append(elem.value)
            elif elem.VR == "PN" and elem.value is not None:
                texts.append(str(elem.value))
            continue
        if attr is None and vr != "SQ":
            # Not held by the index: zero length, in a VR the encoder can write
            # ("OB or OW" of the dictionary is not one).
            tag = key.tag or tag_for_keyword(keyword)
            if tag is not None:
                ds.add_new(tag, vr.split(" or ")[0], None)
                continue
        value = row.get(keyword) if attr is not None and _DEPTH[attr.level] <= depth else None
        if attr is not None and attr.derived and keyword not in row:
            value = None
        if vr == "SQ":
            setattr(ds, keyword, DicomSequence([]))
            continue
        if keyword == "ModalitiesInStudy" and value:
            items = sorted(v for v in str(value).split("\\") if v)
            setattr(ds, keyword, items if len(items) > 1 else items[0])
            continue
        typed = _typed(attr.vr if attr is not None else vr, value)
        if isinstance(typed, str) and vr in _TEXT_VRS:
            texts.append(typed)
        try:
            setattr(ds, keyword, typed)
        except (ValueError, TypeError):
            setattr(ds, keyword, None)
    ds.QueryRetrieveLevel = _LEVEL_NAMES[request.level]
    ds.RetrieveAETitle = retrieve_ae
    charset = _response_charset(request.charset, texts)
    if charset is not None:
        ds.SpecificCharacterSet = charset if len(charset) > 1 else charset[0]
    return ds


def _stored_header(request: FindRequest, row: Mapping[str, Any]) -> Dataset:
    """The requested non-index keys found in the row's DICOM JSON (PS3.18 F.2).

    Bulk data (an empty ``BulkDataURI``) and undecodable values are left out: those
    keys are returned empty, as for any key the index does not hold.
    """
    raw = row.get("metadata_json")
    if not raw or raw == "{}":
        return Dataset()
    try:
        header = json.loads(raw)
    except ValueError:
        return Dataset()
    wanted = {}
    for key in request.keys:
        if not key.keyword or key.keyword in ATTRIBUTES or key.keyword in _CONTROL:
            continue
        elem = header.get(f"{key.tag:08X}")
        if isinstance(elem, dict) and "BulkDataURI" not in elem and "InlineBinary" not in elem:
            wanted[f"{key.tag:08X}"] = elem
    if not wanted:
        return Dataset()
    try:
        return Dataset.from_json(wanted)
    except Exception:
        logger.warning("stored DICOM JSON of an instance could not be read back")
        return Dataset()


# -- retrieve ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetrieveItem:
    """One instance to send as a C-STORE sub-operation (PS3.4 C.4.2.1.4, C.4.3.1.4)."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    blob_key: str
    study_instance_uid: str
    patient_id: str
    #: The patient as the index holds it now (issue 17): sent instead of the stored
    #: values when they differ, recorded in Original Attributes Sequence.
    patient: PatientAttributes | None = None


@dataclass(frozen=True, slots=True)
class EncodedInstance:
    """A stored instance to send as it is: its data set as encoded in the original
    (after the File Meta Information, PS3.10 7.1), in its stored transfer syntax."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    data_set: bytes


def _past_patient_module(tag: BaseTag, vr: str | None, length: int) -> bool:
    return int(tag) > 0x0010FFFF


def _past_file_meta(tag: BaseTag, vr: str | None, length: int) -> bool:
    return int(tag.group) != 0x0002


def parse_retrieve(identifier: Dataset, model: Model) -> Query:
    """The instance-level query of a C-MOVE/C-GET identifier (PS3.4 C.4.2.2.1).

    Only unique keys identify what to retrieve: the level's own (a list of UIDs is
    allowed at STUDY, SERIES and IMAGE levels) and those above it. A retrieve without
    the unique key of its level is refused (0xA900), never widened to everything.
    """
    level = _level(identifier, model)
    depth = _DEPTH[level]
    matches: list[Match] = []
    for lvl, keyword in _UNIQUE.items():
        if _DEPTH[lvl] > depth:
            break
        if lvl == "patient" and model == "study":
            continue
        value = _element_value(keyword, ATTRIBUTES[keyword].vr, identifier.get(keyword, ""))
        if value in ("", "*") or "*" in value or "?" in value:
            if lvl == level:
                raise InvalidQueryError(f"{_LEVEL_NAMES[level]} retrieve needs {keyword}")
            continue  # hierarchical: an upper key may be left out (relational SCUs)
        if keyword == "PatientID" and "\\" in value:
            raise InvalidQueryError("PatientID must be a single value")
        matches.append(parse_match(keyword, value))
    return Query(level="instance", matches=tuple(matches))


class QueryRetrieveService:
    """C-FIND, C-MOVE and C-GET use cases over the index and the original store.

    Parameters
    ----------
    index
        Where queries run (:class:`storage.index.sql.SqlIndex`).
    originals
        Where the stored Part-10 files are (local or object storage).
    ae_title
        Our AE title, returned as Retrieve AE Title.
    max_find_results, max_retrieve_instances
        Caps of one request.
    """

    def __init__(
        self,
        index: QueryIndex,
        originals: OriginalStore,
        *,
        ae_title: str,
        max_find_results: int = 10_000,
        max_retrieve_instances: int = 65_535,
        audit: AuditLog | None = None,
        patient_secret: bytes = b"",
    ) -> None:
        self.audit = audit
        self.patient_secret = patient_secret
        self.index = index
        self.originals = originals
        self.ae_title = ae_title
        self.max_find_results = max_find_results
        self.max_retrieve_instances = max_retrieve_instances

    def parse_find(self, identifier: Dataset, model: Model) -> FindRequest:
        return parse_find(identifier, model, limit=self.max_find_results)

    def find(self, request: FindRequest) -> Iterator[Dataset]:
        """Response identifiers, one per match; raises :class:`OutOfResourcesError`
        (0xA700, after the cap's worth) when there are more than ``max_find_results``."""
        rows = self.index.find(request.query)
        for n, row in enumerate(rows):
            if n >= self.max_find_results:
                raise OutOfResourcesError("Too many matches; narrow the query")
            yield find_response(request, row, retrieve_ae=self.ae_title)

    def plan_retrieve(self, identifier: Dataset, model: Model) -> list[RetrieveItem]:
        """The current instances a C-MOVE/C-GET names, in series and instance order."""
        query = parse_retrieve(identifier, model)
        limited = Query(
            level=query.level, matches=query.matches, limit=self.max_retrieve_instances + 1
        )
        rows = self.index.find(limited)
        if len(rows) > self.max_retrieve_instances:
            raise OutOfResourcesError(
                f"more than {self.max_retrieve_instances} instances; retrieve by series"
            )
        return [
            RetrieveItem(
                sop_instance_uid=str(r["SOPInstanceUID"]),
                sop_class_uid=str(r["SOPClassUID"]),
                transfer_syntax_uid=str(r["AvailableTransferSyntaxUID"]),
                blob_key=str(r["blob_key"]),
                study_instance_uid=str(r["StudyInstanceUID"]),
                patient_id=str(r.get("PatientID", "") or ""),
                patient=patient_attributes_from_row(r),
            )
            for r in rows
        ]

    def load(self, item: RetrieveItem) -> Dataset:
        """The stored instance as a pydicom Dataset (file meta included)."""
        try:
            with self.originals.open(item.blob_key) as fp:
                ds = dcmread(fp)
        except FileNotFoundError as exc:
            raise NotFoundError(f"original of {item.sop_instance_uid} is missing") from exc
        if item.patient is not None:
            coerce_patient_module(ds, item.patient)  # the original file is untouched
        return ds

    def encoded(self, item: RetrieveItem) -> EncodedInstance | None:
        """The stored data set as it is, when it can be sent without re-encoding.

        That is when its Patient module is the index's (nothing to coerce, issue 17)
        and its transfer syntax is not deflated; otherwise None, and the sender uses
        :meth:`load`. Only the File Meta Information and the elements up to the
        Patient module are parsed (a C-MOVE of a CT spent most of its time decoding
        and re-encoding whole data sets, pixel data included).
        """
        try:
            with self.originals.open(item.blob_key) as fp:
                raw = fp.read()
        except FileNotFoundError as exc:
            raise NotFoundError(f"original of {item.sop_instance_uid} is missing") from exc
        buf = BytesIO(raw)
        try:
            read_preamble(buf, False)
            meta = read_dataset(
                buf, is_implicit_VR=False, is_little_endian=True, stop_when=_past_file_meta
            )
            offset = buf.tell()
            syntax = UID(str(meta.get("TransferSyntaxUID", "") or ""))
            if not syntax or syntax.is_deflated or not syntax.is_transfer_syntax:
                return None
            if item.patient is not None:
                header = read_dataset(
                    buf,
                    is_implicit_VR=syntax.is_implicit_VR,
                    is_little_endian=syntax.is_little_endian,
                    stop_when=_past_patient_module,
                )
                if patient_differences(header, item.patient):
                    return None
        except Exception:
            # Not readable this way: the sender falls back to load(), which reports.
            return None
        return EncodedInstance(
            sop_class_uid=item.sop_class_uid,
            sop_instance_uid=item.sop_instance_uid,
            transfer_syntax_uid=str(syntax),
            data_set=raw[offset:],
        )


    def record_retrieve(
        self,
        kind: Literal["move", "get"],
        *,
        calling_ae: str,
        address: str,
        destination: str,
        items: Sequence[RetrieveItem],
    ) -> None:
        """One action-log entry per study sent: who moved what where (PS3.15 A.5.3.2
        Begin Transferring DICOM Instances). A side effect: logs and carries on."""
        if self.audit is None:
            return
        try:
            by_study: dict[str, list[RetrieveItem]] = {}
            for item in items:
                by_study.setdefault(item.study_instance_uid, []).append(item)
            for study, sent in by_study.items():
                self.audit.record(
                    AuditEntry(
                        action="R",
                        event_type=f"dicom.{kind}-send",
                        outcome="0",
                        agent=calling_ae[:128],
                        agent_type="ae",
                        source=address[:64],
                        resource=f"Study/{study}"[:256],
                        patient_key=patient_key(self.patient_secret, sent[0].patient_id)
                        if self.patient_secret
                        else "",
                        correlation_id=correlation_id.get()[:32],
                        detail=AuditEntry.details(
                            {"destination": destination, "instances": len(sent)}
                        ),
                    )
                )
        except Exception:
            logger.error("retrieve not recorded in the action log", exc_info=True)
