"""Announce critical lab values and held results to a webhook (I/O shell; STYLE.md §5).

What is announced is :func:`services.lab_results.notices` (pure); this module only
delivers it. Each new critical result is POSTed as a small JSON notice naming the FHIR R4
``Observation`` (id and ``meta.versionId``) so the receiver fetches the resource
over the API, the "id-only" payload of FHIR R4 Subscription (§ subscription.html
``payload``): no patient data travels in the notice. Delivery happens on a daemon
thread from a bounded queue; a failure or a full queue is logged and ingestion
never waits for it. The ``_lastUpdated`` search (``_tag=critical``) is the feed a
receiver can always catch up from.

A result held because its specimen/test was reported for another patient first
(issue 14, ``review == "conflict"``) is announced as ``lab-result.conflict``, naming
the held Observation and the other patient's (``_tag=needs-review`` is its feed).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import urllib.error
import urllib.request
from typing import Any

from services.lab_results import notices
from storage.lab import StoredLabResult

__all__ = ["CriticalWebhook"]

logger = logging.getLogger(__name__)


class CriticalWebhook:
    """POST :func:`~services.lab_results.notices` bodies to ``url`` from a background thread.

    Parameters
    ----------
    url : str
    timeout_s : float
        Per request.
    max_pending : int
        Notices beyond this are dropped (and logged): the feed still has them.
    """

    def __init__(self, url: str, *, timeout_s: float = 5.0, max_pending: int = 10_000) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=max_pending)
        self._thread = threading.Thread(target=self._run, name="lab-webhook", daemon=True)
        self.sent = 0
        self.failed = 0
        self._thread.start()

    def announce(self, results: tuple[StoredLabResult, ...]) -> None:
        """Queue the :func:`notices` of each result; never blocks, never raises."""
        for result in results:
            for body in notices(result):
                try:
                    self._queue.put_nowait(body)
                except queue.Full:
                    self.failed += 1
                    logger.warning(
                        "lab webhook queue full; notice for Observation/%s dropped",
                        result.observation_id,
                    )

    def _run(self) -> None:
        while True:
            body = self._queue.get()
            if body is None:
                return
            request = urllib.request.Request(
                self.url,
                data=json.dumps(body).encode("utf-8"),
                headers={"Content-Type": "application/json"},
                method="POST",
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    response.read()
                self.sent += 1
            except (urllib.error.URLError, OSError, ValueError) as exc:
                self.failed += 1
                logger.warning("critical webhook for %s failed: %s", body["reference"], exc)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Deliver what is queued (within ``timeout_s``) and stop the thread."""
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            return
        self._thread.join(timeout_s)
