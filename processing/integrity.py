"""Instance job, first step: the stored original is intact (its SHA-256 is its key)."""

from __future__ import annotations

import hashlib

from core.errors import InvalidDatasetError
from storage.abc import OriginalStore, StoredInstance

__all__ = ["verify_original"]


def verify_original(
    store: OriginalStore, inst: StoredInstance, dataset_offset: int | None = None
) -> None:
    """Recompute the data set hash of the stored Part-10 file and compare with its key."""
    with store.open(inst.blob_key) as fp:
        head = fp.read(144)
        if len(head) < 144 or head[128:132] != b"DICM":
            raise InvalidDatasetError("stored original is not a Part-10 file")
        group_length = int.from_bytes(head[140:144], "little")
        fp.seek(144 + group_length if dataset_offset is None else dataset_offset)
        digest = hashlib.sha256()
        while chunk := fp.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != inst.blob_key:
        raise InvalidDatasetError("stored original does not match its content key")
