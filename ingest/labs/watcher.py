"""Watched lab inboxes: ``<data_dir>/inbox/lab/<profile>/`` (I/O shell).

Each folder is bound to a profile (:mod:`ingest.labs.profiles`). Files arrive by
any means (SMB share, SFTP, an analyzer's export job); filesystem events (watchdog:
inotify on Linux) wake us at once, and a periodic rescan catches what events miss
(network shares, overflowed event queues, files present at start-up).

Each folder is a :class:`storage.dropfolder.DropFolder`: only regular files inside
it are read (symlinks, FIFOs, devices, sockets, directories and odd names are set
aside to ``rejected/`` once, with a reason, never read), at most the profile's
``max_bytes``, and only once complete (renamed from a temporary name, or quiet,
closed by its writer and ending as its format says: :func:`incomplete_reason`).
A complete file is:

1. hashed (SHA-256 of the bytes);
2. if the journal knows the hash: a file ingested before → recorded as a
   duplicate and filed under ``processed/`` with a summary saying so; a file
   journaled but still here (we crashed between commit and move) → only moved;
3. else parsed, then hashed again: a file that changed while being read is read
   again, never filed; a :class:`~core.errors.LabMessageError` writes
   ``rejected/<name>.error.json`` (what, where, why) and moves the file there;
4. else its results **and** its hash are committed in one transaction
   (:meth:`storage.lab.LabResultStore.ingest_file`), then the summary is written
   and the file moved to ``processed/``, then the journal entry is marked filed.

Each filed file appends to the action log (issue 7 §2; with ``audit``): one entry per
patient whose results it brought (only the keyed patient reference,
:func:`core.audit.patient_key`), one without a patient for a file with none (QC
only), a rejection or a duplicate. The profile is the agent (the device that wrote
the file), the inbox folder where it came from, the file's SHA-256 the resource.

A kill at any point leaves the file in the inbox (nothing or everything committed:
step 2 finishes the job) or in ``processed/``/``rejected/`` with everything done.
Moves are ``os.replace`` within one file system, followed by a directory fsync.

One watcher per inbox: two processes watching the same folder would not corrupt
anything (the hash is unique in the journal) but would race on the moves.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from core.dropfiles import name_verdict, safe_name
from core.errors import LabMessageError, OutOfResourcesError
from core.logging import correlation
from ingest.labs.parsers import detect
from ingest.labs.profiles import InboxProfile, incomplete_reason, parse_file
from services.lab_results import LabResultService, LabSource, error_report
from storage.dropfolder import PROCESSED, REJECTED, DropFile, DropFolder, DropLimits, SetAside

__all__ = ["FileOutcome", "LabInbox", "LabWatcher"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FileOutcome:
    """What happened to one file.

    ``status``: ``ingested``; ``duplicate`` (hash already ingested); ``recovered``
    (journaled before a crash, now moved); ``rejected``; ``gone`` (vanished before
    we read it); ``deferred`` (index unavailable, left in the inbox for later);
    ``changed`` (the file changed while being read: it is read again).
    """

    name: str
    status: Literal[
        "ingested", "duplicate", "recovered", "rejected", "gone", "deferred", "changed"
    ]
    sha256: str = ""
    results: int = 0
    destination: Path | None = None


class LabInbox:
    """Reads and files the files of one profile folder (the drop-folder shell).

    What to do with the results of a complete file (match them to a patient and
    an order, hold a conflict, file, audit, announce) is
    :class:`services.lab_results.LabResultService`'s; this shell reads, moves and
    writes the summary or reason file beside each file.

    Parameters
    ----------
    folder : Path
        ``<data_dir>/inbox/lab/<profile>``; ``processed/`` and ``rejected/`` are
        created inside it.
    profile : InboxProfile
    service : LabResultService
        Files the results and writes the action log (see the module docstring).
    limits : DropLimits, optional
        Size limit and waits of the folder (from ``IngestSettings``).
    """

    def __init__(
        self,
        folder: Path,
        profile: InboxProfile,
        service: LabResultService,
        *,
        limits: DropLimits | None = None,
    ) -> None:
        self.folder = folder
        self.profile = profile
        self.service = service
        self.store = service.store
        self.source = LabSource.inbox(
            profile.name,
            folder.name,
            analyzer=profile.analyzer,
            patient_issuer=profile.patient_issuer,
        )
        self.processed = folder / PROCESSED
        self.rejected = folder / REJECTED
        self.drops = DropFolder(
            folder,
            limits or DropLimits(),
            check=lambda raw: incomplete_reason(raw, profile),
        )

    def reconcile(self) -> int:
        """Finish journal entries a crash left between "moved" and "marked filed".

        A committed file already in ``processed/`` only needs its entry marked; one
        still in the inbox is left for :meth:`process`, which moves it. Returns the
        number of entries marked.
        """
        marked = 0
        for state in self.store.unfiled(self.profile.name):
            # lexists: a symlink left under that name is never followed.
            if os.path.lexists(self.folder / state.name):
                continue
            if not os.path.lexists(self.processed / state.name):
                logger.warning("lab file %s was ingested, then removed by hand", state.sha256[:12])
            self.store.mark_filed(state.sha256)
            marked += 1
        return marked

    def process(self, path: Path) -> FileOutcome:
        """Ingest, file as duplicate, or reject one file now (it is taken as complete)."""
        item = self.drops.read(path.name)
        if item is None:
            return FileOutcome(path.name, "gone")
        return self.handle(item)

    def handle(self, item: DropFile | SetAside) -> FileOutcome:
        """What the drop folder gave: a complete file, or an entry it set aside."""
        if isinstance(item, SetAside):
            return self._set_aside(item)
        with correlation(item.sha256[:12]):
            try:
                return self._process(item)
            except OutOfResourcesError:
                # Left in the inbox; the next rescan offers it again.
                logger.warning(
                    "lab file %s left in the inbox: index unavailable", item.sha256[:12]
                )
                return FileOutcome(item.name, "deferred", item.sha256)

    def _set_aside(self, item: SetAside) -> FileOutcome:
        """An entry the drop folder refused (not a regular file, odd name, too large…)."""
        ref = item.sha256 or safe_name(item.name, item.kind)
        logger.info("lab inbox %s: entry %s rejected (%s)", self.profile.name, ref[:24], item.kind)
        self._audit(ref, "4", f"rejected: {item.kind}", fmt=None, detail={"kind": item.kind})
        return FileOutcome(item.name, "rejected", item.sha256, destination=item.destination)

    def _process(self, drop: DropFile) -> FileOutcome:
        path, raw, sha, name = drop.path, drop.raw, drop.sha256, drop.name
        state = self.store.file_state(sha)
        if state is not None:
            return self._known(path, sha, state.status, state.name, state.summary_json)
        fmt: str | None = None
        try:
            with contextlib.suppress(LabMessageError):
                fmt = detect(raw) if self.profile.format == "auto" else self.profile.format
            fmt, parsed = parse_file(raw, self.profile)
        except LabMessageError as exc:
            if not self.drops.unchanged(drop):
                return self._changed(drop)
            report = error_report(exc, name=name, sha256=sha, profile=self.profile.name, fmt=fmt)
            dest = self._file(path, REJECTED, sha, report, suffix=".error.json")
            # The reason can quote values from the file (patient data): it goes to the
            # reason file next to the rejected file, the log gets only the position.
            logger.info(
                "lab file %s rejected (%s): %s at %s",
                sha[:12], self.profile.name, exc.title, exc.where or "?",
            )
            # ``where`` is a position (message, line); the reason may quote values.
            self._audit(sha, "4", f"rejected: {exc.title}", fmt=fmt,
                        detail={"where": exc.where or ""})
            return FileOutcome(name, "rejected", sha, destination=dest)
        if not self.drops.unchanged(drop):
            # Read while still being written (or replaced): nothing is committed.
            return self._changed(drop)
        filing = self.service.file(parsed, sha256=sha, name=name, fmt=fmt, source=self.source)
        if filing.outcome.duplicate:  # another watcher committed the same bytes meanwhile
            state = self.store.file_state(sha)
            assert state is not None
            return self._known(path, sha, "filed", state.name, state.summary_json)
        dest = self._file(path, PROCESSED, sha, filing.filed_summary, suffix=".summary.json")
        self.store.mark_filed(sha)
        self.service.publish(filing)  # the action log, then the webhook
        return FileOutcome(name, "ingested", sha, filing.outcome.results, dest)

    def _known(
        self, path: Path, sha: str, status: str, first_name: str, summary_json: str
    ) -> FileOutcome:
        name = path.name
        if status == "ingested" and not (self.processed / first_name).exists():
            # Committed before a crash, never moved: finish the job, nothing to ingest.
            body = json.loads(summary_json or "{}") | {"recovered": True}
            dest = self._file(path, PROCESSED, sha, body, suffix=".summary.json")
            self.store.mark_filed(sha)
            logger.info("lab file %s journaled before a restart: moved", sha[:12])
            # Its entries may have been queued and lost with the process that committed.
            self._audit(sha, "0", "ingested before a restart", fmt=None, detail={})
            return FileOutcome(name, "recovered", sha, destination=dest)
        if status == "ingested":
            self.store.mark_filed(sha)
        count = self.store.record_duplicate(sha)
        body = {
            "status": "duplicate",
            "file": name,
            "sha256": sha,
            "profile": self.profile.name,
            "duplicate_of": first_name,
            "duplicates_so_far": count,
            "results": 0,
        }
        dest = self._file(path, PROCESSED, sha, body, suffix=".summary.json")
        logger.info("lab file %s is a duplicate of an ingested file: not ingested", sha[:12])
        self._audit(sha, "0", "duplicate: not ingested", fmt=None,
                    detail={"duplicates_so_far": count})
        return FileOutcome(name, "duplicate", sha, destination=dest)

    def _audit(
        self, sha: str, outcome: str, desc: str, *, fmt: str | None, detail: Mapping[str, Any]
    ) -> None:
        """One entry of the action log about this inbox's file ``sha`` (never raises)."""
        self.service.record(self.source, sha, outcome, desc, fmt=fmt, detail=detail)

    def _changed(self, drop: DropFile) -> FileOutcome:
        logger.warning("lab file %s changed while being read: read again", drop.sha256[:12])
        self.drops.retry(drop.name)
        return FileOutcome(drop.name, "changed", drop.sha256)

    def _file(
        self, path: Path, dest: str, sha: str, body: Mapping[str, Any], *, suffix: str
    ) -> Path:
        """Write the reason/summary (atomically), then move the file beside it."""
        return self.drops.file(path.name, dest, sha, body, suffix=suffix)


class _Events(FileSystemEventHandler):
    """watchdog callbacks: only note the path and wake the loop."""

    def __init__(self, watcher: LabWatcher) -> None:
        self.watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return  # a directory dropped in is set aside by the next rescan
        kind = event.event_type
        if kind == "moved":
            src = os.path.basename(os.fsdecode(event.src_path))
            dest = os.fsdecode(event.dest_path)
            self.watcher.notify(dest, renamed_from_partial=name_verdict(src).kind == "wait")
        elif kind in ("created", "modified", "closed"):
            self.watcher.notify(os.fsdecode(event.src_path))


class LabWatcher:
    """Watches every profile folder and feeds complete files to its :class:`LabInbox`.

    One loop serves every profile; nothing in it blocks on an entry (FIFOs are never
    opened, files are opened non-blocking) and an error on one file is logged and
    never holds up another file or profile.

    Parameters
    ----------
    inboxes : mapping of folder to LabInbox
    stable_s : float
        Quiet period before an unrenamed file is read (``IngestSettings.lab_stable_s``;
        each inbox's own limits decide, this sets the loop's tick).
    rescan_s : float
        Period of the safety-net rescan (``IngestSettings.lab_rescan_s``).
    use_events : bool
        Use filesystem events; without them the rescan alone finds files.
    """

    def __init__(
        self,
        inboxes: Mapping[Path, LabInbox],
        *,
        stable_s: float,
        rescan_s: float,
        use_events: bool = True,
    ) -> None:
        self.inboxes = {Path(os.path.abspath(k)): v for k, v in inboxes.items()}
        self.stable_s = stable_s
        self.rescan_s = rescan_s
        self.use_events = use_events
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._observer: Any = None
        self.outcomes: list[FileOutcome] = []
        self.on_outcome: list[Callable[[FileOutcome], None]] = []

    # -- events ----------------------------------------------------------------

    def notify(self, path: str, *, renamed_from_partial: bool = False) -> None:
        """A file appeared or changed (from watchdog, or a caller that knows)."""
        inbox = self.inboxes.get(Path(os.path.dirname(os.path.abspath(path))))
        if inbox is None:
            return
        inbox.drops.notify(os.path.basename(path), renamed=renamed_from_partial)
        self._wake.set()

    def rescan(self) -> list[FileOutcome]:
        """List every folder: the safety net for missed events (sets odd entries aside)."""
        done: list[FileOutcome] = []
        for inbox in self.inboxes.values():
            try:
                for item in inbox.drops.rescan():
                    done.append(self._record(inbox.handle(item)))
            except Exception:
                logger.warning("cannot list lab inbox %s", inbox.profile.name, exc_info=True)
        return done

    @property
    def busy(self) -> bool:
        """Some file is waiting to be complete."""
        return any(inbox.drops.busy for inbox in self.inboxes.values())

    # -- loop ----------------------------------------------------------------------

    def poll(self) -> list[FileOutcome]:
        """Check pending files once; process those that are complete."""
        done: list[FileOutcome] = []
        for inbox in self.inboxes.values():
            items = inbox.drops.poll()
            while not self._stop.is_set():
                item = next(items, None)
                if item is None:
                    break
                try:
                    outcome = inbox.handle(item)
                except Exception:
                    # A bug or an unexpected I/O error: this file waits for the next
                    # rescan, and is set aside after a few tries; the other files and
                    # profiles go on.
                    logger.error(
                        "a lab file of %s could not be processed", inbox.profile.name,
                        exc_info=True,
                    )
                    failed = self._failed(inbox, item)
                    if failed is None:
                        continue
                    outcome = failed
                if outcome.status != "changed":
                    done.append(self._record(outcome))
        return done

    def _failed(self, inbox: LabInbox, item: DropFile | SetAside) -> FileOutcome | None:
        """Count a failure; the last try sets the file aside (see DropFolder.failed)."""
        if not isinstance(item, DropFile):
            return None
        try:
            aside = inbox.drops.failed(
                item.name, "could not be processed (see the service log)", sha256=item.sha256
            )
            return inbox.handle(aside) if aside is not None else None
        except Exception:
            logger.error("a lab file of %s could not be set aside", inbox.profile.name,
                         exc_info=True)
            return None

    def _record(self, outcome: FileOutcome) -> FileOutcome:
        self.outcomes.append(outcome)
        for callback in self.on_outcome:
            callback(outcome)
        return outcome

    def reconcile(self) -> None:
        """Finish what a crash interrupted (see :meth:`LabInbox.reconcile`)."""
        for inbox in self.inboxes.values():
            try:
                count = inbox.reconcile()
            except Exception:
                logger.error("reconciling lab inbox %s failed", inbox.folder, exc_info=True)
                continue
            if count:
                logger.info(
                    "lab inbox %s: %d file(s) filed before a restart", inbox.profile.name, count
                )

    def run_until_idle(self, timeout_s: float = 30.0) -> list[FileOutcome]:
        """Reconcile, rescan and poll until nothing is pending (for tools and tests)."""
        deadline = time.monotonic() + timeout_s
        self.reconcile()
        done = self.rescan()
        while True:
            done.extend(self.poll())
            if not self.busy:
                return done
            if time.monotonic() > deadline:
                return done
            time.sleep(min(0.05, max(self.stable_s / 4, 0.005)))

    def _loop(self) -> None:
        self.reconcile()
        next_rescan = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_rescan:
                self.rescan()
                next_rescan = now + self.rescan_s
            self.poll()
            tick = max(0.01, min(self.stable_s / 4, 0.1)) if self.busy else self.rescan_s
            self._wake.wait(min(tick, max(0.0, next_rescan - time.monotonic())))
            self._wake.clear()

    def start(self) -> None:
        """Start watching (events and rescans) on background threads."""
        if self.use_events:
            observer = Observer()
            handler = _Events(self)
            for folder in self.inboxes:
                # Recursive although only the folder itself is read: our own moves to
                # processed/ then arrive as paired IN_MOVED_FROM/IN_MOVED_TO. Unpaired,
                # each IN_MOVED_FROM holds watchdog's event queue for 0.5 s (its
                # inotify move grouper), delaying every drop behind it.
                observer.schedule(handler, str(folder), recursive=True)
            observer.daemon = True
            observer.start()
            self._observer = observer
        self._thread = threading.Thread(target=self._loop, name="lab-watcher", daemon=True)
        self._thread.start()
        logger.info(
            "watching %d lab inbox(es): %s",
            len(self.inboxes),
            ", ".join(i.profile.name for i in self.inboxes.values()),
        )

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop after the file being processed, if any."""
        self._stop.set()
        self._wake.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout_s)
        if self._thread is not None:
            self._thread.join(timeout_s)
