"""Watched lab inboxes: ``<data_dir>/inbox/lab/<profile>/`` (I/O shell).

Each folder is bound to a profile (:mod:`ingest.labs.profiles`). Files arrive by
any means (SMB share, SFTP, an analyzer's export job); filesystem events (watchdog:
inotify on Linux) wake us at once, and a periodic rescan catches what events miss
(network shares, overflowed event queues, files present at start-up).

A file is read only when complete (:mod:`ingest.labs.inbox`), then:

1. hashed (SHA-256 of the bytes);
2. if the journal knows the hash: a file ingested before → recorded as a
   duplicate and filed under ``processed/`` with a summary saying so; a file
   journaled but still here (we crashed between commit and move) → only moved;
3. else parsed: a :class:`~core.errors.LabMessageError` writes
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
import hashlib
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from core.audit import AuditEntry, patient_key
from core.errors import LabMessageError, OutOfResourcesError
from core.logging import correlation, correlation_id
from core.settings import LabCriticalLimit
from ingest.labs.inbox import Stability, filed_name, is_candidate, is_partial
from ingest.labs.parsers import detect
from ingest.labs.profiles import InboxProfile, parse_file
from ingest.labs.results import error_report, plan_results, summary
from storage.audit import AuditLog
from storage.lab import LabResultStore, NewLabFile, NewLabResult, OrderLookup, StoredLabResult

__all__ = ["FileOutcome", "LabInbox", "LabWatcher"]

logger = logging.getLogger(__name__)

PROCESSED = "processed"
REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class FileOutcome:
    """What happened to one file.

    ``status``: ``ingested``; ``duplicate`` (hash already ingested); ``recovered``
    (journaled before a crash, now moved); ``rejected``; ``gone`` (vanished before
    we read it); ``deferred`` (index unavailable, left in the inbox for later).
    """

    name: str
    status: Literal["ingested", "duplicate", "recovered", "rejected", "gone", "deferred"]
    sha256: str = ""
    results: int = 0
    destination: Path | None = None


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_json(path: Path, body: Mapping[str, Any]) -> None:
    """Write ``body`` beside the filed file, atomically (temp name, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as fp:
        json.dump(body, fp, ensure_ascii=False, indent=2, default=str)
        fp.flush()
        os.fsync(fp.fileno())
    os.replace(tmp, path)


class LabInbox:
    """Reads and files the files of one profile folder.

    Parameters
    ----------
    folder : Path
        ``<data_dir>/inbox/lab/<profile>``; ``processed/`` and ``rejected/`` are
        created inside it.
    profile : InboxProfile
    store : LabResultStore
    critical : mapping of test code to LabCriticalLimit
    local_timezone : str
    announce : callable, optional
        Called with the new critical results and the results held as conflicts
        (``review == "conflict"``) after their commit; errors are logged, never
        raised (a side effect).
    order_lookup : OrderLookup, optional
        Links results to a known order at ingest; without it the store matches
        orders itself (placer/filler order number and the same patient).
    audit : AuditLog, optional
        The action log; every filed file appends to it (see the module docstring).
    patient_secret : bytes
        Keys the patient references of the log (:func:`core.audit.patient_key`).
    """

    def __init__(
        self,
        folder: Path,
        profile: InboxProfile,
        store: LabResultStore,
        *,
        critical: Mapping[str, LabCriticalLimit] | None = None,
        local_timezone: str = "UTC",
        announce: Callable[[tuple[StoredLabResult, ...]], None] | None = None,
        order_lookup: OrderLookup | None = None,
        audit: AuditLog | None = None,
        patient_secret: bytes = b"",
    ) -> None:
        self.folder = folder
        self.profile = profile
        self.store = store
        self.critical = dict(critical or {})
        self.local_timezone = local_timezone
        self.announce = announce
        self.order_lookup = order_lookup
        self.audit = audit
        self.patient_secret = patient_secret
        self.processed = folder / PROCESSED
        self.rejected = folder / REJECTED
        for sub in (folder, self.processed, self.rejected):
            sub.mkdir(parents=True, exist_ok=True)

    def reconcile(self) -> int:
        """Finish journal entries a crash left between "moved" and "marked filed".

        A committed file already in ``processed/`` only needs its entry marked; one
        still in the inbox is left for :meth:`process`, which moves it. Returns the
        number of entries marked.
        """
        marked = 0
        for state in self.store.unfiled(self.profile.name):
            if (self.folder / state.name).exists():
                continue
            if not (self.processed / state.name).exists():
                logger.warning("lab file %s was ingested, then removed by hand", state.sha256[:12])
            self.store.mark_filed(state.sha256)
            marked += 1
        return marked

    def candidates(self) -> Iterator[Path]:
        """Files in the folder that may be read once complete."""
        with os.scandir(self.folder) as entries:
            for entry in entries:
                if entry.is_file(follow_symlinks=False) and is_candidate(entry.name):
                    yield Path(entry.path)

    def process(self, path: Path) -> FileOutcome:
        """Ingest, file as duplicate, or reject one complete file."""
        name = path.name
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return FileOutcome(name, "gone")
        sha = hashlib.sha256(raw).hexdigest()
        with correlation(sha[:12]):
            try:
                return self._process(path, raw, sha)
            except OutOfResourcesError:
                logger.warning("lab file %s left in the inbox: index unavailable", sha[:12])
                return FileOutcome(name, "deferred", sha)

    def _process(self, path: Path, raw: bytes, sha: str) -> FileOutcome:
        name = path.name
        state = self.store.file_state(sha)
        if state is not None:
            return self._known(path, sha, state.status, state.name, state.summary_json)
        fmt: str | None = None
        try:
            with contextlib.suppress(LabMessageError):
                fmt = detect(raw) if self.profile.format == "auto" else self.profile.format
            fmt, parsed = parse_file(raw, self.profile)
            results = plan_results(
                parsed,
                file_sha256=sha,
                fmt=fmt,
                analyzer=self.profile.analyzer,
                patient_issuer=self.profile.patient_issuer,
                critical=self.critical,
                local_timezone=self.local_timezone,
            )
        except LabMessageError as exc:
            report = error_report(exc, name=name, sha256=sha, profile=self.profile.name, fmt=fmt)
            dest = self._file(path, self.rejected, sha, report, suffix=".error.json")
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
        body = summary(
            name=name,
            sha256=sha,
            profile=self.profile.name,
            fmt=fmt,
            parsed=parsed,
            results=results,
        )
        outcome = self.store.ingest_file(
            NewLabFile(
                sha256=sha,
                name=name,
                profile=self.profile.name,
                format=fmt,
                message_count=len(parsed.messages),
                summary_json=json.dumps(body, ensure_ascii=False),
                received_at=datetime.now(UTC),
            ),
            results,
            order_lookup=self.order_lookup,
        )
        if outcome.duplicate:  # another watcher committed the same bytes meanwhile
            state = self.store.file_state(sha)
            assert state is not None
            return self._known(path, sha, "filed", state.name, state.summary_json)
        body["new_versions"] = outcome.new_versions
        body["held_for_review"] = len(outcome.conflicts)  # another patient's specimen/test
        dest = self._file(path, self.processed, sha, body, suffix=".summary.json")
        self.store.mark_filed(sha)
        self._audit_results(sha, fmt, results, outcome.new_versions)
        for held in outcome.conflicts:  # issue 14: another patient's specimen/test, held
            self._audit(sha, "4", "held: specimen/test of another patient", fmt=fmt,
                        patient_id=held.patient_id, detail={"observation": held.observation_id,
                                                            "conflicts_with": held.conflict_with})
        logger.info(
            "lab file ingested (%s, %s): %d results, %d corrections/re-sends, %d critical",
            self.profile.name,
            fmt,
            outcome.results,
            outcome.new_versions,
            len(outcome.critical),
        )
        notices = outcome.critical + tuple(r for r in outcome.conflicts if not r.is_critical)
        if notices and self.announce is not None:
            try:
                self.announce(notices)
            except Exception:
                logger.error("announcing critical results failed", exc_info=True)
        return FileOutcome(name, "ingested", sha, outcome.results, dest)

    def _known(
        self, path: Path, sha: str, status: str, first_name: str, summary_json: str
    ) -> FileOutcome:
        name = path.name
        if status == "ingested" and not (self.processed / first_name).exists():
            # Committed before a crash, never moved: finish the job, nothing to ingest.
            body = json.loads(summary_json or "{}") | {"recovered": True}
            dest = self._file(path, self.processed, sha, body, suffix=".summary.json")
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
        dest = self._file(path, self.processed, sha, body, suffix=".summary.json")
        logger.info("lab file %s is a duplicate of an ingested file: not ingested", sha[:12])
        self._audit(sha, "0", "duplicate: not ingested", fmt=None,
                    detail={"duplicates_so_far": count})
        return FileOutcome(name, "duplicate", sha, destination=dest)

    def _audit_results(
        self, sha: str, fmt: str, results: Sequence[NewLabResult], new_versions: int
    ) -> None:
        """One entry per patient of the file (search by patient finds it), or one."""
        per_patient = Counter(r.patient_id for r in results if r.patient_id and not r.is_qc)
        qc = sum(1 for r in results if r.is_qc)
        base = {"new_versions": new_versions, "qc_results": qc}
        if not per_patient:
            self._audit(sha, "0", "ingested", fmt=fmt, detail=base | {"results": len(results)})
        for patient_id, count in sorted(per_patient.items()):
            self._audit(sha, "0", "ingested", fmt=fmt, patient_id=patient_id,
                        detail=base | {"results": count})

    def _audit(
        self,
        sha: str,
        outcome: str,
        desc: str,
        *,
        fmt: str | None,
        detail: Mapping[str, Any],
        patient_id: str = "",
    ) -> None:
        """Queue one action-log entry; a side effect, so it logs and carries on."""
        if self.audit is None:
            return
        try:
            self.audit.record(AuditEntry(
                action="C", event_type="lab.file", outcome=outcome, outcome_desc=desc[:64],
                agent=self.profile.name[:128], agent_type="system",
                source=f"inbox/lab/{self.folder.name}"[:64], resource=f"LabFile/{sha}",
                patient_key=patient_key(self.patient_secret, patient_id),
                correlation_id=correlation_id.get()[:32],
                detail=AuditEntry.details({"format": fmt or "", "analyzer":
                                           self.profile.analyzer, **detail}),
            ))
        except Exception:
            logger.error("lab file audit entry not recorded", exc_info=True)

    def _file(
        self, path: Path, folder: Path, sha: str, body: Mapping[str, Any], *, suffix: str
    ) -> Path:
        """Write the reason/summary, then move the file beside it."""
        name = filed_name(path.name, sha, lambda n: (folder / n).exists())
        body = dict(body) | {"filed_as": name, "filed_at": datetime.now(UTC).isoformat()}
        _write_json(folder / f"{name}{suffix}", body)
        dest = folder / name
        os.replace(path, dest)
        _fsync_dir(folder)
        _fsync_dir(path.parent)
        return dest


class _Events(FileSystemEventHandler):
    """watchdog callbacks: only note the path and wake the loop."""

    def __init__(self, watcher: LabWatcher) -> None:
        self.watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        kind = event.event_type
        if kind == "moved":
            src = os.fsdecode(event.src_path)
            dest = os.fsdecode(event.dest_path)
            self.watcher.notify(dest, renamed_from_partial=is_partial(os.path.basename(src)))
        elif kind in ("created", "modified", "closed"):
            self.watcher.notify(os.fsdecode(event.src_path))


class LabWatcher:
    """Watches every profile folder and feeds complete files to its :class:`LabInbox`.

    Parameters
    ----------
    inboxes : mapping of folder to LabInbox
    stable_s : float
        Quiet period before an unrenamed file is read (``IngestSettings.lab_stable_s``).
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
        self._stability = Stability(stable_s)
        self._pending: dict[str, LabInbox] = {}
        self._lock = threading.Lock()
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
        if inbox is None or not is_candidate(os.path.basename(path)):
            return
        with self._lock:
            self._pending[path] = inbox
            if renamed_from_partial:
                self._stability.renamed(path)
        self._wake.set()

    def rescan(self) -> None:
        """List every folder: the safety net for missed events."""
        for inbox in self.inboxes.values():
            try:
                for path in inbox.candidates():
                    self.notify(str(path))
            except OSError:
                logger.warning("cannot list lab inbox %s", inbox.folder, exc_info=True)

    # -- loop ----------------------------------------------------------------------

    def poll(self) -> list[FileOutcome]:
        """Check pending files once; process those that are complete."""
        with self._lock:
            pending = list(self._pending.items())
        done: list[FileOutcome] = []
        for path, inbox in pending:
            if self._stop.is_set():
                break
            try:
                st = os.stat(path)
            except FileNotFoundError:
                self._drop(path)
                continue
            ready = self._stability.observe(
                path,
                size=st.st_size,
                mtime_ns=st.st_mtime_ns,
                wall=time.time(),
                mono=time.monotonic(),
            )
            if not ready:
                continue
            self._drop(path)
            try:
                outcome = inbox.process(Path(path))
            except Exception:
                # A bug or an unexpected I/O error: leave the file, try again later.
                logger.error("lab file %s could not be processed", path, exc_info=True)
                continue
            done.append(outcome)
            self.outcomes.append(outcome)
            for callback in self.on_outcome:
                callback(outcome)
        return done

    def _drop(self, path: str) -> None:
        with self._lock:
            self._pending.pop(path, None)
            self._stability.forget(path)

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
        self.rescan()
        done: list[FileOutcome] = []
        while True:
            done.extend(self.poll())
            with self._lock:
                if not self._pending:
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
            with self._lock:
                busy = bool(self._pending)
            tick = max(0.01, min(self.stable_s / 4, 0.1)) if busy else self.rescan_s
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
