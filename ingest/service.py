"""IngestService: what the DICOM receiver does with an instance once it is on disk.

The durable path itself (validate, fsync, publish, index, quarantine) is
:class:`storage.archive.Archive`, shared with STOW-RS; this service adds the
receiver's bookkeeping and logs without patient data.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

from core.errors import ServiceError
from storage.archive import Accepted, Archive
from storage.staging import StagedFile

__all__ = ["IngestService"]

logger = logging.getLogger(__name__)


class IngestService:
    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def accept_instance(self, staged: StagedFile, *, calling_ae: str) -> Accepted:
        """Store and index one received instance (PS3.4 B.2.2), or raise ServiceError."""
        try:
            accepted = self.archive.accept(staged, calling_ae=calling_ae)
        except ServiceError as exc:
            with self._lock:
                self.counts["refused"] += 1
            logger.warning(
                "instance %s from %s refused: %s (%s)",
                staged.sop_instance_uid,
                calling_ae,
                exc.title,
                exc,
            )
            raise
        with self._lock:
            self.counts[accepted.outcome.status] += 1
        logger.debug(
            "instance %s from %s %s", staged.sop_instance_uid, calling_ae, accepted.outcome.status
        )
        return accepted
