"""The scrub: stored originals re-hashed against their content keys in idle time.

Each original is stored under the SHA-256 of its data set (:mod:`storage.staging`), so
a file that rotted on disk, or was changed behind the service's back, no longer hashes
to its key (:func:`processing.integrity.verify_original`). That check used to be the
first step of every instance job, reading every instance again right after it arrived,
while the next ones were still arriving (issue 19). It is now a walk over the archive,
a few instances per idle turn of the worker and never while a series is arriving, like
a RAID or ZFS scrub; a full pass starts again after :data:`PASS_PAUSE_S`. Like theirs,
its speed is capped: each turn is followed by a pause that keeps its CPU (the hashing,
the index reads) to ``cpu_pct`` of one core, so an idle service stays idle (issue 21:
the scrub was two thirds of an idle ``pacslab serve``'s CPU).

A mismatch is logged as an ERROR with the SOP Instance UID and the content key (no
patient data) and counted; the original is left where it is for the operator
(PS3.4 GG: storage commitment also verifies it before it answers).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from core.errors import InvalidDatasetError, NotFoundError
from processing.integrity import verify_original
from storage.abc import OriginalStore

if TYPE_CHECKING:
    from storage.index.sql import SqlIndex

__all__ = ["PASS_PAUSE_S", "OriginalScrub"]

logger = logging.getLogger(__name__)

#: Seconds between the end of one full pass over the archive and the next.
PASS_PAUSE_S = 6 * 3600.0


class OriginalScrub:
    """Verify ``per_turn`` originals each time :meth:`step` is called (an idle hook)."""

    def __init__(
        self,
        index: SqlIndex,
        originals: OriginalStore,
        *,
        per_turn: int,
        cpu_pct: float = 100.0,
    ) -> None:
        self.index = index
        self.originals = originals
        self.per_turn = per_turn
        self.cpu_pct = cpu_pct
        self.cursor = 0  # the last instance row id verified in this pass
        self.verified = 0
        self.mismatched: list[str] = []  # SOP Instance UIDs found damaged
        self._resume_at = 0.0

    def step(self) -> int:
        """Verify the next ``per_turn`` originals unless a series is arriving or the
        pause after the last turn (its CPU budget) is not over; how many."""
        if self.per_turn <= 0 or time.monotonic() < self._resume_at:
            return 0
        started = time.thread_time()
        try:
            return self._step()
        finally:
            if self.cpu_pct < 100.0:
                spent = time.thread_time() - started
                pause = spent * (100.0 / self.cpu_pct - 1.0)
                self._resume_at = max(self._resume_at, time.monotonic() + pause)

    def _step(self) -> int:
        # Ingest first: a transfer in progress (or whose roll-up is still due) has the
        # disk and the CPU; the scrub waits for the archive to be quiet.
        if self.index.series_arriving():
            return 0
        page = self.index.instances_after(self.cursor, limit=self.per_turn)
        if not page:
            if self.cursor:
                logger.info("scrub pass done: %d originals verified", self.verified)
            self.cursor, self.verified = 0, 0
            self._resume_at = time.monotonic() + PASS_PAUSE_S
            return 0
        for row_id, inst in page:
            self.cursor = row_id
            try:
                verify_original(self.originals, inst)
            except InvalidDatasetError:
                self.mismatched.append(inst.sop_instance_uid)
                logger.error(
                    "stored original of instance %s (version %d) does not match its content key %s",
                    inst.sop_instance_uid,
                    inst.version,
                    inst.blob_key,
                )
            except (OSError, NotFoundError):
                # Removed since the page was read (retention) or missing: the latter
                # is as bad as a mismatch, but the former is normal; say which.
                if self.index.blob_referenced(inst.blob_key):
                    self.mismatched.append(inst.sop_instance_uid)
                    logger.error(
                        "stored original of instance %s (version %d) is missing",
                        inst.sop_instance_uid,
                        inst.version,
                    )
            self.verified += 1
        return len(page)
