"""POST order status notices to the record system (the I/O shell of ``webhook`` jobs).

A status change writes a ``webhook`` job in the same transaction as the order
version (``storage.index.orders``), so nothing is lost between commit and POST. The
job worker runs it: a failure (timeout, refused, non-2xx) raises, the job is
retried with back-off (``processing.max_attempts``) and, if it keeps failing, left
``failed`` and logged. Nothing waits for it: not the modality, not the HL7 sender,
not the FHIR client.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from typing import Any

__all__ = ["WebhookError", "post_json"]

logger = logging.getLogger(__name__)


class WebhookError(OSError):
    """The receiver did not take the notice (a transient failure: retried)."""


def post_json(url: str, payload: dict[str, Any], *, timeout_s: float) -> int:
    """POST ``payload`` as JSON; return the HTTP status, or raise :class:`WebhookError`."""
    body = json.dumps(payload).encode("utf-8")
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        raise WebhookError(f"webhook answered {exc.code}") from exc
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise WebhookError(f"webhook unreachable: {type(exc).__name__}") from exc
    if not 200 <= status < 300:
        raise WebhookError(f"webhook answered {status}")
    return status
