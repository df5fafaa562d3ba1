"""The order inbox: HL7 v2 files dropped in ``<data_dir>/inbox/orders/``.

The folder is a :class:`storage.dropfolder.DropFolder`, the shell the lab inboxes
use too: only regular files inside it are read (symlinks, FIFOs, devices, sockets,
directories and odd names are set aside to ``rejected/`` once, with a reason, never
read), at most ``inbox_max_bytes``, and only once complete: renamed from a
temporary name (``.x``, ``x.tmp``, ``x.part``), or quiet (size, mtime and inode the
same on two looks ``stable_s`` apart), closed by its writer and, for a batch, ending
with its ``BTS``/``FTS`` (HL7 v2.5.1 2.10.3). The bytes are hashed again before any
message is applied: a file that changed while being read is read again.

Each message in it is applied with :class:`~worklist.orders.intake.Hl7OrderIntake`;
then the file moves to ``processed/``, or to ``rejected/`` with
``<name>.error.json`` giving, per message, the ACK code, HL7 Table 0357 code,
location and reason. The reason file is written atomically *before* the move.
Rejected files are kept as they came. Each message is logged to the action log by
the intake, with the file's SHA-256; a file without a message, or set aside unread,
gets an entry of its own. The service log gets hashes and counts, never file names
(they may carry patient data).

watchdog wakes the scanner on file events; a periodic rescan (``rescan_s``)
catches what events miss (network shares, events lost under load).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.dropfiles import hl7_incomplete, safe_name
from core.logging import correlation
from storage.dropfolder import PROCESSED, REJECTED, DropFile, DropFolder, DropLimits, SetAside
from worklist.orders.hl7v2 import split_batch

if TYPE_CHECKING:
    from worklist.orders.intake import Hl7OrderIntake

__all__ = ["OrderInbox"]

logger = logging.getLogger(__name__)


class OrderInbox:
    """Watch a folder for HL7 v2 order files and apply them.

    Parameters
    ----------
    folder : Path
        The inbox; ``processed/`` and ``rejected/`` are created inside it.
    intake : Hl7OrderIntake
        Applies messages.
    stable_s, rescan_s : float
        See the module docstring.
    clock : callable
        ``time.time``; tests may pass another (it serves as both clocks).
    limits : DropLimits, optional
        Size limit and waits; ``stable_s`` wins over its quiet period.
    """

    def __init__(
        self,
        folder: Path,
        intake: Hl7OrderIntake,
        *,
        stable_s: float = 1.0,
        rescan_s: float = 5.0,
        clock: Callable[[], float] = time.time,
        limits: DropLimits | None = None,
    ) -> None:
        self.folder = folder
        self.processed = folder / PROCESSED
        self.rejected = folder / REJECTED
        self.intake = intake
        self.stable_s = stable_s
        self.rescan_s = rescan_s
        self.clock = clock
        base = limits or DropLimits()
        self.drops = DropFolder(
            folder,
            DropLimits(
                max_bytes=base.max_bytes,
                stable_s=stable_s,
                incomplete_s=base.incomplete_s,
                abandoned_s=base.abandoned_s,
                two_looks=True,
            ),
            check=hl7_incomplete,
            clock=clock,
            mono=clock if clock is not time.time else time.monotonic,
        )
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._observer: Any = None

    # -- one pass (also what tests call) ----------------------------------------

    def scan(self) -> list[Path]:
        """Look at the inbox once; apply every complete file. Returns the files moved."""
        moved: list[Path] = []
        try:
            items: list[DropFile | SetAside] = list(self.drops.rescan())
        except FileNotFoundError:
            return moved
        items.extend(self.drops.poll())
        for item in items:
            try:
                target = self._handle(item)
            except Exception:
                # One file's failure never holds up the others: it is tried again at
                # the next rescan, and set aside after a few tries.
                logger.error("an order file could not be processed", exc_info=True)
                if not isinstance(item, DropFile):
                    continue
                aside = self.drops.failed(item.name, "could not be processed", sha256=item.sha256)
                if aside is None:
                    continue
                target = aside.destination
            if target is not None:
                moved.append(target)
        return moved

    def _handle(self, item: DropFile | SetAside) -> Path | None:
        where = f"inbox/{self.folder.name}"
        if isinstance(item, SetAside):
            ref = item.sha256 or safe_name(item.name, item.kind)
            self.intake.record_refused_file(ref, peer=where, reason=item.kind)
            return item.destination
        with correlation(item.sha256[:12]):
            return self._process(item, where)

    def _process(self, drop: DropFile, where: str) -> Path | None:
        sha = drop.sha256
        messages = split_batch(drop.raw)
        if not self.drops.unchanged(drop):
            # Read while still being written (or replaced): nothing applied yet.
            logger.warning("order file %s changed while being read: read again", sha[:12])
            self.drops.retry(drop.name)
            return None
        results = [
            self.intake.handle(m, source="hl7-file", peer=where, file_sha256=sha)
            for m in messages
        ]
        failed = [r for r in results if r.code != "AA"]
        if not results:
            # No message reached the intake, so the intake logged nothing.
            self.intake.record_refused_file(sha, peer=where, reason="no HL7 message")
            report: dict[str, Any] = {"file": drop.name, "reason": "no HL7 message in file"}
            return self._reject(drop, report)
        if failed:
            report = {
                "file": drop.name,
                "sha256": sha,
                "reason": failed[0].error.reason if failed[0].error else "refused",
                "messages": [
                    {
                        "control_id": r.control_id,
                        "ack": r.code,
                        "hl7_error_code": r.error.hl7_code if r.error else 0,
                        "where": r.error.where if r.error else None,
                        "reason": r.error.reason if r.error else "",
                        "orders": [o.id for o in r.orders],
                        # ADT: patient changes applied before the failing one (undoable)
                        "changes": [c.change_id for c in r.changes],
                    }
                    for r in results
                ],
            }
            return self._reject(drop, report)
        # Applied orders speak for themselves (order store, action log): no report.
        target = self.drops.file(drop.name, PROCESSED, sha, None)
        logger.info("order file %s processed (%d messages)", sha[:12], len(results))
        return target

    def _reject(self, drop: DropFile, report: dict[str, Any]) -> Path:
        target = self.drops.file(drop.name, REJECTED, drop.sha256, report, suffix=".error.json")
        logger.warning(
            "order file %s rejected (%d message(s))", drop.sha256[:12],
            len(report.get("messages", ())),
        )
        return target

    # -- background ---------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.scan()
            except Exception:
                logger.error("order inbox scan failed", exc_info=True)
            busy = self.drops.busy
            wait = self.rescan_s if not busy else min(self.rescan_s, self.stable_s or 0.1)
            self._wake.wait(wait)
            self._wake.clear()

    def start(self) -> OrderInbox:
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            from watchdog.events import FileSystemEvent, FileSystemEventHandler
            from watchdog.observers import Observer

            inbox = self

            class _Wake(FileSystemEventHandler):
                def on_any_event(self, event: FileSystemEvent) -> None:
                    inbox._wake.set()

            observer = Observer()
            observer.schedule(_Wake(), str(self.folder), recursive=False)
            observer.daemon = True
            observer.start()
            self._observer = observer
        except Exception:
            logger.warning("watchdog unavailable; polling the order inbox", exc_info=True)
        self._thread = threading.Thread(target=self._run, name="order-inbox", daemon=True)
        self._thread.start()
        logger.info("watching the order inbox for HL7 orders")
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=10)
