"""Prometheus metrics of the HTTP API: request counts and latency per route, tile latency.

A pure ASGI middleware (not ``BaseHTTPMiddleware``, which would buffer streamed
WADO-RS bodies) times each request to its last body byte. The route label is the
route's path template (``/dicomweb/studies/{study}``), never the URL, so UIDs do not
become label values and cardinality stays bounded. Each app has its own registry, so
that several apps in one process (tests) do not collide.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["HttpMetrics", "MetricsMiddleware", "render_gauges"]

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Tiles answer in milliseconds (a warm 256² tile ~1 ms), so finer buckets.
_TILE_BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class HttpMetrics:
    """The collectors of one app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "pacslab_http_requests",
            "HTTP requests handled, by method, route template and status code.",
            ("method", "route", "status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "pacslab_http_request_duration_seconds",
            "Time from request start to the last response byte, by method and route.",
            ("method", "route"),
            buckets=_BUCKETS,
            registry=self.registry,
        )

        self.tiles = Histogram(
            "pacslab_tile_request_duration_seconds",
            "Tile requests (IIIF, DZI) from parse to encoded bytes.",
            ("api", "status"),
            buckets=_TILE_BUCKETS,
            registry=self.registry,
        )

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def observe_tile(self, api: str, status: int, seconds: float) -> None:
        """One tile request of ``api`` (``iiif``, ``iiif_info``, ``dzi``, ...)."""
        self.tiles.labels(api, str(status)).observe(seconds)

    def exposition(self) -> str:
        return generate_latest(self.registry).decode("utf-8")


class MetricsMiddleware:
    """Count and time HTTP requests into :class:`HttpMetrics`."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path_format", None) or getattr(route, "path", None)
            self.metrics.observe(
                scope.get("method", ""),
                template or "<unmatched>",
                status,
                time.perf_counter() - started,
            )


def render_gauges(counts: Mapping[str, int], prefix: str = "pacslab_") -> str:
    """The index row counts as Prometheus gauges (text exposition format 0.0.4)."""
    lines = []
    for name, value in sorted(counts.items()):
        metric = f"{prefix}{name}"
        lines.append(f"# TYPE {metric} gauge\n{metric} {value}")
    return "\n".join(lines) + "\n"


Observer = Callable[[str, str, int, float], None]
