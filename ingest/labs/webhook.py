"""Announce critical lab values and held results to a webhook (I/O shell; STYLE.md §5).

Each new critical result is POSTed as a small JSON notice naming the FHIR R4
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

from storage.lab import StoredLabResult

__all__ = ["CriticalWebhook", "conflict_notice", "critical_notice", "notices"]

logger = logging.getLogger(__name__)


def critical_notice(result: StoredLabResult) -> dict[str, Any]:
    """The JSON body announcing one critical result (pure, no patient data)."""
    return {
        "event": "lab-result.critical",
        "resourceType": "Observation",
        "id": result.observation_id,
        "reference": f"Observation/{result.observation_id}",
        "versionId": str(result.version),
        "lastUpdated": result.updated_at.isoformat(),
        "code": result.loinc or result.test_code,
        "system": "LN" if result.loinc else result.test_system,
        "value": result.value,
        "comparator": result.comparator or None,
        "unit": result.ucum_unit or result.unit,
        "reason": result.critical_reason,
        "specimen": result.specimen_id,
        "analyzer": result.analyzer,
    }


def conflict_notice(result: StoredLabResult) -> dict[str, Any]:
    """The JSON body announcing one held result (pure, no patient data).

    ``conflictsWith`` names the other patient's Observation of the same specimen and
    test (absent when only the order/specimen group was theirs).
    """
    body: dict[str, Any] = {
        "event": "lab-result.conflict",
        "resourceType": "Observation",
        "id": result.observation_id,
        "reference": f"Observation/{result.observation_id}",
        "versionId": str(result.version),
        "lastUpdated": result.updated_at.isoformat(),
        "reason": "specimen/test already reported for another patient; held for review",
        "specimen": result.specimen_id,
        "analyzer": result.analyzer,
    }
    if result.conflict_with:
        body["conflictsWith"] = f"Observation/{result.conflict_with}"
    return body


def notices(result: StoredLabResult) -> list[dict[str, Any]]:
    """What to announce about a new result: critical value, held conflict, or both."""
    out = []
    if result.is_critical:
        out.append(critical_notice(result))
    if result.review == "conflict":
        out.append(conflict_notice(result))
    return out


class CriticalWebhook:
    """POST :func:`critical_notice` bodies to ``url`` from a background thread.

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
