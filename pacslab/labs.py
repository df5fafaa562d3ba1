"""Wire the lab inbox watcher of ``pacslab serve`` and ``pacslab labs`` (issue 5)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from core.settings import Settings
from ingest.labs.profiles import parse_profile
from ingest.labs.watcher import LabInbox, LabWatcher
from ingest.labs.webhook import CriticalWebhook
from pacslab.wiring import build_audit, build_index
from storage.dropfolder import DropLimits
from storage.index.lab import SqlLabStore

__all__ = ["build_lab_watcher", "start_lab_watcher"]

logger = logging.getLogger(__name__)


def build_lab_watcher(
    settings: Settings, *, use_events: bool = True
) -> tuple[LabWatcher, Callable[[], None]]:
    """Build the watcher over every profile folder, and a function that releases it.

    Raises
    ------
    ValueError
        A profile names an unknown format or an invalid layout (refused at start-up).
    """
    lab = settings.lab
    profiles = {name: parse_profile(name, section) for name, section in lab.profiles.items()}
    index = build_index(settings, migrate=False)
    store = SqlLabStore(index, default_issuer=lab.patient_issuer)
    audit, secret = build_audit(settings, index)
    webhook = (
        CriticalWebhook(lab.critical_webhook_url, timeout_s=lab.critical_webhook_timeout_s)
        if lab.critical_webhook_url
        else None
    )
    inboxes = {
        settings.lab_inbox / name: LabInbox(
            settings.lab_inbox / name,
            profile,
            store,
            critical=lab.critical,
            local_timezone=lab.local_timezone,
            announce=webhook.announce if webhook is not None else None,
            audit=audit,
            patient_secret=secret,
            limits=DropLimits(
                max_bytes=profile.max_bytes or settings.ingest.lab_max_bytes,
                stable_s=settings.ingest.lab_stable_s,
                incomplete_s=settings.ingest.lab_incomplete_s,
                abandoned_s=settings.ingest.lab_abandoned_s,
            ),
        )
        for name, profile in profiles.items()
    }
    watcher = LabWatcher(
        inboxes,
        stable_s=settings.ingest.lab_stable_s,
        rescan_s=settings.ingest.lab_rescan_s,
        use_events=use_events,
    )

    def release() -> None:
        if webhook is not None:
            webhook.stop()
        audit.close()  # writes what is queued before the engine goes
        index.close()

    return watcher, release


def start_lab_watcher(settings: Settings) -> Callable[[], None]:
    """Start watching ``<data_dir>/inbox/lab/<profile>/``; returns the stopper."""
    watcher, release = build_lab_watcher(settings)
    watcher.start()

    def stop() -> None:
        watcher.stop()
        release()

    return stop
