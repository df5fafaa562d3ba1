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

from api.deps import LabResultsDep
from core.auth import Principal
from services.lab_results import resolution_json
from storage.lab import StoredLabResult

__all__ = ["router"]

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/lab", tags=["lab"])


class ResolveRequest(BaseModel):
    """Body of ``POST /lab/conflicts/{observation_id}/resolve``."""

    choice: Literal["accept", "discard"]


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


@router.get("/conflicts")
def list_conflicts(
    lab: LabResultsDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
) -> JSONResponse:
    """Results held because their specimen/test was another patient's, oldest first."""
    held, total = lab.conflicts(limit=limit, offset=offset)
    return JSONResponse({"total": total, "items": [_held_json(r) for r in held]})


@router.post("/conflicts/{observation_id}/resolve")
def resolve_conflict(
    observation_id: str, body: ResolveRequest, request: Request, lab: LabResultsDep
) -> JSONResponse:
    """Accept the held result as its patient's (the other patient's result of the same
    specimen/test is withdrawn) or discard it; audited with before and after."""
    principal = getattr(request.state, "principal", None)
    agent, kind = (
        (principal.subject, principal.kind)
        if isinstance(principal, Principal)
        else ("anonymous", "anonymous")
    )
    resolution = lab.resolve(
        observation_id,
        body.choice,
        agent=agent,
        agent_type=kind,
        source=request.client.host if request.client else "",
    )
    return JSONResponse(resolution_json(resolution))
