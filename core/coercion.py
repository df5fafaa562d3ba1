"""Patient module coercion on the way out (pure; PS3.3 C.12.1.1.9, PS3.4 C.4.2.1.4.1).

After a demographics update, an identifier change or a merge (IHE PIR), the stored
originals keep the values the modality wrote: they are never rewritten (their hash
is their key). What leaves the archive (WADO-RS instances and ``/metadata``, C-MOVE /
C-GET sub-operations, exports) carries the patient as the index holds it now, and
each coerced instance records the values it had in its Original Attributes Sequence
(0400,0561): Modified Attributes Sequence (0400,0550) with the previous values,
Attribute Modification DateTime, Modifying System, Source of Previous Values and
Reason ``COERCE`` ("reconciliation against a master patient index",
PS3.3 C.12.1.1.9.2).

:func:`coerce_patient_module` works on a pydicom Dataset, :func:`coerce_patient_json`
on the DICOM JSON of one instance (PS3.18 F.2), for ``/metadata``. Both leave the
input alone when nothing differs, so an instance whose patient never changed goes
out byte for byte as stored.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

__all__ = [
    "MODIFYING_SYSTEM",
    "PATIENT_MODULE",
    "PatientAttributes",
    "coerce_patient_json",
    "coerce_patient_module",
    "json_differences",
    "patient_attributes_from_row",
    "patient_differences",
]

#: Modifying System (0400,0563).
MODIFYING_SYSTEM = "pacslab"

#: (keyword, tag as DICOM JSON key, VR, PatientAttributes field) of what is coerced:
#: the Patient Identification and Demographic attributes the record system owns
#: (PS3.3 C.7.1.1 Patient Module).
PATIENT_MODULE: tuple[tuple[str, str, str, str], ...] = (
    ("PatientName", "00100010", "PN", "name"),
    ("PatientID", "00100020", "LO", "patient_id"),
    ("IssuerOfPatientID", "00100021", "LO", "issuer"),
    ("PatientBirthDate", "00100030", "DA", "birth_date"),
    ("PatientSex", "00100040", "CS", "sex"),
)


@dataclass(frozen=True, slots=True)
class PatientAttributes:
    """The Patient module values an instance must carry now (DICOM forms: PN, LO, DA, CS)."""

    name: str
    patient_id: str
    issuer: str = ""
    birth_date: str = ""
    sex: str = ""


def patient_attributes_from_row(row: Mapping[str, Any]) -> PatientAttributes:
    """The values of an index row keyed by DICOM keyword (``storage.index.queries``);
    the per-study pseudo issuer of an instance without Patient ID is no issuer."""
    issuer = str(row.get("IssuerOfPatientID") or "")
    return PatientAttributes(
        name=str(row.get("PatientName") or ""),
        patient_id=str(row.get("PatientID") or ""),
        issuer="" if issuer.startswith("study:") else issuer,
        birth_date=str(row.get("PatientBirthDate") or ""),
        sex=str(row.get("PatientSex") or ""),
    )


def _pn_text(value: Any) -> str:
    return "" if value is None else str(value).rstrip("=^ ")


def _dataset_value(ds: Dataset, keyword: str) -> str | None:
    if keyword not in ds:
        return None
    value = ds[keyword].value
    if value is None:
        return ""
    return _pn_text(value) if keyword == "PatientName" else str(value).strip()


def patient_differences(ds: Dataset, current: PatientAttributes) -> list[str]:
    """Keywords whose value in ``ds`` is not ``current``'s (an absent Issuer of Patient
    ID equals an empty one; a name compares without trailing empty components)."""
    out = []
    for keyword, _tag, _vr, field in PATIENT_MODULE:
        want = getattr(current, field)
        have = _dataset_value(ds, keyword)
        if keyword == "PatientName":
            want = _pn_text(want)
        if (have or "") != want:
            out.append(keyword)
    return out


def _stamp(now: datetime | None) -> str:
    return (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%d%H%M%S.%f+0000")


def coerce_patient_module(
    ds: Dataset, current: PatientAttributes, *, now: datetime | None = None
) -> bool:
    """Give ``ds`` (in place) ``current``'s Patient module values; True if it changed.

    The replaced values (absent ones as zero length) go into a new item of the
    Original Attributes Sequence (0400,0561), appended to any the instance carries
    already (PS3.3 C.12.1.1.9.1). A value that does not fit the dataset's Specific
    Character Set switches the dataset to ISO_IR 192 (UTF-8), after decoding every
    text value with the old one (PS3.5 6.1.2.5).
    """
    changed = patient_differences(ds, current)
    if not changed:
        return False
    texts = [getattr(current, f) for k, _t, _v, f in PATIENT_MODULE if k in changed]
    raw = ds.get("SpecificCharacterSet", "")
    sets = [str(c) for c in raw] if isinstance(raw, (list, MultiValue)) else [str(raw)]
    if not all(t.isascii() for t in texts) and "ISO_IR 192" not in sets:
        ds.decode()
        ds.SpecificCharacterSet = "ISO_IR 192"
    previous = Dataset()
    for keyword, _tag, vr, field in PATIENT_MODULE:
        if keyword not in changed:
            continue
        if keyword in ds:
            previous.add(copy.deepcopy(ds[keyword]))
        else:
            previous.add_new(keyword, vr, None)
        value = getattr(current, field)
        if keyword == "IssuerOfPatientID" and not value:
            del ds[keyword]
            continue
        setattr(ds, keyword, value)
    item = Dataset()
    item.ModifiedAttributesSequence = Sequence([previous])
    item.AttributeModificationDateTime = _stamp(now)
    item.ModifyingSystem = MODIFYING_SYSTEM
    item.SourceOfPreviousValues = ""
    item.ReasonForTheAttributeModification = "COERCE"
    if "OriginalAttributesSequence" in ds and ds.OriginalAttributesSequence is not None:
        ds.OriginalAttributesSequence.append(item)
    else:
        ds.OriginalAttributesSequence = Sequence([item])
    return True


def _pn_json(value: str) -> list[dict[str, str]]:
    groups = value.split("=")
    out = {
        name: group
        for name, group in zip(("Alphabetic", "Ideographic", "Phonetic"), groups, strict=False)
        if group
    }
    return [out] if out else []


def _json_value(elem: Any, vr: str) -> str | None:
    if not isinstance(elem, dict):
        return None
    values = elem.get("Value") or []
    if not values:
        return ""
    first = values[0]
    if vr == "PN":
        if not isinstance(first, dict):
            return ""
        groups = [first.get(k, "") for k in ("Alphabetic", "Ideographic", "Phonetic")]
        return _pn_text("=".join(groups))
    return str(first).strip()


_DECODER = json.JSONDecoder()


def _top_level_element(meta: str, tag: str) -> Any:
    """The JSON object of ``tag`` in ``meta`` without parsing the rest (``/metadata``
    of a large series would otherwise parse every header twice). The first occurrence
    is the top-level one: keys are written sorted (``core.instance.metadata_json``),
    so a sequence holding the same tag (Other Patient IDs Sequence) comes after it.
    ``None`` when absent."""
    at = meta.find(f'"{tag}"')
    if at < 0:
        return None
    colon = meta.find(":", at + len(tag) + 2)
    start = colon + 1
    while start < len(meta) and meta[start] in " \t\r\n":
        start += 1
    try:
        value, _end = _DECODER.raw_decode(meta, start)
    except ValueError:
        return None
    return value


def json_differences(meta: str, current: PatientAttributes) -> list[str] | None:
    """Keywords whose value in the DICOM JSON ``meta`` is not ``current``'s; None when
    ``meta`` is not a JSON object (then read the file's header instead)."""
    if not meta.lstrip().startswith("{") or meta.strip() == "{}":
        return None
    out = []
    for keyword, tag, vr, field in PATIENT_MODULE:
        want = getattr(current, field)
        if vr == "PN":
            want = _pn_text(want)
        if (_json_value(_top_level_element(meta, tag), vr) or "") != want:
            out.append(keyword)
    return out


def coerce_patient_json(
    meta: str, current: PatientAttributes, *, now: datetime | None = None
) -> str:
    """:func:`coerce_patient_module` for the DICOM JSON of one instance (PS3.18 F.2):
    the same values and the same Original Attributes Sequence item, as JSON text.
    Returns ``meta`` itself when nothing differs."""
    if json_differences(meta, current) == []:
        return meta  # the common case, without parsing the whole header
    try:
        obj = json.loads(meta)
    except ValueError:
        return meta
    if not isinstance(obj, dict):
        return meta
    previous: dict[str, Any] = {}
    for _keyword, tag, vr, field in PATIENT_MODULE:
        want = getattr(current, field)
        if vr == "PN":
            want = _pn_text(want)
        have = _json_value(obj.get(tag), vr)
        if (have or "") == want:
            continue
        previous[tag] = obj.get(tag, {"vr": vr})
        if not want:
            if tag == "00100021":
                obj.pop(tag, None)
            else:
                obj[tag] = {"vr": vr}
            continue
        obj[tag] = {"vr": vr, "Value": _pn_json(want) if vr == "PN" else [want]}
    if not previous:
        return meta
    item = {
        "04000550": {"vr": "SQ", "Value": [previous]},
        "04000562": {"vr": "DT", "Value": [_stamp(now)]},
        "04000563": {"vr": "LO", "Value": [MODIFYING_SYSTEM]},
        "04000564": {"vr": "LO"},
        "04000565": {"vr": "CS", "Value": ["COERCE"]},
    }
    existing = obj.get("04000561")
    if isinstance(existing, dict) and isinstance(existing.get("Value"), list):
        existing["Value"].append(item)
    else:
        obj["04000561"] = {"vr": "SQ", "Value": [item]}
    # DICOM JSON is Unicode: any name fits; say so, as the Part 10 form would.
    if any(not str(getattr(current, f)).isascii() for *_x, f in PATIENT_MODULE):
        obj["00080005"] = {"vr": "CS", "Value": ["ISO_IR 192"]}
    return json.dumps(dict(sorted(obj.items())), ensure_ascii=False)
