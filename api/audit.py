"""The HTTP side of the action log: one entry per request that is not on the allow-list.

A pure ASGI middleware outside :class:`api.auth.AuthMiddleware`, so refused requests
(401/403) are logged too — failed access is what an auditor looks for first. The
entry names the caller (token subject or API key id), the path (never the query
values, which may hold names), the method as a FHIR R4 ``AuditEvent.action``, the
status as ``outcome`` and the peer address. The patient reference is the keyed hash
(:func:`core.audit.patient_key`) of what a route reported with :func:`set_audit_patient`,
or else of a ``patient``/``PatientID``/``patient.identifier`` query parameter.
"""

from __future__ import annotations

import logging
import urllib.parse
from typing import Any

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.audit import AuditEntry, action_for_method, outcome_for_http, patient_key
from core.auth import Principal, is_public
from core.logging import correlation_id
from core.settings import AuthSettings
from storage.audit import AuditLog

__all__ = ["AuditMiddleware", "patient_from_query", "set_audit_patient"]

logger = logging.getLogger(__name__)

_PATIENT_PARAMS = ("patient", "subject", "patient.identifier", "PatientID", "00100020")


def set_audit_patient(request: Request, patient_id: str, issuer: str = "") -> None:
    """Let the action log name the patient a route served (Patient ID and its issuer)."""
    request.state.audit_patient = (patient_id, issuer)


def patient_from_query(query: str) -> tuple[str, str] | None:
    """``(patient_id, issuer)`` from FHIR/QIDO query parameters, if one names a patient.

    ``system|value`` (FHIR token search) gives the issuer; ``Patient/x`` the id ``x``.
    """
    params = urllib.parse.parse_qs(query, keep_blank_values=False)
    for name in _PATIENT_PARAMS:
        values = params.get(name)
        if not values:
            continue
        value = values[0]
        if "|" in value:
            system, _, ident = value.partition("|")
            return ident, system
        return value.removeprefix("Patient/"), ""
    return None


class AuditMiddleware:
    """Pure ASGI: record who did what to which patient's data, and how it ended."""

    def __init__(self, app: ASGIApp, *, log: AuditLog, secret: bytes,
                 settings: AuthSettings) -> None:
        self.app = app
        self.log = log
        self.secret = secret
        self.public = list(settings.public_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_public(scope.get("path", ""), self.public):
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self._record(scope, status["code"])

    def _record(self, scope: Scope, status: int) -> None:
        try:
            state: dict[str, Any] = scope.get("state", {})
            principal = state.get("principal")
            if isinstance(principal, Principal):
                agent, agent_type = principal.subject, principal.kind
            else:
                agent, agent_type = "anonymous", "anonymous"
            query = scope.get("query_string", b"").decode("latin-1")
            key = str(state.get("audit_patient_key") or "")
            if not key:
                patient = state.get("audit_patient") or patient_from_query(query)
                key = patient_key(self.secret, patient[0], patient[1]) if patient else ""
            client = scope.get("client")
            method = scope.get("method", "GET")
            path = scope.get("path", "")
            detail: dict[str, Any] = {"method": method}
            names = sorted({k for k, _ in urllib.parse.parse_qsl(query)})
            if names:
                detail["query"] = names  # parameter names only: values may be PHI
            if "auth_error" in state:
                detail["refused"] = state["auth_error"]
            self.log.record(AuditEntry(
                action="E" if "/$" in path else action_for_method(method),
                event_type="rest",
                outcome=outcome_for_http(status),
                outcome_desc=f"HTTP {status}",
                agent=agent[:128],
                agent_type=agent_type,  # type: ignore[arg-type]
                source=f"{client[0]}" if client else "",
                resource=path[:256],
                patient_key=key,
                correlation_id=correlation_id.get()[:32],
                detail=AuditEntry.details(detail),
            ))
        except Exception:
            logger.error("could not record an HTTP audit entry", exc_info=True)
