"""Wire issue 7 into an app: auth and audit middleware, the action log, signing, retention.

``create_app`` calls :func:`install_security` once, after its own routers and
middleware, so the two middlewares are the outermost layers (audit outside auth: a
refused request is logged too) and apply to every route, whichever branch added it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from api.audit import AuditMiddleware
from api.auth import Authenticator, AuthMiddleware, problem_body
from api.keys import ensure_hospital_cert
from api.routes import audit as audit_routes
from api.routes import signing as signing_routes
from core.errors import ServiceError
from core.settings import Settings
from services.sharing import ShareService
from storage.apikeys import ApiKeyStore
from storage.audit import AuditLog, load_secret
from storage.index.sql import SqlIndex
from storage.results import SignedResultStore
from storage.retention import RetentionStore
from storage.shares import ShareStore

__all__ = ["Security", "install_security"]

logger = logging.getLogger(__name__)


@dataclass
class Security:
    audit: AuditLog

    def close(self) -> None:
        self.audit.close()


def _service_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    if request.url.path.startswith("/fhir/"):
        outcome = {"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": exc.fhir_code, "diagnostics": str(exc) or exc.title}]}
        return JSONResponse(outcome, status_code=exc.http_status,
                            media_type="application/fhir+json")
    return Response(problem_body(exc, request.url.path), status_code=exc.http_status,
                    media_type="application/problem+json")


def install_security(app: FastAPI, settings: Settings, index: SqlIndex) -> Security:
    """Add the issue-7 routes, state and middleware to ``app``; return what to close."""
    assert settings.audit.patient_key_file is not None
    audit = AuditLog(index.engine, settings.audit, url=index.url)
    app.state.audit = audit
    app.state.patient_secret = load_secret(settings.audit.patient_key_file)
    app.state.signed_results = SignedResultStore(index.engine)
    app.state.retention = RetentionStore(index.engine, settings.retention)
    cert, key = ensure_hospital_cert(settings.signing)
    app.state.signing_cert, app.state.signing_key = cert, key
    app.state.shares = ShareService(ShareStore(index), audit=audit,
                                    patient_secret=app.state.patient_secret)
    app.include_router(audit_routes.router)
    app.include_router(signing_routes.router)
    if ServiceError not in app.exception_handlers:
        app.add_exception_handler(ServiceError, _service_error)

    authenticator = (
        Authenticator(settings.auth, ApiKeyStore(index.engine), shares=app.state.shares)
        if settings.auth.enabled else None
    )
    if not settings.auth.enabled:
        logger.warning("HTTP authentication is OFF (auth.enabled=false): every route is open")
    # add_middleware puts each new layer outside the previous: auth, then audit around it.
    app.add_middleware(AuthMiddleware, authenticator=authenticator, settings=settings.auth)
    app.add_middleware(AuditMiddleware, log=audit, secret=app.state.patient_secret,
                       settings=settings.auth)
    return Security(audit)
