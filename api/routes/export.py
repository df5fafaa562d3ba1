"""``/export``: a study or series as a ZIP file-set with a DICOMDIR (issue 17.3).

``GET /export/studies/{study}[/series/{series}][?deidentify=true]`` answers
``application/zip``, streamed (:class:`services.export.ExportService`: PS3.10 files
and a DICOMDIR per the PS3.11 General Purpose profile; de-identified per PS3.15 E.1
on request). Scope ``imaging.read``, as WADO-RS: it is the same data.

Progress, for a browser: the response carries ``X-Export-Id`` (and
``Content-Length`` when the size is known before streaming, i.e. originals), and
``GET /export/progress/{id}`` answers ``{"state", "instances_total",
"instances_done", "bytes_total", "bytes_done"}`` to the same caller while the
archive streams and for a while after. ``fetch()`` resolves on the response's
headers, so a page reads the id at once and can poll while it reads the body.

The action log gets one ``export`` entry per archive (who, which study or series,
how many instances and bytes, de-identified or not, the patient only as a keyed
reference), besides the request's own entry.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Annotated, Final, Literal

from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, Response, StreamingResponse

from api.audit import set_audit_patient
from api.auth import PrincipalDep
from api.deps import ArchiveDep, IndexDep
from core.auth import Principal
from core.errors import NotFoundError
from services.export import ExportProgress, ExportRequest, ExportService
from storage.archive import Archive
from storage.index.sql import SqlIndex

__all__ = ["PREFIX", "router"]

PREFIX: Final = "/export"
router = APIRouter(prefix=PREFIX, tags=["export"])

_UID_RE: Final = re.compile(r"[0-9]+(\.[0-9]+)*")
#: Progress records kept per API process (oldest dropped first).
_MAX_TRACKED: Final = 256

Uid = Annotated[str, PathParam(max_length=64, description="A DICOM UID (PS3.5 9.1)")]


class _Tracker:
    """Progress of recent exports, by id, with the subject that started each."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: OrderedDict[str, tuple[str, ExportProgress]] = OrderedDict()

    def add(self, subject: str, progress: ExportProgress) -> None:
        with self._lock:
            self._items[progress.export_id] = (subject, progress)
            while len(self._items) > _MAX_TRACKED:
                self._items.popitem(last=False)

    def get(self, subject: str, export_id: str) -> ExportProgress:
        with self._lock:
            found = self._items.get(export_id)
        # Another caller's export is "not found", not "forbidden": ids are not probed.
        if found is None or found[0] != subject:
            raise NotFoundError("no such export")
        return found[1]


def _tracker(request: Request) -> _Tracker:
    state = request.app.state
    tracker = getattr(state, "exports", None)
    if not isinstance(tracker, _Tracker):
        tracker = state.exports = _Tracker()
    return tracker


def _uid(value: str) -> str:
    if not _UID_RE.fullmatch(value) or len(value) > 64:
        raise NotFoundError("not a UID")
    return value


def _export(
    request: Request,
    index: SqlIndex,
    archive: Archive,
    principal: Principal,
    export: ExportRequest,
) -> Response:
    state = request.app.state
    service = ExportService(
        index,
        archive.originals,
        audit=getattr(state, "audit", None),
        patient_secret=getattr(state, "patient_secret", b""),
        max_instances=state.settings.qr.max_retrieve_instances,
    )
    progress = ExportProgress()
    plan = service.plan(export, progress)  # 404 here, before any byte is sent
    set_audit_patient(request, plan.patient_id)
    _tracker(request).add(principal.subject, progress)
    size = service.size(plan)
    kinds: dict[str, Literal["user", "apikey", "anonymous"]] = {
        "apikey": "apikey",
        "anonymous": "anonymous",
    }
    kind = kinds.get(principal.kind, "user")
    client = request.client
    body: Iterator[bytes] = service.stream(
        plan,
        progress,
        agent=principal.subject,
        agent_type=kind,
        source=client.host if client else "",
    )
    headers = {
        # No UID or name in the file name: a de-identified archive must not carry them.
        "Content-Disposition": f'attachment; filename="export-{progress.export_id}.zip"',
        "X-Export-Id": progress.export_id,
        "X-Export-Instances": str(progress.instances_total),
        "Cache-Control": "no-store",
    }
    if size is not None:
        headers["Content-Length"] = str(size)
    return StreamingResponse(body, media_type="application/zip", headers=headers)


_ZIP = {
    "responses": {
        200: {"description": "ZIP file-set with DICOMDIR", "content": {"application/zip": {}}},
        404: {"description": "Unknown study or series"},
    }
}

Deidentify = Annotated[
    bool, Query(description="De-identify per PS3.15 E.1 Basic Application Level Confidentiality")
]


@router.get("/studies/{study}", summary="Export a study as ZIP with DICOMDIR", **_ZIP)  # type: ignore[arg-type]
def export_study(
    request: Request,
    index: IndexDep,
    archive: ArchiveDep,
    principal: PrincipalDep,
    study: Uid,
    deidentify: Deidentify = False,
) -> Response:
    """All current instances of a study (PS3.10 files, PS3.11 DICOMDIR)."""
    return _export(request, index, archive, principal, ExportRequest(_uid(study), None, deidentify))


@router.get(
    "/studies/{study}/series/{series}",
    summary="Export a series as ZIP with DICOMDIR",
    **_ZIP,  # type: ignore[arg-type]
)
def export_series(
    request: Request,
    index: IndexDep,
    archive: ArchiveDep,
    principal: PrincipalDep,
    study: Uid,
    series: Uid,
    deidentify: Deidentify = False,
) -> Response:
    """All current instances of one series of a study."""
    return _export(
        request, index, archive, principal, ExportRequest(_uid(study), _uid(series), deidentify)
    )


@router.get("/progress/{export_id}", summary="Progress of an export")
def export_progress(
    request: Request,
    principal: PrincipalDep,
    export_id: Annotated[str, PathParam(max_length=64)],
) -> JSONResponse:
    """Instances and bytes done of an export this caller started (no UIDs, no PHI)."""
    progress = _tracker(request).get(principal.subject, export_id)
    return JSONResponse(progress.public(), headers={"Cache-Control": "no-store"})
