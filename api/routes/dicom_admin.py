"""Admin API of issue 16: C-MOVE destinations, the forwarding queue, owed commitment reports.

Under ``/admin`` (scope ``admin``, core/auth.py); every request is written to the
action log by the security middleware, with its principal, method and path, so each
change says who did it. Routes only translate: the use cases are in
:mod:`services.destinations`, :mod:`services.forwarding` and :mod:`services.commitment_reports`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import BaseModel, Field

from api.deps import IndexDep, SettingsDep
from services.commitment_reports import report_jobs, report_summary, retry_report
from services.destinations import DestinationDirectory
from services.forwarding import queue_jobs, queue_summary, retry_dead_letter

__all__ = ["router"]

router = APIRouter(prefix="/admin", tags=["admin"])


class DestinationPublic(BaseModel):
    ae_title: str
    host: str
    port: int
    source: Literal["settings", "api"]


class DestinationIn(BaseModel):
    host: str = Field(min_length=1, max_length=255)
    port: int = Field(ge=1, le=65535)


def _who(request: Request) -> str:
    principal = getattr(request.state, "principal", None)
    return str(getattr(principal, "subject", "") or "anonymous")


@router.get("/dicom/destinations", response_model=list[DestinationPublic])
def list_destinations(index: IndexDep, settings: SettingsDep) -> list[dict[str, Any]]:
    """C-MOVE destinations (and storage commitment report addresses) by AE title."""
    directory = DestinationDirectory(index, settings.qr.destinations)
    return [
        {"ae_title": d.ae_title, "host": d.host, "port": d.port, "source": d.source}
        for d in directory.list()
    ]


@router.put("/dicom/destinations/{ae_title}", status_code=200,
            response_model=DestinationPublic)
def put_destination(ae_title: str, body: DestinationIn, request: Request, response: Response,
                    index: IndexDep, settings: SettingsDep) -> dict[str, Any]:
    """Add or change a destination; 201 when it is new."""
    directory = DestinationDirectory(index, settings.qr.destinations)
    created = directory.put(ae_title, body.host, body.port, by=_who(request))
    if created:
        response.status_code = 201
    return {"ae_title": ae_title.strip(), "host": body.host, "port": body.port, "source": "api"}


@router.delete("/dicom/destinations/{ae_title}", status_code=204)
def delete_destination(ae_title: str, index: IndexDep, settings: SettingsDep) -> Response:
    DestinationDirectory(index, settings.qr.destinations).delete(ae_title)
    return Response(status_code=204)


@router.get("/forwarding")
def forwarding_queue(index: IndexDep, settings: SettingsDep) -> dict[str, Any]:
    """Jobs per destination and status; ``failed`` is the dead-letter list."""
    return {"destinations": queue_summary(index, list(settings.forwarding.destinations))}


@router.get("/forwarding/jobs")
def forwarding_jobs(
    index: IndexDep,
    status: Annotated[Literal["pending", "running", "done", "failed"] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[dict[str, Any]]:
    """The newest forwarding jobs with their last error."""
    return queue_jobs(index, status=status, limit=limit)


@router.post("/forwarding/jobs/{job_id}/retry", status_code=202)
def retry_forwarding_job(
    job_id: Annotated[int, Path(ge=1, le=2**31 - 1)], index: IndexDep
) -> dict[str, Any]:
    """Send a dead-lettered instance again (tries reset); 404 unless the job failed."""
    retry_dead_letter(index, job_id)
    return {"id": job_id, "status": "pending"}


@router.get("/commitment")
def commitment_queue(index: IndexDep) -> dict[str, Any]:
    """Owed Storage Commitment reports (``commit`` jobs) per status; ``failed`` is the
    dead-letter list."""
    return {"jobs": report_summary(index)}


@router.get("/commitment/jobs")
def commitment_jobs(
    index: IndexDep,
    status: Annotated[Literal["pending", "running", "done", "failed"] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[dict[str, Any]]:
    """The newest Storage Commitment report jobs with their SCU and last error."""
    return report_jobs(index, status=status, limit=limit)


@router.post("/commitment/jobs/{job_id}/retry", status_code=202)
def retry_commitment_job(
    job_id: Annotated[int, Path(ge=1, le=2**31 - 1)], index: IndexDep
) -> dict[str, Any]:
    """Send a dead-lettered report again (tries reset; the worker decides again and
    delivers it on a new association); 404 unless the job failed."""
    retry_report(index, job_id)
    return {"id": job_id, "status": "pending"}
