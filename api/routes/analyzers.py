"""Analyzer links (issue 18): configuration and live state, order download.

``GET /admin/analyzers`` lists every configured analyzer with its link settings
(no secrets: there are none) and its state: connected, last message, counters,
last error. ``POST /admin/analyzers/{name}/orders`` pushes the orders of a
received specimen to the analyzer (E1394 order download). Both need the
``admin`` scope (core/auth.py's default rule). :func:`render_link_metrics` adds
the same state to ``/metrics``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from core.errors import NotFoundError, OutOfResourcesError
from core.settings import Settings
from services.analyzers import REGISTRY

__all__ = ["render_link_metrics", "router"]

router = APIRouter(prefix="/admin/analyzers", tags=["analyzers"])


class OrderDownload(BaseModel):
    """The specimen whose orders go to the analyzer."""

    specimen_id: str = Field(min_length=1, max_length=64)


def _config(settings: Settings) -> dict[str, dict[str, Any]]:
    return {a.name: a.model_dump() for a in settings.analyzers}


def _one(name: str, config: dict[str, Any]) -> dict[str, Any]:
    status = REGISTRY.get(name)
    state = status.snapshot() if status is not None else {"state": "not running"}
    state.pop("name", None)
    return {"name": name, "config": config, "status": state}


@router.get("")
def list_analyzers(request: Request) -> dict[str, Any]:
    """Every configured analyzer, its link settings and its live state."""
    configs = _config(request.app.state.settings)
    return {"analyzers": [_one(name, cfg) for name, cfg in sorted(configs.items())]}


@router.get("/{name}")
def get_analyzer(name: str, request: Request) -> dict[str, Any]:
    configs = _config(request.app.state.settings)
    if name not in configs:
        raise NotFoundError(f"no analyzer {name!r}")
    return _one(name, configs[name])


@router.post("/{name}/orders", status_code=202)
def download_orders(name: str, body: OrderDownload, request: Request) -> dict[str, Any]:
    """Queue the order download of ``specimen_id`` to the analyzer (202: queued)."""
    if name not in _config(request.app.state.settings):
        raise NotFoundError(f"no analyzer {name!r}")
    try:
        queued = REGISTRY.download(name, body.specimen_id)
    except ConnectionError as exc:
        raise OutOfResourcesError("the analyzer did not take the orders") from exc
    if not queued:
        raise NotFoundError("no open order for this specimen")
    return {"analyzer": name, "queued": True}


_COUNTERS = (
    "messages_received",
    "messages_sent",
    "results_stored",
    "queries_answered",
    "rejected",
    "errors",
)


def render_link_metrics(prefix: str = "pacslab_analyzer_") -> str:
    """Link state as Prometheus metrics (text exposition format 0.0.4)."""
    links = REGISTRY.all()
    if not links:
        return ""
    lines = [f"# TYPE {prefix}connected gauge"]
    lines += [f'{prefix}connected{{analyzer="{s.name}"}} {int(s.connected)}' for s in links]
    lines.append(f"# TYPE {prefix}last_message_timestamp_seconds gauge")
    for s in links:
        stamp = s.last_message_at.timestamp() if s.last_message_at else 0
        lines.append(f'{prefix}last_message_timestamp_seconds{{analyzer="{s.name}"}} {stamp:.3f}')
    for counter in _COUNTERS:
        metric = f"{prefix}{counter}_total"
        lines.append(f"# TYPE {metric} counter")
        lines += [f'{metric}{{analyzer="{s.name}"}} {getattr(s, counter)}' for s in links]
    return "\n".join(lines) + "\n"
