"""Read queries of the index: QIDO-RS matching, WADO-RS metadata, FHIR search (pure).

One query builder for SQLite and PostgreSQL (STYLE.md §6): each function turns a
:class:`Query` value into a SQLAlchemy ``Select``; :class:`storage.index.sql.SqlIndex`
executes it. Matching follows PS3.4 C.2.2.2 as profiled for QIDO-RS by PS3.18 8.3.4:

* single value matching (C.2.2.2.1), case- and accent-insensitive for PatientName
  (our choice under C.2.2.2.1.1, the worklist's default rule:
  :func:`core.person_name.person_name_key`), on the indexed ``patients.name_key``, so that
  ``TRẦN*``, ``trần*`` and ``TRAN*`` find the same studies by an index range scan;
* wildcard matching with ``*`` and ``?`` (C.2.2.2.4);
* range matching of DA and TM (C.2.2.2.5), ``a-b``, ``a-`` and ``-b``;
* list of UID matching (C.2.2.2.2), separated by ``\\`` or ``,`` (PS3.18 8.3.4.1),
  also accepted for CS keys such as ModalitiesInStudy;
* universal matching for an empty value or a lone ``*`` (C.2.2.2.3);
* ``fuzzymatching=true`` (PS3.18 8.3.4.1.1): PN matches case-insensitively on the
  prefix of any name component or word.

Nothing here reads more than the rows it returns (issue 21): counts come from
``series.num_instances`` (current instances, kept by the receiver) per returned study,
and ModalitiesInStudy from the per-study set ``study_modalities``, which is also what
matching on it reads: ``ModalitiesInStudy=CT`` pages off its (modality, study_pk) index,
and beside a name or date key it is one primary key lookup per study read. A list
(``CT\\MR``) reads one such page per modality and merges them; a wildcard (``C*``) is
first resolved into the archive's matching modalities by a loose scan of that index.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any, Literal

from sqlalchemy import (
    ColumnElement,
    CompoundSelect,
    Select,
    and_,
    case,
    func,
    literal_column,
    or_,
    select,
    true,
    union,
)

from core.errors import InvalidQueryError
from core.person_name import name_words, person_name_key
from storage.index.pir_tables import patient_links
from storage.index.schema import (
    instances,
    patient_name_words,
    patients,
    series,
    studies,
    study_modalities,
)

__all__ = [
    "ATTRIBUTES",
    "Attribute",
    "Level",
    "Match",
    "NameSearch",
    "Query",
    "after_key_query",
    "bounded_count",
    "count_query",
    "find_query",
    "metadata_query",
    "modality_values_query",
    "modality_wildcards",
    "newest_floor_query",
    "newest_window",
    "parse_match",
    "person_name_condition",
    "total_from_page",
]

Level = Literal["patient", "study", "series", "instance"]
_DEPTH: dict[str, int] = {"patient": 0, "study": 1, "series": 2, "instance": 3}


@dataclass(frozen=True, slots=True)
class Attribute:
    """A matchable/returnable DICOM attribute of the index.

    ``derived`` attributes are aggregates (counts, ModalitiesInStudy) computed per row.
    """

    keyword: str
    tag: str  # 8 hex digits, as in DICOM JSON (PS3.18 F.2.1.1)
    vr: str
    level: Level
    column: Any = None
    derived: bool = False


def _a(keyword: str, tag: str, vr: str, level: Level, column: Any = None) -> Attribute:
    return Attribute(keyword, tag, vr, level, column, derived=column is None)


#: Attributes the index can match and return (PS3.18 Tables 10.6.1-5/6/7 and more).
ATTRIBUTES: Mapping[str, Attribute] = {
    a.keyword: a
    for a in (
        _a("PatientName", "00100010", "PN", "patient", patients.c.name),
        _a("PatientID", "00100020", "LO", "patient", patients.c.patient_id),
        _a("IssuerOfPatientID", "00100021", "LO", "patient", patients.c.issuer),
        _a("PatientBirthDate", "00100030", "DA", "patient", patients.c.birth_date),
        _a("PatientSex", "00100040", "CS", "patient", patients.c.sex),
        _a("StudyInstanceUID", "0020000D", "UI", "study", studies.c.study_instance_uid),
        _a("StudyDate", "00080020", "DA", "study", studies.c.study_date),
        _a("StudyTime", "00080030", "TM", "study", studies.c.study_time),
        _a("AccessionNumber", "00080050", "SH", "study", studies.c.accession_number),
        _a("StudyID", "00200010", "SH", "study", studies.c.study_id),
        _a("StudyDescription", "00081030", "LO", "study", studies.c.description),
        _a(
            "ReferringPhysicianName",
            "00080090",
            "PN",
            "study",
            studies.c.referring_physician_name,
        ),
        _a("InstitutionName", "00080080", "LO", "study", studies.c.institution_name),
        _a("ModalitiesInStudy", "00080061", "CS", "study"),
        _a("NumberOfStudyRelatedSeries", "00201206", "IS", "study"),
        _a("NumberOfStudyRelatedInstances", "00201208", "IS", "study"),
        _a("SeriesInstanceUID", "0020000E", "UI", "series", series.c.series_instance_uid),
        _a("Modality", "00080060", "CS", "series", series.c.modality),
        _a("SeriesNumber", "00200011", "IS", "series", series.c.series_number),
        _a("SeriesDescription", "0008103E", "LO", "series", series.c.description),
        _a("SeriesDate", "00080021", "DA", "series", series.c.series_date),
        _a("SeriesTime", "00080031", "TM", "series", series.c.series_time),
        _a("BodyPartExamined", "00180015", "CS", "series", series.c.body_part_examined),
        _a("Laterality", "00200060", "CS", "series", series.c.laterality),
        _a("StationName", "00081010", "SH", "series", series.c.station_name),
        _a(
            "PerformedProcedureStepStartDate",
            "00400244",
            "DA",
            "series",
            series.c.pps_start_date,
        ),
        _a(
            "PerformedProcedureStepStartTime",
            "00400245",
            "TM",
            "series",
            series.c.pps_start_time,
        ),
        _a("NumberOfSeriesRelatedInstances", "00201209", "IS", "series"),
        _a("SOPInstanceUID", "00080018", "UI", "instance", instances.c.sop_instance_uid),
        _a("SOPClassUID", "00080016", "UI", "instance", instances.c.sop_class_uid),
        _a("InstanceNumber", "00200013", "IS", "instance", instances.c.instance_number),
        _a("Rows", "00280010", "US", "instance", instances.c.rows),
        _a("Columns", "00280011", "US", "instance", instances.c.columns),
        _a("NumberOfFrames", "00280008", "IS", "instance", instances.c.number_of_frames),
        _a("BitsAllocated", "00280100", "US", "instance", instances.c.bits_allocated),
        _a(
            "PhotometricInterpretation",
            "00280004",
            "CS",
            "instance",
            instances.c.photometric_interpretation,
        ),
        _a(
            "AvailableTransferSyntaxUID",
            "00083002",
            "UI",
            "instance",
            instances.c.transfer_syntax_uid,
        ),
    )
}

_INT_VRS = frozenset({"IS", "US", "UL", "SS", "SL"})


@dataclass(frozen=True, slots=True)
class Match:
    """One matching key: a keyword of :data:`ATTRIBUTES` and its DICOM matching string."""

    keyword: str
    value: str


@dataclass(frozen=True, slots=True)
class NameSearch:
    """A FHIR string search on the patient's name (FHIR R4 3.1.1.5.3, Patient ``name``
    and ``family``): each alternative matches the start of a name part (``family``:
    of the family name, the first component), case- and accent-insensitively by the
    one PN rule (:func:`person_name_condition`); alternatives are ORed (a comma)."""

    alternatives: tuple[str, ...]
    family_only: bool = False


@dataclass(frozen=True, slots=True)
class Query:
    """A search of the index at one level (PS3.4 C.6.1 Patient Root / Study Root).

    ``fields`` names the derived attributes to compute (plain columns are always
    returned: they cost nothing). ``patient_pk`` and the ``updated_*`` bounds serve the
    FHIR ``patient`` and ``_lastUpdated`` search parameters (FHIR R4 3.1.1.5.3).
    """

    level: Level
    matches: tuple[Match, ...] = ()
    fuzzy: bool = False
    fields: frozenset[str] = field(default_factory=frozenset)
    limit: int | None = None
    offset: int = 0
    patient_pk: int | None = None
    updated_after: datetime | None = None
    updated_after_inclusive: bool = True
    updated_before: datetime | None = None
    updated_before_inclusive: bool = True
    #: Newest first (descending primary key) instead of oldest first: the viewer's list.
    newest_first: bool = False
    #: FHIR name searches, all of which must match (on the indexed name key and words).
    names: tuple[NameSearch, ...] = ()
    #: The archive's modalities each ModalitiesInStudy wildcard (``C*``) matches, as
    #: (wildcard, values): read first by :class:`storage.index.sql.SqlIndex`
    #: (:func:`modality_values_query`), so the wildcard is matched as that list, off
    #: the index, instead of a LIKE over every row of ``study_modalities``.
    modality_values: tuple[tuple[str, tuple[str, ...]], ...] = ()
    #: Keyset paging of a study search: the page starts after this StudyInstanceUID
    #: (the previous page's last study) in the page's order, read from the index at
    #: that point instead of past ``offset`` skipped rows. ``SqlIndex.find`` reads
    #: the study's order key into ``after_key`` (:func:`after_key_query`).
    after: str | None = None
    after_key: tuple[Any, ...] | None = None
    #: Only studies with a primary key above this (the newest ones): set by
    #: ``SqlIndex.find`` for a newest-first name search (:func:`newest_window`).
    newer_than_pk: int | None = None


def parse_match(keyword: str, value: str) -> Match:
    """Validate one matching key (PS3.18 8.3.4.1); raise :class:`InvalidQueryError`."""
    attr = ATTRIBUTES.get(keyword)
    if attr is None:
        raise InvalidQueryError(f"matching on {keyword} is not supported")
    if len(value) > 1024:
        raise InvalidQueryError(f"value of {keyword} is too long")
    if attr.vr in ("DA", "TM") and value not in ("", "*"):
        _range(attr.vr, value)  # raises on a malformed range
    elif attr.vr in _INT_VRS and value not in ("", "*"):
        items = _split_list(value)
        if not items or not all(re.fullmatch(r"[+-]?\d{1,10}", item) for item in items):
            raise InvalidQueryError(f"{keyword} must be an integer or a list of integers")
    elif attr.vr in ("UI", "CS") and value not in ("", "*") and not _split_list(value):
        # "\\" or "," alone: a list of empty values, which PS3.4 C.2.2.2.2 does not
        # define (an empty value is universal matching only when it is the whole key).
        raise InvalidQueryError(f"{keyword} is an empty list")
    return Match(keyword, value)


# -- matching ---------------------------------------------------------------------

_DA = re.compile(r"\d{8}")
_TM = re.compile(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?")


def _split_list(value: str) -> list[str]:
    return [v.strip() for v in re.split(r"[\\,]", value) if v.strip()]


def _plausible(vr: str, value: str) -> bool:
    """Field ranges of DA and TM (PS3.5 Table 6.2-1): month 1-12, hour 0-23 …"""
    if vr == "DA":
        return 1 <= int(value[4:6]) <= 12 and 1 <= int(value[6:8]) <= 31
    limits = (23, 59, 60)  # a leap second is a valid SS
    fields = [value[i : i + 2] for i in range(0, min(len(value.split(".")[0]), 6), 2)]
    return all(int(f) <= limit for f, limit in zip(fields, limits, strict=False))


def _range(vr: str, value: str) -> tuple[str | None, str | None]:
    """Bounds of a DA/TM range (PS3.4 C.2.2.2.5) as comparable strings."""
    lo, sep, hi = value.partition("-")
    if not sep:
        lo = hi = value
    pattern = _DA if vr == "DA" else _TM
    for part in (lo, hi):
        if part and not (pattern.fullmatch(part.strip()) and _plausible(vr, part.strip())):
            raise InvalidQueryError(f"malformed {vr} range")
    if not lo and not hi:
        raise InvalidQueryError(f"empty {vr} range")
    lo, hi = lo.strip(), hi.strip()
    if vr == "TM" and hi:
        hi = _tm_upper(hi)
    return (lo or None, hi or None)


def _tm_upper(hi: str) -> str:
    """A TM upper bound of lower precision covers its whole span ("13" ends at 13:59:59.999999)."""
    if "." in hi:
        base, frac = hi.split(".", 1)
        return f"{base}.{frac.ljust(6, '9')}"
    return hi + {2: "5959.999999", 4: "59.999999", 6: ".999999"}[len(hi)]


def _like_pattern(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


def _next_string(prefix: str) -> str | None:
    """The smallest string greater than every string starting with ``prefix``, in code
    point order (SQLite BINARY, PostgreSQL "C"); None when there is none."""
    chars = list(prefix)
    while chars:
        code = ord(chars[-1]) + 1
        if 0xD800 <= code <= 0xDFFF:  # surrogates cannot be stored: skip them
            code = 0xE000
        if code <= 0x10FFFF:
            chars[-1] = chr(code)
            return "".join(chars)
        chars.pop()
    return None


def person_name_condition(
    value: str, *, fuzzy: bool = False, key: Any = None
) -> ColumnElement[bool]:
    """Match a PN value against the folded, indexed name key (PS3.4 C.2.2.2.1.1).

    Case (Unicode case folding) and accents are ignored on both sides
    (:func:`core.person_name.person_name_key`): ``NGUYỄN``, ``nguyễn`` and ``NGUYEN``
    are one name. A value without wildcards is an equality and a wildcard pattern
    with a literal start is a range of the key's index (plus the LIKE that checks the
    rest), so neither reads the whole table. ``fuzzy`` (PS3.18 8.3.4.1.1, and FHIR's
    ``name`` search: "starts with" on any part) matches the start of any component,
    group or word: the patients come from a prefix range of ``patient_name_words``
    (the first word of the value), the LIKE then checks the whole value.

    Parameters
    ----------
    value : str
        The PN matching value, ``*`` and ``?`` as wildcards (C.2.2.2.4).
    fuzzy : bool
        Match the start of any name part instead of the whole name.
    key : column, optional
        The folded key column, ``patients.name_key`` by default.
    """
    column = patients.c.name_key if key is None else key
    folded = person_name_key(value)
    if fuzzy:
        prefix = _like_pattern(folded.rstrip("*")) + "%"
        like = or_(
            *(column.like(lead + prefix, escape="\\") for lead in ("", "%^", "%=", "% "))
        )
        words = name_words(folded.rstrip("*"))
        first = words[0] if words else ""
        cut = min((i for i, ch in enumerate(first) if ch in "*?"), default=len(first))
        first = first[:cut]
        upper = _next_string(first)
        if key is not None or not first or upper is None:
            return like
        candidates = select(patient_name_words.c.patient_pk).where(
            and_(patient_name_words.c.word >= first, patient_name_words.c.word < upper)
        )
        return and_(patients.c.id.in_(candidates), like)
    if not _has_wildcard(folded):
        eq: ColumnElement[bool] = column == folded
        return eq
    cut = min(i for i, ch in enumerate(folded) if ch in "*?")
    conds: list[ColumnElement[bool]] = [column.like(_like_pattern(folded), escape="\\")]
    literal = folded[:cut]
    if literal:
        conds.insert(0, column >= literal)
        upper = _next_string(literal)
        if upper is not None:
            conds.insert(1, column < upper)
    return and_(*conds)


def _name_search(search: NameSearch) -> ColumnElement[bool]:
    """A FHIR name search as index range scans: ``family`` is a prefix of the name key
    (its first component comes first), ``name`` the fuzzy "start of any part" match
    through ``patient_name_words``. Wildcards in a value are literal characters."""
    alternatives = [v.replace("*", "").replace("?", "") for v in search.alternatives]
    conds = [
        person_name_condition(f"{v}*") if search.family_only else
        person_name_condition(v, fuzzy=True)
        for v in alternatives
        if v
    ]
    return or_(*conds) if conds else true()


def _string_match(column: Any, value: str, vr: str, fuzzy: bool) -> ColumnElement[bool]:
    if vr == "PN":
        col = func.lower(column)
        val = value.lower()
        if fuzzy:
            prefix = _like_pattern(val.rstrip("*")) + "%"
            # any component (^), group (=) or word (space) may start with the value
            return or_(*(col.like(lead + prefix, escape="\\") for lead in ("", "%^", "%=", "% ")))
        if _has_wildcard(val):
            return col.like(_like_pattern(val), escape="\\")
        return col == val
    if _has_wildcard(value):
        return column.like(_like_pattern(value), escape="\\")  # type: ignore[no-any-return]
    return column == value  # type: ignore[no-any-return]


def _value_match(attr: Attribute, column: Any, value: str, fuzzy: bool) -> ColumnElement[bool]:
    vr = attr.vr
    if vr in ("UI", "CS") or vr in _INT_VRS:
        items = _split_list(value)
        if not items:  # parse_match refuses these; a Query built elsewhere may not
            raise InvalidQueryError(f"{attr.keyword} is an empty list")
        if vr in _INT_VRS:
            numbers = [int(item) for item in items]
            if len(numbers) > 1:
                return column.in_(numbers)  # type: ignore[no-any-return]
            return column == numbers[0]  # type: ignore[no-any-return]
        if vr == "CS" and len(items) == 1 and _has_wildcard(items[0]):
            return column.like(_like_pattern(items[0]), escape="\\")  # type: ignore[no-any-return]
        return column.in_(items) if len(items) > 1 else column == items[0]  # type: ignore[no-any-return]
    if vr in ("DA", "TM"):
        lo, hi = _range(vr, value)
        conds = [column != ""]
        if lo is not None:
            conds.append(column >= lo)
        if hi is not None:
            conds.append(column <= hi)
        return and_(*conds)
    return _string_match(column, value, vr, fuzzy)


def _condition(
    m: Match, fuzzy: bool, *, per_row: bool = False,
    resolved: tuple[tuple[str, tuple[str, ...]], ...] = (),
) -> ColumnElement[bool]:
    attr = ATTRIBUTES[m.keyword]
    if m.value in ("", "*"):
        return true()
    if attr.keyword == "PatientName":
        return person_name_condition(m.value, fuzzy=fuzzy)
    if attr.keyword == "ModalitiesInStudy":
        # A study-level key also filters series and instances (PS3.18 10.6.1.2: the
        # series of CT studies), from the per-study modality set.
        modality = ATTRIBUTES["Modality"]
        sm = study_modalities.alias("sm_m")
        values = _wildcard_values(m, resolved)
        matched = (
            sm.c.modality.in_(values) if values is not None
            else _value_match(modality, sm.c.modality, m.value, fuzzy)
        )
        if per_row:
            # Another index chooses the page (name key, date): a primary key lookup
            # (study_pk, modality) per study it reads. As IN (…), SQLite first
            # collected every study of the modality into a list (issue 21).
            return select(sm.c.study_pk).where(sm.c.study_pk == studies.c.id, matched).exists()
        # A range of the (modality, study_pk) index, which SQLite may also drive from.
        return studies.c.id.in_(select(sm.c.study_pk).where(matched))
    if attr.derived:
        raise InvalidQueryError(f"matching on {attr.keyword} is not supported")
    return _value_match(attr, attr.column, m.value, fuzzy)


# -- derived attributes -------------------------------------------------------------


def _study_counts() -> tuple[Any, Any]:
    """Series with a current instance, and current instances, of the row's study: read
    from its few series rows (``series.num_instances``), not its instances."""
    se = series.alias("se_n")
    of_study = and_(se.c.study_pk == studies.c.id, se.c.num_instances > 0)
    n_series = select(func.count(se.c.id)).where(of_study).scalar_subquery()
    n_instances = (
        select(func.coalesce(func.sum(se.c.num_instances), 0)).where(of_study).scalar_subquery()
    )
    return n_series, n_instances


def _modalities_in_study() -> Any:
    """The distinct modalities of the study's series (PS3.18 Table 10.6.1-5), from the
    per-study set the receiver keeps (its primary key starts with ``study_pk``).

    The derived table must be correlated explicitly: SQLAlchemy does not correlate a
    subquery in FROM, and left alone it cross-joined ``studies`` back in, so every
    study listed the modalities of the whole archive (issue 13.1).
    """
    sm = study_modalities.alias("sm")
    ordered = (
        select(sm.c.modality.label("modality"))
        .where(and_(sm.c.study_pk == studies.c.id, sm.c.modality != ""))
        .order_by(sm.c.modality)
        .correlate(studies)
        .subquery()
    )
    # aggregate_strings renders group_concat on SQLite and string_agg on PostgreSQL.
    return (
        select(func.aggregate_strings(ordered.c.modality, "\\"))
        .select_from(ordered)
        .scalar_subquery()
    )


# -- builders -----------------------------------------------------------------------


@lru_cache(maxsize=256)
def _columns(level: Level, fields: frozenset[str]) -> tuple[Any, ...]:
    """The result columns of a level, built once per (level, fields): constructing the
    labels and correlated subqueries cost more CPU than SQLite's execution of a
    100-study page (issue 21). SQLAlchemy elements are immutable, so sharing is safe."""
    depth = _DEPTH[level]
    cols: list[Any] = [patients.c.id.label("patient_pk")]
    for attr in ATTRIBUTES.values():
        if _DEPTH[attr.level] > depth or attr.derived:
            continue
        cols.append(attr.column.label(attr.keyword))
    if depth >= 1:
        cols.append(studies.c.updated_at.label("study_updated_at"))
        if depth == 1 or fields & {"NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"}:
            n_series, n_instances = _study_counts()
            cols += [
                n_series.label("NumberOfStudyRelatedSeries"),
                n_instances.label("NumberOfStudyRelatedInstances"),
            ]
        if depth == 1 or "ModalitiesInStudy" in fields:
            cols.append(_modalities_in_study().label("ModalitiesInStudy"))
    else:
        cols.append(patients.c.updated_at.label("patient_updated_at"))
    if depth == 2 or (depth > 2 and "NumberOfSeriesRelatedInstances" in fields):
        cols.append(series.c.num_instances.label("NumberOfSeriesRelatedInstances"))
    if depth == 3:
        cols.append(instances.c.blob_key.label("blob_key"))
        if "metadata_json" in fields:
            # SqlIndex.find decompresses metadata_z into metadata_json.
            cols.append(instances.c.metadata_json.label("metadata_json"))
            cols.append(instances.c.metadata_z.label("metadata_z"))
    return tuple(cols)


def _visible(depth: int) -> list[ColumnElement[bool]]:
    """What every search shows: current instances, and series and studies that have one.

    The one place that hides what IHE IOCM rejected (storage/index/rejection.py): a
    rejected instance has no current version, and its series' ``num_instances`` (current
    instances) drops with it, so a series or study left without any is gone from QIDO-RS,
    C-FIND, C-MOVE/C-GET, FHIR and the viewer alike, without a caller having to ask.
    A series row exists only with an instance committed in the same transaction
    (sql.py), so ``num_instances = 0`` never hides a series being received.
    """
    if depth >= 3:
        return [instances.c.is_current]
    if depth == 2:
        return [series.c.num_instances > 0]
    if depth == 1:
        return [_study_has_current_series()]
    return []


@lru_cache(maxsize=1)
def _merged_away() -> ColumnElement[bool]:
    """The patient row was merged into another (IHE PIR A40, FHIR ``$merge``).

    A patient-level search (C-FIND PATIENT, FHIR Patient search) lists the surviving
    patient only, with its current demographics: the obsolete row stays for review,
    undo and FHIR read (``active: false``, ``replaced-by``), where it is named by its
    key (``Query.patient_pk``), but nothing is under it any more. Deeper levels need no
    filter: a merge moves every study to the survivor.
    """
    return (
        select(patient_links.c.obsolete_pk)
        .where(patient_links.c.obsolete_pk == patients.c.id)
        .exists()
    )


@lru_cache(maxsize=1)
def _study_has_current_series() -> ColumnElement[bool]:
    """The study-level visibility test, built once: an alias copies its table's column
    collection, and building this per request was over half of a QIDO-RS study
    search's CPU in ``find`` (issue 21). SQLAlchemy elements are immutable: shared."""
    se = series.alias("se_v")
    return (
        select(se.c.id)
        .where(and_(se.c.study_pk == studies.c.id, se.c.num_instances > 0))
        .exists()
    )


def _base(q: Query, drive: str | None = None) -> Select[Any]:
    """The matching rows of ``q``; ``drive`` is the one modality of the driving
    ModalitiesInStudy list (:func:`_driving_modality`) this statement joins on."""
    depth = _DEPTH[q.level]
    source: Any = patients
    driving = _driving_modality(q)
    if driving is not None and drive is None and len(driving[1]) == 1:
        drive = driving[1][0]
    if drive is None:
        driving = None  # a list read without a page: matched by IN below
    if depth >= 1:
        source = studies.join(patients, studies.c.patient_pk == patients.c.id)
    if driving is not None:
        # The page is read off ix_study_modalities_modality: (modality = CT, study_pk
        # ascending) is the primary key's order, so the scan stops at the limit.
        source = study_modalities.join(
            source,
            and_(study_modalities.c.study_pk == studies.c.id,
                 study_modalities.c.modality == drive),
        )
    if depth >= 2:
        source = series.join(source, series.c.study_pk == studies.c.id)
    if depth >= 3:
        source = instances.join(source, instances.c.series_pk == series.c.id)
    stmt = select(*_columns(q.level, q.fields)).select_from(source)
    conds: list[ColumnElement[bool]] = []
    per_row = driving is not None or _index_order(q) is not None
    for m in q.matches:
        attr = ATTRIBUTES.get(m.keyword)
        if attr is None:
            raise InvalidQueryError(f"matching on {m.keyword} is not supported")
        if _DEPTH[attr.level] > depth:
            raise InvalidQueryError(f"{m.keyword} is not a {q.level}-level key")
        if driving is not None and m is driving[0]:
            continue  # the join above
        conds.append(_condition(m, q.fuzzy, per_row=per_row, resolved=q.modality_values))
    for search in q.names:
        conds.append(_name_search(search))
    if q.newer_than_pk is not None:
        conds.append(studies.c.id > q.newer_than_pk)
    if q.after_key is not None:
        # Keyset paging: the page order's own columns (the modality's index when
        # it is joined on), so the read starts at the anchor.
        cols = [study_modalities.c.study_pk] if driving is not None else _order_key(q)
        conds.append(_after(q, cols))
    conds += _visible(depth)
    if q.patient_pk is not None:
        conds.append(patients.c.id == q.patient_pk)
    elif depth == 0:
        conds.append(~_merged_away())
    updated = studies.c.updated_at if depth >= 1 else patients.c.updated_at
    if q.updated_after is not None:
        conds.append(
            updated >= q.updated_after if q.updated_after_inclusive else updated > q.updated_after
        )
    if q.updated_before is not None:
        conds.append(
            updated <= q.updated_before
            if q.updated_before_inclusive
            else updated < q.updated_before
        )
    if conds:
        stmt = stmt.where(and_(*conds))
    return stmt


_KEY: dict[str, Any] = {
    "patient": patients.c.id,
    "study": studies.c.id,
    "series": series.c.id,
    "instance": instances.c.id,
}


def _index_order(q: Query) -> list[Any] | None:
    """For a study search on a patient name prefix or a study date range, the order of
    the index that finds the matches, so that a page is read off that index and the
    scan stops at the limit; None for the default order (primary key).

    In primary key order SQLite had to collect and sort every match before the limit
    applied (``USE TEMP B-TREE FOR ORDER BY``): ``PatientName=NGUY*`` matches about a
    third of all studies, so its cost grew with the archive (issue 21). The name key's
    index holds (name_key, patient id) and ``ix_studies_patient_pk`` (patient_pk,
    study id), so (name key, patient, study) is the order of the join itself; the
    date's index holds (study_date, study id). Every order ends in a unique key, so
    offset paging stays stable. QIDO-RS leaves the order of matches to the server
    (PS3.18 8.3.4.5). The viewer's newest-first list keeps its order, except by date
    where newest study date first is the same promise.
    """
    if q.level != "study" or q.names or q.fuzzy:
        return None
    by_name = by_date = False
    for m in q.matches:
        if m.value in ("", "*"):
            continue
        if m.keyword == "PatientName" and not m.value.startswith(("*", "?")):
            by_name = True
        elif m.keyword == "StudyDate":
            by_date = True
    if by_name and not q.newest_first:
        return [patients.c.name_key, patients.c.id, studies.c.id]
    if by_date:
        return [studies.c.study_date, studies.c.id]
    return None


#: Newest studies a newest-first name search looks among first (:func:`newest_window`),
#: and at least this many per row of ``offset + limit`` (a deeper page, a larger window).
NEWEST_WINDOW = 2000
NEWEST_WINDOW_PER_ROW = 10


def newest_window(q: Query) -> int | None:
    """How many of the newest studies to look among first for the page of ``q``, or
    None when the window does not apply.

    The viewer's study list searches by name newest first (descending primary key).
    No index holds both orders, so the page was read as every study of every patient
    in the name key's range, each checked for a visible series, then sorted: ``trần``
    is about one study in nine, and at 10 million instances (35,600 studies) that page
    took 5.4 ms warm and 150 ms from a cold cache, growing with the archive (issue
    21). :class:`~storage.index.sql.SqlIndex` first reads the page among the newest
    studies only (``newer_than_pk``, :func:`newest_floor_query`): the name index's
    range then yields index entries alone (``ix_studies_patient_pk`` holds the study
    key), and only the window's studies are checked and sorted (1.2 ms warm). A full
    page from the window is the exact page: every study outside it is older than every
    study in it. A page that is not full (a rare name) is read again without the
    window, which then has few matches to sort.
    """
    if (q.level != "study" or not q.newest_first or not q.limit or q.fuzzy or q.names
            or q.after_key is not None or q.newer_than_pk is not None
            or _index_order(q) is not None or _driving_modality(q) is not None):
        return None
    if not any(m.keyword == "PatientName" and m.value not in ("", "*")
               and not m.value.startswith(("*", "?")) for m in q.matches):
        return None
    return max(NEWEST_WINDOW, NEWEST_WINDOW_PER_ROW * (q.offset + q.limit))


def newest_floor_query(window: int) -> Select[Any]:
    """The primary key ``window`` below the newest study's, or None in an archive of
    fewer studies: one read of the key's last entry. Keys freed by deletions leave
    fewer studies in the window, never a wrong page (the page is exact either way)."""
    # A bare max() of the key as a subquery: SQLite reads it off the index's last
    # entry only then (as an argument of CASE it scanned the table).
    newest = select(func.max(studies.c.id)).scalar_subquery()
    return select(case((newest > window, newest - window), else_=None))


def _wildcard_values(m: Match, resolved: tuple[tuple[str, tuple[str, ...]], ...]
                     ) -> tuple[str, ...] | None:
    """The modalities a ModalitiesInStudy wildcard stands for (``Query.modality_values``),
    None when ``m`` is no wildcard or was not resolved (then it is matched by LIKE)."""
    items = _split_list(m.value)
    if len(items) != 1 or not _has_wildcard(items[0]):
        return None
    return dict(resolved).get(items[0])


def modality_wildcards(q: Query) -> list[str]:
    """The ModalitiesInStudy wildcards of ``q`` (``C*``, ``?T``) to resolve with
    :func:`modality_values_query` into ``Query.modality_values``."""
    out = []
    for m in q.matches:
        items = _split_list(m.value) if m.keyword == "ModalitiesInStudy" else []
        if m.value not in ("", "*") and len(items) == 1 and _has_wildcard(items[0]):
            out.append(items[0])
    return out


def modality_values_query(pattern: str) -> Select[Any]:
    """The distinct modalities of the archive that the CS wildcard ``pattern`` matches
    (PS3.4 C.2.2.2.4), read by a loose index scan of ``ix_study_modalities_modality``:
    one seek per distinct modality (a few dozen), however many studies hold each."""
    sm = study_modalities.alias("sm_v")
    walk = select(func.min(sm.c.modality).label("modality")).cte(
        "modality_walk", recursive=True)
    after = sm.alias("sm_w")
    following = (
        select(func.min(after.c.modality)).where(after.c.modality > walk.c.modality)
        .scalar_subquery()
    )
    walk = walk.union_all(select(following).where(walk.c.modality.is_not(None)))
    return select(walk.c.modality).where(
        walk.c.modality.is_not(None), walk.c.modality.like(_like_pattern(pattern), escape="\\")
    )


def _driving_modality(q: Query) -> tuple[Match, tuple[str, ...]] | None:
    """The ModalitiesInStudy key a study search's page is read by, when no name or date
    order applies, with the modalities it names: ``ModalitiesInStudy=CT`` then joins
    ``study_modalities`` on that modality and pages in ``study_pk`` order, the primary
    key's, off ``ix_study_modalities_modality``. As ``studies.id IN (…)`` SQLite
    collected every CT study into a list before the first row of the page (issue 21).
    A list (``CT\\MR``, PS3.4 C.2.2.2.2) or a resolved wildcard (``C*``) reads one
    such page per modality and merges them (:func:`find_query`): a study may hold
    several of them.
    """
    if q.level != "study" or _index_order(q) is not None:
        return None
    for m in q.matches:
        if m.keyword != "ModalitiesInStudy" or m.value in ("", "*"):
            continue
        items = tuple(dict.fromkeys(_split_list(m.value)))
        values = _wildcard_values(m, q.modality_values)
        if values is not None:
            items = values
        elif len(items) == 1 and _has_wildcard(items[0]):
            continue  # not resolved: matched by LIKE
        if 0 < len(items) <= _MAX_MERGED:
            return m, items
    return None


#: The most modalities whose pages :func:`_merged_page` merges: a longer list (a
#: hostile one, up to 1 KiB) is matched by IN; SQLite refuses a compound SELECT of
#: more than 500 terms.
_MAX_MERGED = 32


def _order_key(q: Query) -> list[Any]:
    """The columns of a study search's page order (its index's), ascending."""
    return _index_order(q) or [studies.c.id]


def after_key_query(q: Query) -> Select[Any]:
    """The page-order key of ``q.after`` (a StudyInstanceUID): the anchor of keyset
    paging. The study itself need not match ``q`` or still be visible."""
    return (
        select(*_order_key(q))
        .select_from(studies.join(patients, studies.c.patient_pk == patients.c.id))
        .where(studies.c.study_instance_uid == q.after)
    )


def _after(q: Query, cols: list[Any]) -> ColumnElement[bool]:
    """Rows after ``q.after_key`` in the order of ``cols`` (before it, newest first).

    Written as ``first >= k0 AND (first > k0 OR (rest) > (k1 …))`` rather than a row
    value: the bound on the first column is what an index range starts from (SQLite
    does not seek on a row value spanning two tables); the few rows that share the
    anchor's first column are filtered, not read past.
    """
    assert q.after_key is not None
    key = list(q.after_key)

    def beyond(i: int) -> ColumnElement[bool]:
        col, value = cols[i], key[i]
        strict: ColumnElement[bool] = col < value if q.newest_first else col > value
        if i == len(cols) - 1:
            return strict
        return or_(strict, and_(col == value, beyond(i + 1)))

    first = cols[0] <= key[0] if q.newest_first else cols[0] >= key[0]
    return and_(first, beyond(0)) if len(cols) > 1 else beyond(0)


def find_query(q: Query) -> Select[Any]:
    """Rows of ``q`` (labels are DICOM keywords), in a stable order for paging.

    A page is chosen first, on keys alone, and only its rows get their columns: with
    ORDER BY on a result bigger than the page, SQLite computes every output column of
    every matching row (ModalitiesInStudy, the counts: three correlated subqueries)
    before it sorts, so ``PatientName=NGUY*`` cost ~40 ms at a million instances for
    the 100 studies it returns (issue 21). Chosen by key, the sort is of integers
    from covering indexes, and the subqueries run for the page's rows only.
    """
    order: list[Any] = _index_order(q) or {
        "patient": [patients.c.id],
        "study": [studies.c.id],
        "series": [studies.c.id, series.c.series_number, series.c.id],
        "instance": [series.c.id, instances.c.instance_number, instances.c.id],
    }[q.level]
    # Read off the modality's index, the same order named by its own column: SQLite
    # does not carry the join's equality over to ORDER BY studies.id.
    driving = _driving_modality(q)
    if driving is not None and len(driving[1]) > 1 and q.limit is None:
        driving = None  # no page to read: the list is matched by IN (_base)
    page_order = [study_modalities.c.study_pk] if driving else order
    if q.newest_first:
        order = [col.desc() for col in order]
        page_order = [col.desc() for col in page_order]
    if q.limit is None and not q.offset:
        return _base(q).order_by(*page_order)
    key = _KEY[q.level]
    page: Select[Any] | CompoundSelect[Any]
    if driving is not None and len(driving[1]) > 1:
        page = _merged_page(q, driving[1], page_order[0])
    else:
        single = _base(q).with_only_columns(key).order_by(*page_order)
        if q.limit is not None:
            single = single.limit(q.limit)
        page = single.offset(q.offset) if q.offset else single
    outer = Query(level=q.level, fields=q.fields)
    return _base(outer).where(key.in_(page.scalar_subquery())).order_by(*order)


def _merged_page(q: Query, modalities: tuple[str, ...], by: Any) -> CompoundSelect[Any]:
    """The page of a study search on a ModalitiesInStudy list (``CT\\MR``, or a
    wildcard's modalities): for each modality the first ``offset + limit`` matches off
    its range of ``ix_study_modalities_modality`` (each read stops there), merged
    without duplicates (a CT and MR study is in two of them). Any study of the page
    is among the first ``offset + limit`` of each modality it holds, so the merge
    holds the whole page; as ``IN (…)``, every study of every modality was collected
    (a list) or every row of ``study_modalities`` read (a wildcard) first (issue 21).
    """
    assert q.limit is not None
    reads = [
        _base(q, drive=modality)
        .with_only_columns(study_modalities.c.study_pk.label("pk"))
        .order_by(by)
        .limit(q.limit + q.offset)
        .subquery()
        for modality in modalities
    ]
    # ORDER BY and LIMIT on the compound itself: SQLite merges the ordered reads
    # (MERGE (UNION)) instead of sorting them.
    page = union(*(select(r.c.pk) for r in reads)).order_by(
        literal_column("pk").desc() if q.newest_first else literal_column("pk")
    ).limit(q.limit)
    return page.offset(q.offset) if q.offset else page


def total_from_page(page: int, offset: int, limit: int) -> int | None:
    """The total a search's page alone tells, without a count: when the page is not full
    (and not past the end, where an empty page says nothing of what came before), every
    match is in it or before it. None when only a count can tell."""
    if limit and page < limit and (page or offset == 0):
        return offset + page
    return None


def bounded_count(matching: Select[Any], at_most: int | None) -> Select[Any]:
    """``SELECT count(*)`` of ``matching``'s rows, read no further than ``at_most + 1``
    of them when given (FHIR ``_total`` other than ``accurate``): the count stops like
    a page does, and a count past ``at_most`` says only "more" (issue 21)."""
    if at_most is not None:
        matching = matching.limit(at_most + 1)
    return select(func.count()).select_from(matching.subquery())


def count_query(q: Query, at_most: int | None = None) -> Select[Any]:
    """Number of rows ``q`` matches, ignoring its limit and offset (FHIR Bundle.total);
    with ``at_most``, counted no further than ``at_most + 1`` rows (FHIR ``_total``
    other than ``accurate``: the count stops like a page does)."""
    plain = Query(
        level=q.level,
        matches=q.matches,
        fuzzy=q.fuzzy,
        names=q.names,
        patient_pk=q.patient_pk,
        updated_after=q.updated_after,
        updated_after_inclusive=q.updated_after_inclusive,
        updated_before=q.updated_before,
        updated_before_inclusive=q.updated_before_inclusive,
        modality_values=q.modality_values,
    )
    return bounded_count(
        _base(plain).with_only_columns(literal_column("1").label("one")), at_most)


def metadata_query(
    study_instance_uid: str,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> Select[Any]:
    """Everything WADO-RS ``/metadata`` needs, in one query (PS3.18 10.4.1.1.2).

    One row per current instance: its UIDs, content key, transfer syntax and the DICOM
    JSON kept by the instance job (``"{}"`` until that job has run).
    """
    conds: list[ColumnElement[bool]] = [
        studies.c.study_instance_uid == study_instance_uid,
        instances.c.is_current,
    ]
    if series_instance_uid is not None:
        conds.append(series.c.series_instance_uid == series_instance_uid)
    if sop_instance_uid is not None:
        conds.append(instances.c.sop_instance_uid == sop_instance_uid)
    return (
        select(
            studies.c.study_instance_uid,
            series.c.series_instance_uid,
            instances.c.sop_instance_uid,
            instances.c.sop_class_uid,
            instances.c.transfer_syntax_uid,
            instances.c.blob_key,
            instances.c.metadata_json,
            instances.c.metadata_z,
        )
        .select_from(
            instances.join(series, instances.c.series_pk == series.c.id).join(
                studies, series.c.study_pk == studies.c.id
            )
        )
        .where(and_(*conds))
        .order_by(series.c.id, instances.c.instance_number, instances.c.id)
    )
