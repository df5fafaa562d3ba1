"""Background services of ``pacslab serve`` besides DICOM and HTTP: processing worker,
lab and order inboxes. Each runs in threads of the main process on embedded defaults."""

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
    from pacslab.worker_process import start_worker

    background.stoppers.append(start_worker(settings))
    if settings.lab.watch:
        from pacslab.labs import start_lab_watcher

        background.stoppers.append(start_lab_watcher(settings))
    return background
