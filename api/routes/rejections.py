"""Admin API of IHE IOCM rejections (issue 17): reject, list, purge; study versions.

Under ``/admin`` (scope ``admin``, core/auth.py); the security middleware writes every
request to the action log, and :class:`services.rejection.RejectionService` adds an
entry with what was rejected or purged and why. Routes only translate.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, Field

from api.deps import IndexDep, SettingsDep
from services.rejection import RejectionService
from storage.index.rejection import study_versions_of

__all__ = ["router"]

router = APIRouter(prefix="/admin", tags=["admin"])

_UID = r"^[0-9]+(\.[0-9]+)*$"  # PS3.5 9.1


class RejectionIn(BaseModel):
    """What to reject: a study, one series of it, or instances of it (PS3.16 CID 7011)."""

    study_instance_uid: str = Field(max_length=64, pattern=_UID)
    series_instance_uid: str | None = Field(default=None, max_length=64, pattern=_UID)
    sop_instance_uids: list[Annotated[str, Field(max_length=64, pattern=_UID)]] = Field(
        default_factory=list, max_length=10_000
    )
    code: str = Field(max_length=16, description="113001, 113037, 113038 or 113039")


class PurgeIn(BaseModel):
    codes: list[Annotated[str, Field(max_length=16)]] = Field(default_factory=list, max_length=4)
    study_instance_uid: str | None = Field(default=None, max_length=64, pattern=_UID)


def _who(request: Request) -> tuple[str, str]:
    principal = getattr(request.state, "principal", None)
    subject = str(getattr(principal, "subject", "") or "anonymous")
    return subject, "user" if principal is not None else "anonymous"


def _service(request: Request, index: IndexDep, settings: SettingsDep) -> RejectionService:
    return RejectionService(
        index,
        request.app.state.archive.originals,
        audit=getattr(request.app.state, "audit", None),
        retention=settings.retention,
    )


@router.post("/rejections", status_code=201)
def reject(
    body: RejectionIn, request: Request, index: IndexDep, settings: SettingsDep
) -> dict[str, Any]:
    """Reject current instances at once (IHE RAD TF-2 4.66 semantics, without a KOS):
    404 if none matches, 400 for a code outside CID 7011, 409 for 113039 while the
    study's retention lasts."""
    by, kind = _who(request)
    applied = _service(request, index, settings).reject(
        body.study_instance_uid,
        series=body.series_instance_uid,
        sops=body.sop_instance_uids,
        code=body.code,
        by=by,
        agent_type=kind,
    )
    return {
        "code": body.code,
        "recorded": applied.recorded,
        "hidden": applied.hidden,
        "studies": list(applied.studies),
    }


@router.get("/rejections")
def list_rejections(
    request: Request,
    index: IndexDep,
    settings: SettingsDep,
    study: Annotated[str | None, Query(max_length=64, pattern=_UID)] = None,
    code: Annotated[str | None, Query(max_length=16)] = None,
    purged: Annotated[bool | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> list[dict[str, Any]]:
    """Rejected instances, newest first."""
    rows = _service(request, index, settings).rejections(
        study=study, code=code, purged=purged, limit=limit
    )
    return [
        {
            "sop_instance_uid": r.sop_instance_uid,
            "series_instance_uid": r.series_instance_uid,
            "study_instance_uid": r.study_instance_uid,
            "code": r.code,
            "source": r.source,
            "note_uid": r.note_uid,
            "rejected_by": r.rejected_by,
            "rejected_at": r.rejected_at.isoformat(),
            "purged_at": r.purged_at.isoformat() if r.purged_at else None,
        }
        for r in rows
    ]


@router.post("/rejections/purge")
def purge(
    body: PurgeIn, request: Request, index: IndexDep, settings: SettingsDep
) -> dict[str, Any]:
    """Delete rejected instances' versions and originals (the explicit, audited action)."""
    by, kind = _who(request)
    report = _service(request, index, settings).purge(
        by=by, codes=body.codes, study=body.study_instance_uid, agent_type=kind
    )
    return {
        "instances": report.purged.instances,
        "versions": report.purged.versions,
        "originals": report.purged.originals,
        "kept_for_retention": report.kept_for_retention,
    }


@router.get("/studies/{study}/versions")
def study_versions(
    study: Annotated[str, Path(max_length=64, pattern=_UID)], index: IndexDep
) -> list[dict[str, Any]]:
    """What attribute corrections (re-sent instances) replaced in a study, oldest first."""
    return study_versions_of(index, study)
