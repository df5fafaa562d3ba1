"""FastAPI application factory (STYLE.md §1: ``create_app(settings)``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from api.routes import tiles, viewer
from core.settings import Settings
from storage.index.sql import SqlIndex

__all__ = ["create_app"]


def create_app(settings: Settings, *, index: SqlIndex | None = None) -> FastAPI:
    own_index = index is None
    idx = index or SqlIndex(settings.index.model_copy(update={"migrate": False}))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if own_index:
            idx.close()

    app = FastAPI(
        title="pacslab",
        version="0.1.0",
        lifespan=lifespan,
        description="Imaging and lab data service: DICOMweb, FHIR R4, IIIF, DZI.",
    )
    app.state.settings = settings
    app.state.index = idx
    app.include_router(tiles.iiif_router)
    app.include_router(tiles.dzi_router)
    app.include_router(viewer.router)
    viewer.mount_static(app)

    @app.get("/health", tags=["ops"])
    def health() -> dict[str, object]:
        ok = idx.ping()
        return {"status": "ok" if ok else "degraded", "index": ok}

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    def metrics() -> str:
        lines = []
        for name, value in sorted(idx.counts().items()):
            metric = f"pacslab_{name}"
            lines.append(f"# TYPE {metric} gauge\n{metric} {value}")
        return "\n".join(lines) + "\n" + tiles.tile_service_of(app).latency.exposition()

    return app
