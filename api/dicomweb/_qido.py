"""QIDO-RS requests and responses (PS3.18 8.3.4, 10.6), pure.

:func:`parse_search` turns query parameters into a :class:`storage.index.queries.Query`
plus the attributes to return; :func:`qido_json` renders an index row as DICOM JSON
(PS3.18 F.2) with the required return attributes of PS3.18 Tables 10.6.1-5 (study),
10.6.1-6 (series) and 10.6.1-7 (instance). Names in the index are decoded text, so
responses declare ISO_IR 192 (DICOM JSON is UTF-8, PS3.18 F.2).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from core.errors import InvalidQueryError
from storage.index.queries import ATTRIBUTES, Level, Match, Query, parse_match

__all__ = ["Search", "fill_bulkdata_uris", "parse_search", "qido_json", "retrieve_url"]

#: ``after`` is ours (not PS3.18): the keyset continuation of a study search, which
#: the ``next`` Link carries; ``offset`` keeps working as PS3.18 8.3.4.4 defines it.
_RESERVED = frozenset({"limit", "offset", "fuzzymatching", "includefield", "after"})
_UID = re.compile(r"[0-9.]{1,64}")
MAX_LIMIT = 10_000
#: Results per response when the client gives no ``limit`` (PS3.18 8.3.4.4 lets the
#: server return a subset and say so): every returned study costs a few per-study
#: reads, and an archive holds tens of thousands (issue 21).
DEFAULT_LIMIT = 100

# Required return attributes, by level (PS3.18 Tables 10.6.1-5/6/7).
_STUDY_RETURN = (
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ModalitiesInStudy",
    "ReferringPhysicianName",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "StudyDescription",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
_SERIES_RETURN = (
    "Modality",
    "SeriesDescription",
    "SeriesInstanceUID",
    "SeriesNumber",
    "NumberOfSeriesRelatedInstances",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
)
_INSTANCE_RETURN = (
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceNumber",
    "Rows",
    "Columns",
    "BitsAllocated",
    "NumberOfFrames",
)
# Of a study's attributes, those returned with series/instances outside a study
# (PS3.18 10.6.3.3.2 / 10.6.3.3.3): the plain ones, not its aggregates.
_STUDY_PLAIN = tuple(
    k for k in _STUDY_RETURN if not k.startswith("NumberOf") and k != "ModalitiesInStudy"
)

_HEX_TAG = re.compile(r"[0-9A-Fa-f]{8}")
_LEVEL_DEPTH = {"patient": 0, "study": 1, "series": 2, "instance": 3}


@dataclass(frozen=True, slots=True)
class Search:
    """A parsed QIDO-RS request: the index query and what to return."""

    query: Query
    keywords: tuple[str, ...]  # index attributes to return, in tag order
    extra_tags: tuple[str, ...]  # other tags asked for (instance level: from metadata)
    ignored: tuple[str, ...]  # matching keys we do not support (Warning header)


def _keyword(name: str) -> tuple[str, str]:
    """``(keyword, tag)`` of a parameter given as keyword or 8-digit tag."""
    if _HEX_TAG.fullmatch(name):
        tag = name.upper()
        keyword = keyword_for_tag(int(tag, 16)) or ""
        return keyword, tag
    tag_int = tag_for_keyword(name)
    if tag_int is None:
        raise InvalidQueryError(f"unknown attribute {name!r}")
    return name, f"{tag_int:08X}"


def _int_param(params: Mapping[str, str], name: str) -> int | None:
    if name not in params:
        return None
    try:
        value = int(params[name])
    except ValueError as exc:
        raise InvalidQueryError(f"{name} must be a non-negative integer") from exc
    if value < 0:
        raise InvalidQueryError(f"{name} must be a non-negative integer")
    if value > 2**31 - 1:  # beyond any result set; SQL integers are 64-bit at most
        raise InvalidQueryError(f"{name} must not exceed {2**31 - 1}")
    return value


def parse_search(
    level: Level,
    items: Sequence[tuple[str, str]],
    *,
    context: Mapping[str, str] | None = None,
) -> Search:
    """Parse QIDO-RS query parameters for a search at ``level``.

    ``context`` holds the UIDs of the resource path (``/studies/{uid}/series``).
    """
    params = {k: v for k, v in items if k in _RESERVED and k != "includefield"}
    fuzzy_raw = params.get("fuzzymatching", "false").lower()
    if fuzzy_raw not in ("true", "false"):
        raise InvalidQueryError("fuzzymatching must be true or false")
    limit = _int_param(params, "limit")
    offset = _int_param(params, "offset") or 0
    after = params.get("after")
    if after is not None and (level != "study" or not _UID.fullmatch(after)):
        raise InvalidQueryError("after is the StudyInstanceUID a study search pages after")
    depth = _LEVEL_DEPTH[level]

    matches: list[Match] = [Match(k, v) for k, v in (context or {}).items()]
    ignored: list[str] = []
    for name, value in items:
        if name in _RESERVED:
            continue
        if "." in name:
            ignored.append(name)  # sequence matching (PS3.18 8.3.4.1) is not supported
            continue
        keyword, _tag = _keyword(name)
        attr = ATTRIBUTES.get(keyword)
        if attr is None:
            ignored.append(name)
            continue
        if _LEVEL_DEPTH[attr.level] > depth:
            raise InvalidQueryError(f"{keyword} is not a {level}-level attribute")
        if keyword in ("NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances") or (
            keyword == "NumberOfSeriesRelatedInstances"
        ):
            ignored.append(name)
            continue
        matches.append(parse_match(keyword, value))

    wanted: set[str] = set()
    extra: list[str] = []
    include_all = False
    for name, value in items:
        if name != "includefield":
            continue
        for field in (f.strip() for f in value.split(",")):
            if not field:
                continue
            if field == "all":
                include_all = True
                continue
            keyword, tag = _keyword(field)
            if keyword in ATTRIBUTES:
                if _LEVEL_DEPTH[ATTRIBUTES[keyword].level] <= depth:
                    wanted.add(keyword)
            else:
                extra.append(tag)

    returned = set(_defaults(level, context or {})) | wanted | {m.keyword for m in matches}
    if include_all:
        returned |= {k for k, a in ATTRIBUTES.items() if _LEVEL_DEPTH[a.level] <= depth}
        if depth > 1:
            returned.discard("ModalitiesInStudy")
            returned.discard("NumberOfStudyRelatedSeries")
            returned.discard("NumberOfStudyRelatedInstances")
            returned |= {k for k in wanted if k.startswith("NumberOfStudy")}
            returned |= {k for k in wanted if k == "ModalitiesInStudy"}
    keywords = tuple(sorted(returned, key=lambda k: ATTRIBUTES[k].tag))
    fields = frozenset(keywords) | (
        {"metadata_json"} if extra and level == "instance" else frozenset()
    )
    query = Query(
        level=level,
        matches=tuple(matches),
        fuzzy=fuzzy_raw == "true",
        fields=frozenset(fields),
        limit=min(limit, MAX_LIMIT) if limit is not None else DEFAULT_LIMIT,
        offset=offset,
        after=after,
    )
    return Search(query, keywords, tuple(extra), tuple(ignored))


def _defaults(level: Level, context: Mapping[str, str]) -> tuple[str, ...]:
    if level == "study":
        return _STUDY_RETURN
    if level == "series":
        series_base: tuple[str, ...] = (*_SERIES_RETURN, "StudyInstanceUID")
        if "StudyInstanceUID" in context:
            return series_base
        return (*series_base, *_STUDY_PLAIN)
    base: tuple[str, ...] = (*_INSTANCE_RETURN, "StudyInstanceUID", "SeriesInstanceUID")
    if "SeriesInstanceUID" in context:
        return base
    if "StudyInstanceUID" in context:
        return base + _SERIES_RETURN[:4]
    return base + _SERIES_RETURN[:4] + _STUDY_PLAIN


def _pn(value: str) -> list[dict[str, str]]:
    groups = value.split("=")
    names = ("Alphabetic", "Ideographic", "Phonetic")
    return [{n: g for n, g in zip(names, groups, strict=False) if g}]


def _element(vr: str, value: Any) -> dict[str, Any]:
    if value is None or value == "":
        return {"vr": vr}
    if vr == "PN":
        return {"vr": vr, "Value": _pn(str(value))}
    if vr in ("IS", "US", "UL", "SS", "SL"):
        return {"vr": vr, "Value": [int(value)]}
    if vr in ("CS", "UI") and "\\" in str(value):
        return {"vr": vr, "Value": [v for v in str(value).split("\\") if v]}
    return {"vr": vr, "Value": [str(value)]}


def retrieve_url(base: str, row: Mapping[str, Any], level: Level) -> str:
    """The WADO-RS URL of a result (RetrieveURL, PS3.18 10.6.3.3)."""
    url = f"{base}/studies/{row['StudyInstanceUID']}"
    if level in ("series", "instance"):
        url += f"/series/{row['SeriesInstanceUID']}"
    if level == "instance":
        url += f"/instances/{row['SOPInstanceUID']}"
    return url


def qido_json(row: Mapping[str, Any], search: Search, base: str) -> dict[str, Any]:
    """One QIDO-RS result as a DICOM JSON object (PS3.18 F.2)."""
    level = search.query.level
    out: dict[str, Any] = {"00080005": {"vr": "CS", "Value": ["ISO_IR 192"]}}
    for keyword in search.keywords:
        attr = ATTRIBUTES[keyword]
        value = row.get(keyword)
        if keyword == "IssuerOfPatientID" and str(value or "").startswith("study:"):
            value = ""  # the index's stand-in issuer for an empty Patient ID
        out[attr.tag] = _element(attr.vr, value)
    if level in ("study", "instance"):
        out["00080056"] = {"vr": "CS", "Value": ["ONLINE"]}
    out["00081190"] = {"vr": "UR", "Value": [retrieve_url(base, row, level)]}
    if search.extra_tags and row.get("metadata_json"):
        meta = json.loads(row["metadata_json"])
        for tag in search.extra_tags:
            if tag in meta and "BulkDataURI" not in meta[tag]:
                out[tag] = meta[tag]
            elif tag not in out:
                keyword = keyword_for_tag(int(tag, 16))
                out[tag] = {"vr": dictionary_VR(int(tag, 16)) if keyword else "UN"}
    return dict(sorted(out.items()))


_BULK = re.compile(r'"([0-9A-F]{8})":\{"BulkDataURI":""')


def fill_bulkdata_uris(metadata: str, instance_url: str) -> str:
    """Point the empty BulkDataURIs of stored DICOM JSON at ``…/bulkdata/{tag}``.

    Textual, without parsing: ``core.instance.metadata_json`` writes sorted, compact
    JSON, so each bulk element reads ``"tag":{"BulkDataURI":""`` (PS3.18 F.2.6).
    """
    if '"BulkDataURI":""' not in metadata:
        return metadata
    prefix = json.dumps(instance_url + "/bulkdata/")[1:-1]
    return _BULK.sub(lambda m: f'"{m[1]}":{{"BulkDataURI":"{prefix}{m[1]}"', metadata)
