"""IHE IOCM rejection notes, as pure values (IHE RAD TF-1 Ch. 37, TF-3 4.66).

A rejection note is a Key Object Selection Document (PS3.3 A.35.4, SOP Class
1.2.840.10008.5.1.4.1.1.88.59) whose Document Title (ConceptNameCodeSequence) is one
of the "rejection" codes of PS3.16 CID 7011 and whose Current Requested Procedure
Evidence Sequence (PS3.3 C.17.6.2.1) lists the SOP Instances it rejects. Nothing here
reads files or the index: :func:`parse_rejection_note` takes a pydicom ``Dataset``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pydicom.dataset import Dataset

from core.errors import InvalidDatasetError

__all__ = [
    "KOS_SOP_CLASS_UID",
    "MAX_REFERENCES",
    "REJECTION_CODES",
    "RETENTION_EXPIRED",
    "RejectedRef",
    "RejectionNote",
    "parse_rejection_code",
    "parse_rejection_note",
]

#: Key Object Selection Document Storage (PS3.4 Table B.5-1).
KOS_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.88.59"

#: PS3.16 CID 7011 "Rejected Key Object Selection Document Titles" (scheme DCM).
REJECTION_CODES: Mapping[str, str] = {
    "113001": "Rejected for Quality Reasons",
    "113037": "Rejected for Patient Safety Reasons",
    "113038": "Incorrect Modality Worklist Entry",
    "113039": "Data Retention Policy Expired",
}

#: The one reason that lets a rejected instance be stored again (and restored), and
#: that requires the study's retention period to have ended (IHE RAD TF-2 4.66.4.1.3).
RETENTION_EXPIRED = "113039"

#: Instances one note (or one API call) may reject: a bound on hostile input.
MAX_REFERENCES = 100_000


@dataclass(frozen=True, slots=True)
class RejectedRef:
    """One rejected SOP Instance, as the evidence names it."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str = ""


@dataclass(frozen=True, slots=True)
class RejectionNote:
    """A received KOS that is a rejection note: its reason and what it rejects."""

    sop_instance_uid: str
    code: str
    refs: tuple[RejectedRef, ...]


def parse_rejection_code(value: str) -> str:
    """A CID 7011 code value, or :class:`InvalidDatasetError` naming the known ones."""
    code = value.strip()
    if code not in REJECTION_CODES:
        known = ", ".join(REJECTION_CODES)
        raise InvalidDatasetError(f"rejection code must be one of {known} (PS3.16 CID 7011)")
    return code


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return str(value or "").strip()


def parse_rejection_note(ds: Dataset) -> RejectionNote | None:
    """The rejection note ``ds`` is, or ``None`` when it is no rejection note.

    ``None`` for any SOP Class but KOS and for a KOS whose title is not in CID 7011
    (an ordinary key-image note). A KOS titled as a rejection but without usable
    evidence raises :class:`InvalidDatasetError`: storing it as an ordinary KOS
    would tell the sender its rejection was applied.
    """
    if _text(ds, "SOPClassUID") != KOS_SOP_CLASS_UID:
        return None
    titles = ds.get("ConceptNameCodeSequence") or []
    if len(titles) != 1:
        return None
    title = titles[0]
    code = _text(title, "CodeValue")
    if _text(title, "CodingSchemeDesignator") != "DCM" or code not in REJECTION_CODES:
        return None
    refs: list[RejectedRef] = []
    for study in ds.get("CurrentRequestedProcedureEvidenceSequence") or []:
        study_uid = _text(study, "StudyInstanceUID")
        for series in study.get("ReferencedSeriesSequence") or []:
            series_uid = _text(series, "SeriesInstanceUID")
            for sop in series.get("ReferencedSOPSequence") or []:
                sop_uid = _text(sop, "ReferencedSOPInstanceUID")
                if not (study_uid and series_uid and sop_uid):
                    raise InvalidDatasetError("rejection note evidence without its UIDs")
                if max(len(study_uid), len(series_uid), len(sop_uid)) > 64:
                    raise InvalidDatasetError("rejection note evidence UID too long")
                refs.append(
                    RejectedRef(study_uid, series_uid, sop_uid, _text(sop, "ReferencedSOPClassUID"))
                )
                if len(refs) > MAX_REFERENCES:
                    raise InvalidDatasetError("rejection note names too many instances")
    if not refs:
        raise InvalidDatasetError("rejection note without Current Requested Procedure Evidence")
    own = _text(ds, "SOPInstanceUID")
    if any(r.sop_instance_uid == own for r in refs):
        raise InvalidDatasetError("rejection note rejects itself")
    # IHE RAD TF-3 4.66 (Rejection Note Stored): the note belongs to the study whose
    # instances it rejects; one naming another study's would hide that patient's images.
    if {r.study_instance_uid for r in refs} != {_text(ds, "StudyInstanceUID")}:
        raise InvalidDatasetError("rejection note evidence names another study")
    return RejectionNote(own, code, tuple(refs))
