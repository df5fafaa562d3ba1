"""Person Name (PN) folding for matching, shared by QIDO-RS, C-FIND and FHIR (pure).

PS3.4 C.2.2.2.1.1 leaves case and accent sensitivity of PN matching to the
implementation. One rule serves every search of the service, so that a name found by
the worklist's C-FIND is found by QIDO-RS and FHIR with the same pattern: case folded
with Unicode case folding (not ASCII ``lower``, which is what SQLite's ``lower()`` does
and why ``TRẦN*`` used to find nothing), and accents removed after canonical
decomposition, ``Đ``/``đ`` (a letter of its own, not D with a mark) becoming ``d``.

:func:`person_name_key` is what the index stores beside each patient name (an indexed
column), and the same function turns a search pattern into the key's space, so a
prefix search is an index range scan.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["KEY_LENGTH", "fold_person_name", "name_words", "person_name_key"]

#: Longest stored key: a PN is at most 3 × 64 characters plus separators (PS3.5
#: Table 6.2-1); folding may lengthen it (``ß`` → ``ss``), so leave room.
KEY_LENGTH = 512


def fold_person_name(value: str, *, case: bool, accent: bool) -> str:
    """Normalize a PN value for comparison (PS3.4 C.2.2.2.1.1).

    Trailing empty components and spaces go; with ``case`` the text is case-folded;
    with ``accent`` combining marks are removed after canonical decomposition and
    ``Đ``/``đ`` become ``D``/``d``.
    """
    groups = [g.rstrip("^ ") for g in value.split("=")]
    text = "=".join(groups).rstrip("=")
    if accent and not text.isascii():
        text = text.replace("Đ", "D").replace("đ", "d")
        text = "".join(
            ch for ch in unicodedata.normalize("NFD", text) if not unicodedata.combining(ch)
        )
        text = unicodedata.normalize("NFC", text)
    if case:
        text = text.casefold()
    return text


def person_name_key(value: str) -> str:
    """The case- and accent-insensitive search key of a PN value or pattern.

    ``*`` and ``?`` pass through unchanged, so a wildcard pattern folded with this
    function matches keys folded with it (``TRẦN^THỊ LAN`` → ``tran^thi lan``,
    ``Trần*`` → ``tran*``).

    Examples
    --------
    >>> person_name_key("NGUYỄN^VĂN AN^^")
    'nguyen^van an'
    >>> person_name_key("Đỗ")
    'do'
    """
    return fold_person_name(value, case=True, accent=True)[:KEY_LENGTH]


_PARTS = re.compile(r"[\^= ]+")


def name_words(key: str) -> list[str]:
    """The distinct words of a folded name: its components (``^``), groups (``=``)
    and space-separated words, for "starts with any part" searches (PS3.18 8.3.4.1.1
    fuzzy matching, FHIR ``name``).

    Examples
    --------
    >>> name_words("tran^thi lan")
    ['tran', 'thi', 'lan']
    """
    return list(dict.fromkeys(w for w in _PARTS.split(key) if w))
