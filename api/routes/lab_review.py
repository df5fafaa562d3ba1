"""Held lab results (issue 14): the needs-review list and its explicit resolution.

A result whose specimen and test (or order) were already reported for another patient
is stored but held (``storage/index/lab.py``). ``GET /lab/conflicts`` lists them,
oldest first, next to ``/orders/unmatched``; ``POST
/lab/conflicts/{observation_id}/resolve`` with ``{"choice": "accept" | "discard"}``
settles one. Moving a specimen to another patient is thus always an explicit act,
written to the action log with what each affected result was before and after
(versions, states and keyed patient references only: no identifier, no name).

Both routes fall under the ``admin`` scope (``core/auth.py``: no rule names ``/lab``).
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from core.audit import AuditEntry, patient_key
from core.auth import Principal
from core.logging import correlation_id
from storage.index.lab import SqlLabStore
from storage.lab import LabResolution, StoredLabResult

__all__ = ["router"]

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/lab", tags=["lab"])


class ResolveRequest(BaseModel):
    """Body of ``POST /lab/conflicts/{observation_id}/resolve``."""

    choice: Literal["accept", "discard"]


def _store(request: Request) -> SqlLabStore:
    store: SqlLabStore | None = getattr(request.app.state, "lab_store", None)
    if store is None:
        store = SqlLabStore(request.app.state.index)
        request.app.state.lab_store = store
    return store


def _patient_ref(pk: int | None) -> str | None:
    return f"Patient/{pk}" if pk is not None else None


def _held_json(r: StoredLabResult) -> dict[str, Any]:
    return {
        "observation": f"Observation/{r.observation_id}",
        "version": r.version,
        "review": r.review,
        "status": r.status,
        "patient": _patient_ref(r.patient_pk),
        "conflicts_with": f"Observation/{r.conflict_with}" if r.conflict_with else None,
        "other_patient": _patient_ref(r.conflict_patient_pk),
        "specimen": r.specimen_id,
        "test": {"system": r.test_system, "code": r.test_code, "display": r.test_display},
        "analyzer": r.analyzer,
        "file_sha256": r.file_sha256,
        "received_at": r.created_at.isoformat(),
    }


def _state(r: StoredLabResult | None) -> dict[str, Any] | None:
    """What the log keeps of one result version: no patient data, only references."""
    if r is None:
        return None
    return {
        "observation": r.observation_id,
        "version": r.version,
        "review": r.review,
        "status": r.status,
        "patient": _patient_ref(r.patient_pk),
    }


def _audit(request: Request, resolution: LabResolution) -> None:
    """One ``lab.resolve`` entry with before/after; a side effect (logs, never raises)."""
    log = getattr(request.app.state, "audit", None)
    if log is None:
        return
    try:
        principal = getattr(request.state, "principal", None)
        agent, kind = (
            (principal.subject, principal.kind)
            if isinstance(principal, Principal)
            else ("anonymous", "anonymous")
        )
        held = resolution.held_after
        secret: bytes = getattr(request.app.state, "patient_secret", b"")
        log.record(
            AuditEntry(
                action="U",
                event_type="lab.resolve",
                outcome="0",
                outcome_desc=f"held result {resolution.choice}ed"[:64],
                agent=agent[:128],
                agent_type=kind,  # type: ignore[arg-type]
                source=request.client.host if request.client else "",
                resource=f"Observation/{held.observation_id}",
                # Keyed as the inbox keys its lab.file entries, so one search finds both.
                patient_key=patient_key(secret, held.patient_id),
                correlation_id=correlation_id.get()[:32],
                detail=AuditEntry.details(
                    {
                        "choice": resolution.choice,
                        "held": {
                            "before": _state(resolution.held_before),
                            "after": _state(resolution.held_after),
                        },
                        "other": {
                            "before": _state(resolution.retired_before),
                            "after": _state(resolution.retired_after),
                        },
                    }
                ),
            )
        )
    except Exception:
        logger.error("lab resolution audit entry not recorded", exc_info=True)


@router.get("/conflicts")
def list_conflicts(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
) -> JSONResponse:
    """Results held because their specimen/test was another patient's, oldest first."""
    held, total = _store(request).conflicts(limit=limit, offset=offset)
    return JSONResponse({"total": total, "items": [_held_json(r) for r in held]})


@router.post("/conflicts/{observation_id}/resolve")
def resolve_conflict(observation_id: str, body: ResolveRequest, request: Request) -> JSONResponse:
    """Accept the held result as its patient's (the other patient's result of the same
    specimen/test is withdrawn) or discard it; audited with before and after."""
    resolution = _store(request).resolve(observation_id, body.choice)
    _audit(request, resolution)
    logger.info("held lab result %s: %s", observation_id, body.choice)
    return JSONResponse(
        {
            "choice": resolution.choice,
            "held": {
                "before": _state(resolution.held_before),
                "after": _state(resolution.held_after),
            },
            "other": {
                "before": _state(resolution.retired_before),
                "after": _state(resolution.retired_after),
            },
        }
    )
