"""FastAPI application factory (STYLE.md §1: ``create_app(settings)``).

Routers are mounted under fixed prefixes, one module each in ``api/routes/``:
``/dicomweb`` (PS3.18 QIDO-RS, WADO-RS, STOW-RS) and ``/fhir`` (FHIR R4). The tile
services plug in beside them: ``/iiif`` (IIIF Image API), ``/dzi`` (Deep Zoom) and
``/viewer`` come from ``api/routes/tiles.py`` and are added to :data:`ROUTERS` when
the pyramids exist.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import PlainTextResponse

from api.docs import install_docs
from api.errors import install_error_handlers
from api.metrics import HttpMetrics, MetricsMiddleware, render_gauges
from api.routes import (
    analyzers,
    dicom_admin,
    dicomweb,
    export,
    fhir,
    fhir_lab,
    fhir_orders,
    lab_review,
    ohif,
    patients,
    rejections,
    shares,
    tiles,
    viewer,
)
from api.routes.analyzers import render_link_metrics
from api.security import install_security
from api.state import build_api_services
from core import __version__
from core.settings import Settings
from services.commitment_reports import commitment_gauges
from services.forwarding import queue_gauges
from services.patients import PatientIdentityService
from services.rejection import RejectionService
from storage.archive import Archive
from storage.index.sql import SqlIndex

__all__ = ["ROUTERS", "create_app", "install_cors"]

logger = logging.getLogger(__name__)

#: Every router of the API, with its fixed prefix (the prefix is part of the router).
#: Tiles add ``/iiif``, ``/dzi`` and ``/viewer`` routers here.
ROUTERS: tuple[APIRouter, ...] = (
    dicomweb.router,
    fhir.router,
    fhir_lab.router,
    lab_review.router,  # /lab/conflicts: held lab results (issue 14)
    tiles.iiif_router,
    tiles.dzi_router,
    viewer.router,
    analyzers.router,
    ohif.router,  # OHIF Viewer v3 under /ohif (issue 20)
    dicom_admin.router,  # issue 16: C-MOVE destinations, forwarding and commitment queues
    rejections.router,  # issue 17: IHE IOCM rejections under /admin/rejections
    patients.fhir_router,  # issue 17: PUT /fhir/Patient/{id}, POST /fhir/Patient/$merge
    patients.admin_router,  # issue 17: /admin/patients/changes (review, undo)
    shares.router,  # issue 17: share links (/admin/shares)
    shares.viewer_router,  # issue 17: /viewer/shared and /viewer/api/share
    export.router,  # issue 17.3: /export, study/series ZIP with DICOMDIR
)


def create_app(
    settings: Settings, *, index: SqlIndex | None = None, archive: Archive | None = None
) -> FastAPI:
    """The HTTP API over ``settings``' index and stores.

    Parameters
    ----------
    settings
        The process's settings (the composition root built them).
    index, archive
        Already-built stores to share (``pacslab serve``, tests); built from
        ``settings`` when omitted, and then closed on shutdown.
    """
    own_index = index is None
    idx = index or SqlIndex(settings.index.model_copy(update={"migrate": False}))
    own_archive = archive is None
    arc = archive or Archive.from_settings(settings, idx)
    # IHE IOCM: KOS rejection notes stored by STOW-RS are applied (an archive built by
    # pacslab.wiring has this hook already).
    iocm = RejectionService(idx, arc.originals, retention=settings.retention)
    if own_archive:
        arc.hooks.append(iocm)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if own_archive:
            arc.close()
        security.close()
        if own_index:
            idx.close()

    app = FastAPI(
        title="pacslab",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,  # install_docs: Swagger UI from local files, not a CDN
        redoc_url=None,
        description="Imaging and lab data service: DICOMweb, FHIR R4, IIIF, DZI.",
    )
    app.state.settings = settings
    app.state.index = idx
    app.state.archive = arc
    metrics = HttpMetrics()
    app.state.metrics = metrics
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    install_docs(app)  # before /static: its assets are mounted under /static/swagger-ui
    viewer.mount_static(app)

    @app.get("/health", tags=["ops"])
    def health() -> dict[str, object]:
        ok = idx.ping()
        return {"status": "ok" if ok else "degraded", "index": ok}

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    def metrics_text() -> PlainTextResponse:
        try:
            # Issue 16: the forwarding queue and the owed commitment reports.
            gauges = render_gauges(idx.counts()) + queue_gauges(idx) + commitment_gauges(idx)
        except Exception:
            # A metrics scrape must not fail because the index is away (STYLE.md §5).
            logger.error("index counts unavailable for /metrics", exc_info=True)
            gauges = ""
        return PlainTextResponse(
            metrics.exposition() + gauges + render_link_metrics() + _atna_metrics(app),
            media_type="text/plain; version=0.0.4; charset=utf-8",
        )

    fhir_orders.include(app)  # FHIR ServiceRequest orders and the unmatched-studies list
    # Last, so authentication and the action log wrap every route above (issue 7).
    security = install_security(app, settings, idx)
    # The services the routes use (api/state.py), built once here, the API's
    # composition root (STYLE.md §1), over the action log security opened.
    app.state.services = build_api_services(
        settings, idx, audit=security.audit, patient_secret=app.state.patient_secret
    )
    iocm.audit = app.state.audit
    # Patient identity (issue 17), on the action log install_security opened.
    app.state.patients = PatientIdentityService(
        idx,
        audit=app.state.audit,
        patient_secret=app.state.patient_secret,
        default_issuer=settings.lab.patient_issuer,
    )
    install_cors(app, settings.http.cors_origins)
    return app


def _atna_metrics(app: FastAPI) -> str:
    """The ATNA sender's counters (issue 17), when a collector is configured."""
    sender = getattr(getattr(app.state, "audit", None), "atna", None)
    return str(sender.exposition()) if sender is not None else ""


#: Request headers a cross-origin viewer may send (beyond the CORS-safelisted ones):
#: a bearer token (RFC 6750), byte ranges, conditional and caching requests.
CORS_ALLOW_HEADERS = (
    "Authorization",
    "Range",
    "If-None-Match",
    "If-Modified-Since",
    "Cache-Control",
    "Prefer",
    "X-Requested-With",
)
#: Response headers its script may read: DICOMweb and IIIF clients need the multipart
#: boundary and length, Content-Location / Location (STOW-RS, FHIR), Link (paging),
#: Warning (QIDO-RS unsupported keys, PS3.18 8.3.4.1) and WWW-Authenticate (RFC 6750 3).
CORS_EXPOSE_HEADERS = (
    "Content-Type",
    "Content-Length",
    "Content-Location",
    "Content-Range",
    "Accept-Ranges",
    "Location",
    "Link",
    "ETag",
    "Last-Modified",
    "Warning",
    "WWW-Authenticate",
    "Content-Disposition",  # /export: the archive's file name
    "X-Export-Id",  # /export: the id to poll /export/progress/{id} with
)


def install_cors(app: FastAPI, origins: list[str]) -> None:
    """Let browser pages of ``origins`` call the API (Fetch standard, CORS protocol).

    Starlette's CORSMiddleware, added outermost: it answers preflight ``OPTIONS``
    requests itself, before authentication (a browser never sends a token with a
    preflight, so they were refused with 401: issue 13.7), and adds the headers to
    every response, 401s included, so a viewer can read ``WWW-Authenticate``. No
    origins, no middleware: same-origin only. Credentials (cookies) are not allowed:
    the API authenticates with bearer tokens, which need no credentials mode.
    """
    if not origins:
        return
    app.add_middleware(
        CORSMiddleware,
        allow_origins=origins,
        allow_methods=["GET", "HEAD", "POST", "PUT", "DELETE"],
        allow_headers=list(CORS_ALLOW_HEADERS),
        expose_headers=list(CORS_EXPOSE_HEADERS),
        allow_credentials=False,
        max_age=600,
    )
    logger.info("CORS allowed for %d origin(s)", len(origins))
