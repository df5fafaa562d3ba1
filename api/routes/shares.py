"""Share links over HTTP (issue 17 item 4): ``/admin/shares`` and the shared viewer page.

``POST /admin/shares`` ``{study_uid, expires_in, note?}`` answers ``{id, url,
expires_at}``; the URL, ``{public_url}/viewer/shared#token=pls_…``, is shown once
(only the token's hash is stored). ``GET /admin/shares`` lists the shares (never a
token), ``DELETE /admin/shares/{id}`` revokes one. These need the ``imaging.share``
or ``admin`` scope (core/auth.py). Use cases: :mod:`services.sharing`.

``/viewer/shared`` is the built-in viewer's page (public, it holds no data); the
viewer takes the token from the fragment into ``sessionStorage``, asks
``/viewer/api/share`` which study the link opens, and opens it: the address bar never
shows a UID. With a share token only that study can be read (:func:`core.sharing.
share_allows`, enforced by :class:`api.auth.AuthMiddleware`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from api.deps import base_url
from api.routes.viewer import STATIC_DIR, page_headers
from core.errors import NotFoundError
from core.sharing import ShareGrant
from services.sharing import DEFAULT_TTL_S, MAX_TTL_S, ShareService
from storage.shares import ShareRecord

__all__ = ["router", "viewer_router"]

router = APIRouter(prefix="/admin/shares", tags=["shares"])
viewer_router = APIRouter(prefix="/viewer", tags=["viewer"])


class ShareIn(BaseModel):
    study_uid: str = Field(min_length=1, max_length=64, pattern=r"^[0-9]+(\.[0-9]+)*$")
    #: Seconds the link works.
    expires_in: int = Field(DEFAULT_TTL_S, ge=1, le=MAX_TTL_S)
    note: str = Field("", max_length=200)


class ShareCreated(BaseModel):
    id: str
    url: str
    expires_at: datetime


class SharePublic(BaseModel):
    id: str
    study_uid: str
    note: str
    created_by: str
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None
    state: str


def _service(request: Request) -> ShareService:
    service: ShareService = request.app.state.shares
    return service


def _caller(request: Request) -> tuple[str, str, str]:
    principal = getattr(request.state, "principal", None)
    client = request.client
    return (
        str(getattr(principal, "subject", "") or "anonymous"),
        str(getattr(principal, "kind", "user")),
        client.host if client else "",
    )


def _public(service: ShareService, r: ShareRecord) -> dict[str, Any]:
    return {
        "id": r.share_id,
        "study_uid": r.study_uid,
        "note": r.note,
        "created_by": r.created_by,
        "created_at": r.created_at,
        "expires_at": r.expires_at,
        "revoked_at": r.revoked_at,
        "state": service.state(r),
    }


@router.post("", status_code=201, response_model=ShareCreated)
def create_share(body: ShareIn, request: Request, response: Response) -> dict[str, Any]:
    """Create a link to one study; the URL (with its token) is shown only here."""
    who, kind, source = _caller(request)
    created = _service(request).create(
        body.study_uid,
        expires_in_s=body.expires_in,
        note=body.note,
        by=who,
        by_kind=kind,
        source=source,
    )
    response.headers["Cache-Control"] = "no-store"
    return {
        "id": created.record.share_id,
        "url": created.url(base_url(request, "")),
        "expires_at": created.record.expires_at,
    }


@router.get("", response_model=list[SharePublic])
def list_shares(request: Request, study_uid: str | None = None) -> list[dict[str, Any]]:
    service = _service(request)
    return [_public(service, r) for r in service.list(study_uid=study_uid)]


@router.delete("/{share_id}", status_code=204)
def revoke_share(share_id: str, request: Request) -> Response:
    who, kind, source = _caller(request)
    _service(request).revoke(share_id, by=who, by_kind=kind, source=source)
    return Response(status_code=204)


@viewer_router.get("/shared", include_in_schema=False)
def shared_page(request: Request) -> FileResponse:
    """The viewer page a share link opens (the token is in the fragment)."""
    settings = request.app.state.settings
    return FileResponse(
        STATIC_DIR / "viewer" / "index.html",
        media_type="text/html",
        headers=page_headers(settings.http.viewer_frame_ancestors),
    )


@viewer_router.get("/api/share", summary="The study a share link opens")
def shared_study(request: Request) -> dict[str, Any]:
    """For a share token: its study and end; any other caller: 404 (no share here)."""
    principal = getattr(request.state, "principal", None)
    grant = getattr(principal, "claims", {}).get("grant")
    if not isinstance(grant, ShareGrant):
        raise NotFoundError("not a share link")
    return {"study_instance_uid": grant.study_uid, "expires_at": grant.expires_at.isoformat()}
