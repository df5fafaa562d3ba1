"""Which storage SOP classes the receiver accepts beyond pynetdicom's list (issue 16 §5).

Old devices still send retired standard classes (PS3.6 Table A-1 marks them
"Retired"; PS3.4 B.5 no longer lists them), e.g. Ultrasound Image Storage
1.2.840.10008.5.1.4.1.1.6 from ultrasound machines of the 1990s, which DCMTK's
``storescp +xa`` and Orthanc accept. They are stored and served like any other
instance. Private classes are accepted only when named in the settings.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydicom._uid_dict import UID_dictionary

__all__ = ["RETIRED_STORAGE_CLASSES", "extra_storage_classes"]

#: Retired image/object storage SOP classes of PS3.6 Table A-1 (the 1.2.840.10008.5.1.4.1.1
#: branch and the RT "Trial" branch); not Storage Commitment or Print, which are services.
RETIRED_STORAGE_CLASSES: frozenset[str] = frozenset(
    uid
    for uid, (name, kind, _info, retired, _keyword) in UID_dictionary.items()
    if retired == "Retired"
    and kind == "SOP Class"
    and "Storage" in name
    and uid.startswith(("1.2.840.10008.5.1.4.1.1.", "1.2.840.10008.5.1.4.34."))
)


def extra_storage_classes(*, accept_retired: bool, private: Sequence[str]) -> list[str]:
    """SOP Class UIDs to add to the receiver's storage contexts, in a stable order."""
    out = sorted(RETIRED_STORAGE_CLASSES) if accept_retired else []
    out += [uid for uid in private if uid not in out]
    return out
