"""The order inbox: HL7 v2 files dropped in ``<data_dir>/inbox/orders/``.

A file is read only once it is complete: writers either write ``name.tmp`` (or
``.part``, or a dot-file) and rename it, or leave it unchanged for ``stable_s``
(same size and mtime on two looks, and mtime at least ``stable_s`` old). Each
message in it is applied with :class:`~worklist.orders.intake.Hl7OrderIntake`;
then the file moves to ``processed/``, or to ``rejected/`` with
``<name>.error.json`` giving, per message, the ACK code, HL7 Table 0357 code,
location and reason. Rejected files are kept as they came. Each message is
logged to the action log by the intake, with the file's SHA-256; a file without a
message gets an entry of its own.

watchdog wakes the scanner on file events; a periodic rescan (``rescan_s``)
catches what events miss (network shares, events lost under load).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.logging import correlation
from worklist.orders.hl7v2 import split_batch

if TYPE_CHECKING:
    from worklist.orders.intake import Hl7OrderIntake

__all__ = ["OrderInbox"]

logger = logging.getLogger(__name__)

_SKIP_SUFFIXES = (".tmp", ".part", ".partial", ".error.json")


def _unique(target: Path) -> Path:
    if not target.exists():
        return target
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for n in range(1, 10_000):
        candidate = target.with_name(f"{target.stem}.{stamp}.{n}{target.suffix}")
        if not candidate.exists():
            return candidate
    raise FileExistsError(target)


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
        ``time.time``; tests may pass another.
    """

    def __init__(
        self,
        folder: Path,
        intake: Hl7OrderIntake,
        *,
        stable_s: float = 1.0,
        rescan_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.folder = folder
        self.processed = folder / "processed"
        self.rejected = folder / "rejected"
        self.intake = intake
        self.stable_s = stable_s
        self.rescan_s = rescan_s
        self.clock = clock
        self._seen: dict[str, tuple[int, int]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._observer: Any = None

    # -- one pass (also what tests call) ----------------------------------------

    def scan(self) -> list[Path]:
        """Look at the inbox once; apply every stable file. Returns the files moved."""
        moved: list[Path] = []
        now = self.clock()
        try:
            entries = sorted(self.folder.iterdir())
        except FileNotFoundError:
            return moved
        present = set()
        for path in entries:
            name = path.name
            if name.startswith(".") or name.endswith(_SKIP_SUFFIXES) or not path.is_file():
                continue
            present.add(name)
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            sig = (st.st_size, st.st_mtime_ns)
            previous = self._seen.get(name)
            self._seen[name] = sig
            settled = now - st.st_mtime >= self.stable_s
            if self.stable_s > 0 and (previous != sig or not settled):
                continue
            moved.append(self._process(path))
            self._seen.pop(name, None)
        for name in list(self._seen):
            if name not in present:
                del self._seen[name]
        return moved

    def _process(self, path: Path) -> Path:
        with correlation():
            raw = path.read_bytes()
            sha = hashlib.sha256(raw).hexdigest()
            where = f"inbox/{self.folder.name}"
            results = [
                self.intake.handle(m, source="hl7-file", peer=where, file_sha256=sha)
                for m in split_batch(raw)
            ]
            failed = [r for r in results if r.code != "AA"]
            if not results:
                # No message reached the intake, so the intake logged nothing.
                self.intake.record_refused_file(sha, peer=where, reason="no HL7 message")
                report: dict[str, Any] = {"file": path.name, "reason": "no HL7 message in file"}
                return self._reject(path, report)
            if failed:
                report = {
                    "file": path.name,
                    "reason": failed[0].error.reason if failed[0].error else "refused",
                    "messages": [
                        {
                            "control_id": r.control_id,
                            "ack": r.code,
                            "hl7_error_code": r.error.hl7_code if r.error else 0,
                            "where": r.error.where if r.error else None,
                            "reason": r.error.reason if r.error else "",
                            "orders": [o.id for o in r.orders],
                        }
                        for r in results
                    ],
                }
                return self._reject(path, report)
            self.processed.mkdir(parents=True, exist_ok=True)
            target = _unique(self.processed / path.name)
            os.replace(path, target)
            logger.info("order file %s processed (%d messages)", path.name, len(results))
            return target

    def _reject(self, path: Path, report: dict[str, Any]) -> Path:
        self.rejected.mkdir(parents=True, exist_ok=True)
        target = _unique(self.rejected / path.name)
        os.replace(path, target)
        reason = target.with_name(target.name + ".error.json")
        reason.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        logger.warning("order file %s rejected: %s", path.name, report["reason"])
        return target

    # -- background ---------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.scan()
            except Exception:
                logger.error("order inbox scan failed", exc_info=True)
            wait = self.rescan_s if not self._seen else min(self.rescan_s, self.stable_s or 0.1)
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
        logger.info("watching %s for HL7 orders", self.folder)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=10)
