"""Instance job, first step: the stored original is intact (its SHA-256 is its key)."""

from __future__ import annotations

import hashlib

from core.errors import InvalidDatasetError
from storage.abc import OriginalStore, StoredInstance
from storage.staging import read_file_meta

__all__ = ["verify_original"]


def verify_original(store: OriginalStore, inst: StoredInstance) -> None:
    """Recompute the data set hash of the stored Part-10 file and compare with its key.

    The key covers the data set only (see :mod:`storage.staging`), so hashing starts
    where the File Meta Information ends.
    """
    with store.open(inst.blob_key) as fp:
        head = fp.read(65536)
        try:
            _meta, offset = read_file_meta(head)
        except InvalidDatasetError as exc:
            raise InvalidDatasetError("stored original is not a Part-10 file") from exc
        digest = hashlib.sha256(memoryview(head)[offset:])
        while chunk := fp.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != inst.blob_key:
        raise InvalidDatasetError("stored original does not match its content key")
