"""Logging without patient data (STYLE.md §5).

A ``ContextVar`` holds the correlation id of the association, request, lab file or job
being handled; :class:`CorrelationFilter` stamps it on every record. Only the
composition root calls :func:`configure`; libraries (and our own modules) only create
``logging.getLogger(__name__)``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import uuid
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime

__all__ = ["CorrelationFilter", "configure", "correlation", "correlation_id", "new_id"]

correlation_id: ContextVar[str] = ContextVar("pacslab_correlation_id", default="-")


def new_id() -> str:
    """A short random id: enough to follow one association or file through the logs."""
    return uuid.uuid4().hex[:12]


@contextlib.contextmanager
def correlation(value: str | None = None) -> Iterator[str]:
    """Set the correlation id for the duration of a block."""
    cid = value or new_id()
    token = correlation_id.set(cid)
    try:
        yield cid
    finally:
        correlation_id.reset(token)


class CorrelationFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.cid = correlation_id.get()
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "cid": getattr(record, "cid", "-"),
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure(level: str = "INFO", *, json_format: bool = False) -> None:
    """Install one stderr handler on the root logger (composition root only)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(CorrelationFilter())
    if json_format:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s [%(cid)s] %(message)s")
        )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # pynetdicom logs every PDU at DEBUG and identifiers at INFO; keep it quiet and
    # let our handlers say what matters.
    quiet = max(logging.WARNING, logging.getLevelName(level))
    logging.getLogger("pynetdicom").setLevel(quiet)
    logging.getLogger("alembic").setLevel(quiet)
