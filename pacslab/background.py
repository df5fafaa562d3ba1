"""Background services of ``pacslab serve`` besides DICOM and HTTP: the processing
worker (a process of its own, :class:`pacslab.worker_process.WorkerProcess`), the lab
and order inboxes and analyzer links (threads of the main process)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from core.settings import Settings

__all__ = ["Background", "start_background"]

logger = logging.getLogger(__name__)


@dataclass
class Background:
    stoppers: list[Callable[[], None]] = field(default_factory=list)

    def stop(self) -> None:
        for stop in reversed(self.stoppers):
            try:
                stop()
            except Exception:
                logger.error("stopping a background service failed", exc_info=True)


def start_background(settings: Settings) -> Background:
    background = Background()
    from pacslab.worker_process import WorkerProcess

    background.stoppers.append(WorkerProcess(settings).start().stop)
    background.stoppers.append(start_orders(settings))
    if settings.lab.watch:
        from pacslab.labs import start_lab_watcher

        background.stoppers.append(start_lab_watcher(settings))
    if settings.analyzers:
        from pacslab.labs import start_analyzer_links

        background.stoppers.append(start_analyzer_links(settings))
    return background


def start_orders(settings: Settings) -> Callable[[], None]:
    """HL7 v2 order intake: the inbox folder, and MLLP unless ``orders.mllp_port`` is 0.

    ADT (patient updates, merges, identifier changes; IHE PIR) arrive the same ways and
    go to the patient identity service."""
    from pacslab.wiring import (
        build_audit,
        build_index,
        build_order_service,
        build_patient_identity,
    )
    from storage.dropfolder import DropLimits
    from worklist.orders.intake import Hl7OrderIntake
    from worklist.orders.mllp import MllpServer
    from worklist.orders.watcher import OrderInbox

    index = build_index(settings, migrate=False)
    audit, secret = build_audit(settings, index)
    patients = build_patient_identity(settings, index, audit=audit, patient_secret=secret)
    intake = Hl7OrderIntake(
        build_order_service(settings, index, audit=audit, patient_secret=secret),
        audit=audit,
        patient_secret=secret,
        patients=patients,
    )
    section = settings.orders
    inbox = OrderInbox(
        settings.orders_inbox,
        intake,
        stable_s=section.stable_s,
        rescan_s=section.rescan_s,
        limits=DropLimits(
            max_bytes=section.inbox_max_bytes,
            incomplete_s=section.incomplete_s,
            abandoned_s=section.abandoned_s,
        ),
    ).start()
    mllp = (
        MllpServer(
            intake,
            section.mllp_host,
            section.mllp_port,
            idle_timeout_s=section.mllp_idle_timeout_s,
            message_timeout_s=section.mllp_message_timeout_s,
            max_message=section.mllp_max_message_bytes,
            drain_bytes=section.mllp_drain_bytes,
            allowed_sources=section.mllp_allowed_sources,
            max_connections=section.mllp_max_connections,
        ).start()
        if section.mllp_port
        else None
    )

    def stop() -> None:
        if mllp is not None:
            mllp.stop()
        inbox.stop()
        audit.close()  # writes what is queued before the engine goes
        index.close()

    return stop
