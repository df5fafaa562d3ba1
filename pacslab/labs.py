"""Wire the lab inbox watcher of ``pacslab serve`` and ``pacslab labs`` (issue 5)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from core.settings import Settings
from ingest.labs.profiles import parse_profile
from ingest.labs.watcher import LabInbox, LabWatcher
from ingest.labs.webhook import CriticalWebhook
from pacslab.wiring import build_audit, build_index
from services.lab_results import LabResultService
from storage.dropfolder import DropLimits
from storage.index.lab import SqlLabStore

__all__ = ["build_analyzer_links", "build_lab_watcher", "start_analyzer_links", "start_lab_watcher"]

logger = logging.getLogger(__name__)


class _LabStack:
    """What every way lab results arrive (inbox files, live analyzer links) files them
    with: one :class:`LabResultService` over the index, the lab store with the
    hospital's default patient issuer (so one patient is one Patient whichever way the
    result came), the action log, the critical limits and the critical-value webhook."""

    def __init__(self, settings: Settings) -> None:
        lab = settings.lab
        self.index = build_index(settings, migrate=False)
        store = SqlLabStore(self.index, default_issuer=lab.patient_issuer)
        self.audit, secret = build_audit(settings, self.index)
        self.webhook = (
            CriticalWebhook(lab.critical_webhook_url, timeout_s=lab.critical_webhook_timeout_s)
            if lab.critical_webhook_url
            else None
        )
        self.results = LabResultService(
            store,
            audit=self.audit,
            patient_secret=secret,
            critical=lab.critical,
            local_timezone=lab.local_timezone,
            announce=self.webhook.announce if self.webhook is not None else None,
        )

    def release(self) -> None:
        if self.webhook is not None:
            self.webhook.stop()
        self.audit.close()  # writes what is queued before the engine goes
        self.index.close()


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
    stack = _LabStack(settings)
    inboxes = {
        settings.lab_inbox / name: LabInbox(
            settings.lab_inbox / name,
            profile,
            stack.results,
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

    return watcher, stack.release


def start_lab_watcher(settings: Settings) -> Callable[[], None]:
    """Start watching ``<data_dir>/inbox/lab/<profile>/``; returns the stopper."""
    watcher, release = build_lab_watcher(settings)
    watcher.start()

    def stop() -> None:
        watcher.stop()
        release()

    return stop


def build_analyzer_links(
    settings: Settings,
) -> tuple[list[Any], Callable[[], None]]:
    """Build one link per configured analyzer (issue 18), not yet started.

    Returns the link shells (each with ``start``/``stop`` and ``.link``, the
    :class:`~ingest.labs.links.AnalyzerLink`) and a function that releases the
    shared index. Every link's status is registered in
    :data:`services.analyzers.REGISTRY` for the API and ``/metrics``.
    """
    from ingest.labs.e1381 import LinkTimers
    from ingest.labs.links import AnalyzerLink
    from ingest.labs.links.session import AstmSession
    from ingest.labs.links.tcp import TcpClientLink, TcpServerLink
    from services.analyzers import REGISTRY, AnalyzerService, LinkStatus
    from storage.index.orders import SqlOrderStore

    stack = _LabStack(settings)
    orders = SqlOrderStore(stack.index)
    shells: list[Any] = []
    for section in settings.analyzers:
        status = REGISTRY.add(LinkStatus(section.name, section.protocol, section.link))
        service = AnalyzerService(
            section.name,
            stack.results,
            orders=orders,
            test_codes=section.test_codes,
            status=status,
        )
        folder = settings.data_dir / "links" / section.name
        if section.protocol == "hl7-mllp":
            from ingest.labs.links.mllp import Hl7Session, MllpResultServer

            hl7 = Hl7Session(section, service, folder=folder)
            if section.order_port:
                REGISTRY.set_download(section.name, hl7.download)
            shells.append(
                MllpResultServer(
                    hl7,
                    section.host,
                    section.port,
                    idle_timeout_s=section.idle_timeout_s,
                    allowed_sources=section.allowed_sources,
                )
            )
            continue
        session = AstmSession(section, service, folder=folder)
        timers = LinkTimers(
            reply_s=section.reply_timeout_s,
            frame_s=section.frame_timeout_s,
            busy_s=section.busy_wait_s,
            retries=section.retries,
        )
        link = AnalyzerLink(section.name, session, status, timers=timers)

        def download(
            specimen: str, session: AstmSession = session, link: AnalyzerLink = link
        ) -> bool:
            message = session.download(specimen)
            if message is None:
                return False
            link.send(message)
            return True

        REGISTRY.set_download(section.name, download)
        if section.link == "tcp-server":
            shells.append(
                TcpServerLink(
                    link,
                    section.host,
                    section.port,
                    allowed_sources=section.allowed_sources,
                    idle_timeout_s=section.idle_timeout_s,
                )
            )
        elif section.link == "tcp-client":
            shells.append(
                TcpClientLink(link, section.host, section.port, reconnect_s=section.reconnect_s)
            )
        else:
            from ingest.labs.links.serial import SerialLink

            shells.append(
                SerialLink(
                    link,
                    section.device,
                    baudrate=section.baudrate,
                    reconnect_s=section.reconnect_s,
                )
            )

    def release() -> None:
        for section in settings.analyzers:
            REGISTRY.remove(section.name)
        stack.release()

    return shells, release


def start_analyzer_links(settings: Settings) -> Callable[[], None]:
    """Start every configured analyzer link; returns the stopper."""
    shells, release = build_analyzer_links(settings)
    for shell in shells:
        shell.start()

    def stop() -> None:
        for shell in shells:
            shell.stop()
        release()

    return stop
