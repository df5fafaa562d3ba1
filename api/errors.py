"""HTTP rendering of errors (STYLE.md §3): problem+json, or OperationOutcome under /fhir.

Every :class:`core.errors.ServiceError` carries its HTTP status; this module only
renders it. Outside ``/fhir`` the body is ``application/problem+json`` (RFC 9457:
``type``, ``title``, ``status``, ``detail``, ``instance``); FHIR routes answer with an
``OperationOutcome`` whose ``issue.code`` is ``exc.fhir_code`` (FHIR R4
ValueSet issue-type, http://hl7.org/fhir/R4/operationoutcome.html). Request
validation errors are the client's fault: 400, never 500.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.fhir import FHIR_JSON, operation_outcome
from core.errors import ServiceError

__all__ = ["PROBLEM_JSON", "install_error_handlers", "problem_response"]

logger = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
FHIR_PREFIX = "/fhir"

# FHIR issue-type codes for plain HTTP statuses (routing, method, media type).
_HTTP_FHIR_CODES = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    406: "not-supported",
    409: "conflict",
    413: "too-costly",
    415: "not-supported",
    422: "invalid",
}


def _is_fhir(request: Request) -> bool:
    return request.url.path == FHIR_PREFIX or request.url.path.startswith(FHIR_PREFIX + "/")


def problem_response(
    request: Request,
    *,
    status: int,
    title: str,
    detail: str = "",
    type_: str = "about:blank",
    fhir_code: str = "processing",
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """Render one error for ``request``: OperationOutcome under /fhir, else problem+json."""
    if _is_fhir(request):
        severity = "error" if status < 500 else "fatal"
        body = operation_outcome(severity, fhir_code, detail or title)
        return JSONResponse(body, status_code=status, media_type=FHIR_JSON, headers=headers)
    problem: dict[str, Any] = {
        "type": type_,
        "title": title,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
    }
    return JSONResponse(problem, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _slug(title: str) -> str:
    return "-".join(title.lower().split())


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    if exc.http_status >= 500:
        logger.error("%s %s failed: %s", request.method, request.url.path, exc.title)
    return problem_response(
        request,
        status=exc.http_status,
        title=exc.title,
        detail=str(exc),
        type_=f"urn:pacslab:error:{_slug(exc.title)}",
        fhir_code=exc.fhir_code,
    )


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return problem_response(
        request,
        status=400,
        title="Invalid request",
        detail="; ".join(parts),
        type_="urn:pacslab:error:invalid-request",
        fhir_code="invalid",
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers) if exc.headers else None
    return problem_response(
        request,
        status=exc.status_code,
        title=_title(exc.status_code),
        detail=str(exc.detail) if exc.detail else "",
        fhir_code=_HTTP_FHIR_CODES.get(exc.status_code, "processing"),
        headers=headers,
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # A bug: log it with the traceback, say nothing about it to the peer.
    logger.error("%s %s: unhandled error", request.method, request.url.path, exc_info=exc)
    return problem_response(
        request, status=500, title="Internal server error", fhir_code="exception"
    )


def _title(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers on ``app`` (called by :func:`api.app.create_app`)."""
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
