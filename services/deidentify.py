"""De-identification per PS3.15 Annex E, Basic Application Level Confidentiality Profile.

The attribute table is PS3.15 Table E.1-1 as machine-readable data from
``dicom-anonymizer`` (KitwareMedical, BSD-3-Clause; its ``dicomfields_2026c`` module
is generated from the standard's current edition). We use the table, not the
library's actions: those replace UIDs from a process-wide, unseeded dictionary (it
grows forever and differs per process) and act on the top-level data set only, so
UIDs in nested sequences (Referenced SOP Instance UID in Source Image Sequence …)
would keep their original values. Here every element, nested ones included, gets
its table action, and UIDs map through a keyed hash of the export's seed
(:meth:`Deidentifier.uid`), so the same original UID gets the same new UID in every
instance of the study and in the DICOMDIR built from the same seed.

Actions (PS3.15 E.1.1, Table E.1-1 codes): ``X`` removed; ``Z`` emptied (dates and
times get a dummy, which ``Z`` allows, so the DICOMDIR's Type 1 keys stay real);
``D`` a dummy of the VR; ``U`` the keyed UID; ``X/Z`` → ``Z``, ``X/D`` → ``D``,
``X/Z/D`` → ``Z``, ``Z/D`` → ``Z`` (Patient ID: a keyed pseudonym, a ``D``, so the
patient is still one patient on the medium); ``X/Z/U*`` sequences are kept and their
contained UIDs mapped (``U``). Private elements are removed (``X``). Pixel data is
not touched: burned-in annotation is outside the Basic Profile's attribute rules.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Final

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag

__all__ = ["METHOD", "Deidentifier", "TableE11", "table_e1_1"]

#: Value of De-identification Method (0012,0063).
METHOD: Final = "PS3.15 E.1 Basic Application Level Confidentiality Profile"
#: The edition of Table E.1-1 used (a module of ``dicom-anonymizer``).
_TABLE_EDITION: Final = "dicomfields_2026c"

_DUMMY_TEXT: Final = "ANONYMIZED"
_DUMMY_DATE: Final = "19000101"
_DUMMY_TIME: Final = "000000"
_DUMMY_DATETIME: Final = "19000101000000"

# Table E.1-1 columns as dicom-anonymizer names them → our single action letter.
_CATEGORY_ACTION: Final = {
    "X_TAGS": "X",
    "Z_TAGS": "Z",
    "D_TAGS": "D",
    "U_TAGS": "U",
    "X_Z_TAGS": "Z",
    "X_D_TAGS": "D",
    "X_Z_D_TAGS": "Z",
    "Z_D_TAGS": "Z",
    "X_Z_U_STAR_TAGS": "U*",
}


class TableE11:
    """Table E.1-1 as tag → action, plus the repeating groups (curves, overlays)."""

    def __init__(self, exact: dict[int, str], masked: list[tuple[int, int, str]]) -> None:
        self.exact = exact
        self.masked = masked  # (value, mask, action) over the 32-bit tag

    def action(self, tag: BaseTag) -> str | None:
        found = self.exact.get(int(tag))
        if found is not None:
            return found
        for value, mask, act in self.masked:
            if int(tag) & mask == value:
                return act
        return None


_TABLE: TableE11 | None = None


def table_e1_1() -> TableE11:
    """PS3.15 Table E.1-1, loaded once from ``dicom-anonymizer``'s data."""
    global _TABLE
    if _TABLE is None:
        from dicomanonymizer.dicomfields_selector import (
            dicom_anonymization_database_selector,
        )

        tables = dicom_anonymization_database_selector(_TABLE_EDITION)
        exact: dict[int, str] = {}
        masked: list[tuple[int, int, str]] = []
        for category, act in _CATEGORY_ACTION.items():
            for entry in tables[category]:
                if len(entry) == 2:
                    exact[int(Tag(entry[0], entry[1]))] = act
                else:
                    group, elem, gmask, emask = entry
                    mask = (gmask << 16) | emask
                    masked.append((((group << 16) | elem) & mask, mask, act))
        _TABLE = TableE11(exact, masked)
    return _TABLE


def _dummy(vr: str) -> object:
    if vr in ("DA",):
        return _DUMMY_DATE
    if vr == "TM":
        return _DUMMY_TIME
    if vr == "DT":
        return _DUMMY_DATETIME
    if vr in ("DS", "IS"):
        return "0"
    if vr in ("US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"):
        return 0
    if vr == "AS":
        return "000Y"
    if vr in ("OB", "OW", "UN", "OD", "OF", "OL", "OV"):
        return b"\x00\x00"
    if vr == "UR":
        return "http://anonymized.invalid"
    return _DUMMY_TEXT


def _empty(vr: str) -> object:
    # Dates and times get a dummy: Z allows one, and the DICOMDIR's STUDY record
    # needs a Study Date and Time (PS3.3 F.5.2, Type 1).
    if vr in ("DA", "TM", "DT"):
        return _dummy(vr)
    if vr in ("OB", "OW", "UN", "OD", "OF", "OL", "OV"):
        return b""
    if vr in ("US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"):
        return None
    return ""


class Deidentifier:
    """Apply the Basic Profile to data sets of one export, consistently.

    Parameters
    ----------
    seed
        Secret bytes of this export (e.g. 32 random bytes). Same seed, same output:
        the DICOMDIR built from de-identified headers and the files streamed later
        agree on every UID and pseudonym.
    """

    def __init__(self, seed: bytes) -> None:
        self._seed = seed
        self._table = table_e1_1()

    def _digest(self, kind: str, value: str) -> bytes:
        return hmac.new(self._seed, f"{kind}\0{value}".encode(), hashlib.sha256).digest()

    def uid(self, original: str) -> str:
        """The new UID of ``original``: ``2.25.`` and a UUID from a keyed hash (PS3.5 B.2).

        The UUID carries RFC 9562 version 8 (custom) and variant bits, as ``2.25``
        UIDs must be UUIDs; 128 bits keep collisions out of reach.
        """
        b = bytearray(self._digest("uid", original)[:16])
        b[6] = (b[6] & 0x0F) | 0x80
        b[8] = (b[8] & 0x3F) | 0x80
        return f"2.25.{int.from_bytes(b, 'big')}"

    def patient_id(self, original: str) -> str:
        """A pseudonymous Patient ID (a ``D`` dummy, the same for the whole export)."""
        return "ANON" + self._digest("pid", original).hex()[:12].upper()

    def apply(self, ds: Dataset) -> None:
        """De-identify ``ds`` in place (nested sequences included), then mark it.

        Sets Patient Identity Removed (0012,0062) ``YES``, De-identification Method
        (0012,0063) and its Code Sequence (0012,0064) with DCM 113100 "Basic
        Application Confidentiality Profile" (PS3.16 CID 7050).
        """
        table = self._table
        actions: dict[str, Callable[[Dataset, DataElement], None]] = {
            "X": self._remove,
            "Z": self._zero,
            "D": self._dummy,
            "U": self._replace_uid,
        }

        def visit(dataset: Dataset) -> None:
            # By tag, so that elements without an action are never converted from
            # their raw bytes (most of a data set; the cost of a naive walk).
            for tag in list(dataset.keys()):
                if tag.is_private:
                    del dataset[tag]
                    continue
                act = table.action(tag)
                raw = dataset.get_item(tag)
                vr = getattr(raw, "VR", None)
                if act is None and vr not in ("SQ", None):
                    continue
                elem = dataset[tag]
                if act is not None and act != "U*" and (elem.VR != "SQ" or act == "X"):
                    actions[act](dataset, elem)  # SQ other than X: kept, items visited
                    if act == "X":
                        continue
                if elem.VR == "SQ":
                    for item in elem.value:
                        visit(item)

        visit(ds)
        meta = getattr(ds, "file_meta", None)
        if meta is not None and "SOPInstanceUID" in ds:
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = METHOD
        code = Dataset()
        code.CodeValue = "113100"
        code.CodingSchemeDesignator = "DCM"
        code.CodeMeaning = "Basic Application Confidentiality Profile"
        ds.DeidentificationMethodCodeSequence = Sequence([code])
        # Dates were replaced by dummies, not shifted (PS3.3 C.7.1.1).
        ds.LongitudinalTemporalInformationModified = "REMOVED"

    def _remove(self, dataset: Dataset, elem: DataElement) -> None:
        del dataset[elem.tag]

    def _zero(self, dataset: Dataset, elem: DataElement) -> None:
        if elem.keyword == "PatientID":
            elem.value = self.patient_id(str(elem.value or ""))
        elif elem.keyword == "StudyID":
            elem.value = "1"  # a dummy (Z allows one): the DICOMDIR STUDY record needs it
        else:
            elem.value = _empty(elem.VR)

    def _dummy(self, dataset: Dataset, elem: DataElement) -> None:
        if elem.VR == "UI":
            self._replace_uid(dataset, elem)
        elif elem.keyword == "PatientID":
            elem.value = self.patient_id(str(elem.value or ""))
        else:
            elem.value = _dummy(elem.VR)

    def _replace_uid(self, dataset: Dataset, elem: DataElement) -> None:
        if elem.VR != "UI" or elem.value in (None, ""):
            return
        if elem.VM > 1:
            elem.value = [self.uid(str(v)) for v in elem.value]
        else:
            elem.value = self.uid(str(elem.value))
