"""The ``/viewer`` page: study list, series thumbnails and an OpenSeadragon view.

Plain HTML/JS in ``api/static/viewer/``; OpenSeadragon is vendored from the npm
registry in ``api/static/vendor/openseadragon/`` (with its BSD-3-Clause licence),
never loaded from a CDN. The page reads two small JSON endpoints over the index
(``/viewer/api/...``) and shows tiles through the IIIF routes of
:mod:`api.routes.tiles`.

The JSON carries what a viewer needs beyond DICOM: the store version of each
series' pyramid, each stack's planes with their display size and depth (the
acquisition plane first, reformats only for volumes, see
:func:`processing.render.planes_of`), and the window presets.

Deep links: ``/viewer/studies/{StudyInstanceUID}`` and
``/viewer/studies/{StudyInstanceUID}/series/{SeriesInstanceUID}`` serve the same page,
which opens that study (and series) itself, so an EMR can launch the viewer for the
patient in front of the doctor; the token rides in the fragment (``#token=…``) as for
``/viewer``. The pages hold no patient data and are public; everything they fetch
needs the token.

Every page is sent with a strict Content-Security-Policy (scripts and styles only from
this origin, no inline code), ``frame-ancestors`` from
``http.viewer_frame_ancestors`` (default ``'self'``; an EMR that embeds the viewer
adds its origin), ``Referrer-Policy: no-referrer`` and ``nosniff``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from fastapi import APIRouter, FastAPI, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy import select
from starlette.responses import Response as StarletteResponse
from starlette.types import Scope

from api.deps import TilesDep
from api.routes.tiles import cache_headers
from core.errors import InvalidQueryError, NotFoundError, ServiceError
from processing.render import PRESETS
from storage.index.queries import Match, parse_match
from storage.index.queries import Query as StudyQuery
from storage.index.schema import series, studies

__all__ = ["STATIC_DIR", "NoSniffStaticFiles", "mount_static", "page_headers", "router"]

STATIC_DIR: Final = Path(__file__).resolve().parent.parent / "static"

router = APIRouter(prefix="/viewer", tags=["viewer"])


class NoSniffStaticFiles(StaticFiles):
    """Static files with ``X-Content-Type-Options: nosniff``: a script is run only if
    it is served as one (the CSP's script-src 'self' trusts these files)."""

    async def get_response(self, path: str, scope: Scope) -> StarletteResponse:
        response = await super().get_response(path, scope)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response


def mount_static(app: FastAPI) -> None:
    """Serve ``api/static`` (the viewer's JS/CSS and vendored OpenSeadragon) at /static."""
    app.mount("/static", NoSniffStaticFiles(directory=STATIC_DIR), name="static")


#: CSP hash of the one ``<style>`` element OpenSeadragon 6.1.1 adds to the page (its
#: "mobile css" rule); allowing exactly that text keeps ``'unsafe-inline'`` out.
#: Another OpenSeadragon version may change it: the Chromium test fails on any CSP
#: violation, so an upgrade shows here.
_OSD_STYLE_HASH: Final = "sha256-9xTiqzfwFaL2SGb1rmr8gysEwVVjIvqWAgmZgqFqpEE="


def page_headers(frame_ancestors: list[str]) -> dict[str, str]:
    """Security headers of the viewer's HTML pages.

    CSP Level 3: nothing inline and nothing from another origin (OpenSeadragon is
    vendored); ``blob:`` images are the thumbnails and tiles fetched with the token;
    ``data:`` is the empty favicon. X-Frame-Options (RFC 7034) repeats the framing rule
    for browsers without ``frame-ancestors``; it cannot name other origins, so it is
    left out when the EMR's origin is allowed (``frame-ancestors`` then governs).
    """
    csp = ("default-src 'none'; script-src 'self'; "
           f"style-src 'self' '{_OSD_STYLE_HASH}'; "
           "img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; "
           "form-action 'none'; frame-ancestors " + " ".join(frame_ancestors))
    headers = {"Content-Security-Policy": csp, "Referrer-Policy": "no-referrer",
               "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
    if frame_ancestors == ["'self'"]:
        headers["X-Frame-Options"] = "SAMEORIGIN"
    elif frame_ancestors == ["'none'"]:
        headers["X-Frame-Options"] = "DENY"
    return headers


def _page(request: Request) -> FileResponse:
    settings = request.app.state.settings
    return FileResponse(STATIC_DIR / "viewer" / "index.html", media_type="text/html",
                        headers=page_headers(settings.http.viewer_frame_ancestors))


@router.get("", include_in_schema=False)
def viewer_page(request: Request) -> FileResponse:
    """The viewer's single HTML page."""
    return _page(request)


@router.get("/studies/{study_uid}", include_in_schema=False)
def viewer_study_page(study_uid: str, request: Request) -> FileResponse:
    """Deep link: the viewer opening one study (the page reads the UID from its path)."""
    return _page(request)


@router.get("/studies/{study_uid}/series/{series_uid}", include_in_schema=False)
def viewer_series_page(study_uid: str, series_uid: str, request: Request) -> FileResponse:
    """Deep link: the viewer opening one series of a study."""
    return _page(request)


def _study_search(name: str, patient_id: str, accession: str, date: str,
                  modality: str) -> tuple[Match, ...]:
    """The viewer's search fields as QIDO-RS matching keys (PS3.4 C.2.2.2), so they
    are matched on the same indexes: the folded name key (a name typed as "trần" or
    "TRAN VAN" is a prefix of the family name first), Patient ID and Accession Number
    exact or with wildcards, a date or date range, modalities in the study."""
    matches = []
    if name.strip():
        value = name.strip()
        # A plain "tran van" starts the name: family name, then given names.
        value = value if "*" in value or "?" in value else value.replace(" ", "^", 1) + "*"
        matches.append(parse_match("PatientName", value))
    for keyword, value in (("PatientID", patient_id), ("AccessionNumber", accession),
                           ("StudyDate", date.replace("-", "") if len(date) == 10
                            and date.count("-") == 2 else date),
                           ("ModalitiesInStudy", modality.upper())):
        if value.strip():
            matches.append(parse_match(keyword, value.strip()))
    return tuple(matches)


@router.get("/api/studies", summary="Studies in the index (for the viewer)")
def list_studies(request: Request, response: Response,
                 limit: int = Query(50, ge=1, le=1000),
                 offset: int = Query(0, ge=0, le=1_000_000),
                 name: str = Query("", max_length=200),
                 patient_id: str = Query("", max_length=64),
                 accession: str = Query("", max_length=64),
                 date: str = Query("", max_length=32),
                 modality: str = Query("", max_length=64)) -> Any:
    """Newest studies first, with modalities and series counts; searched by patient
    name, Patient ID, Accession Number, date (``YYYYMMDD``, ``YYYY-MM-DD`` or a DICOM
    range ``YYYYMMDD-YYYYMMDD``) and modality, and paged: a ``Link: <…>; rel="next"``
    header (RFC 8288) names the next page while there is one.

    Each page reads its own rows through the index (name key, per-study modality set,
    per-study counts), whatever the archive's size (issue 21).
    """
    response.headers.update(cache_headers(request, immutable=False))
    try:
        matches = _study_search(name, patient_id, accession, date, modality)
    except InvalidQueryError as exc:
        body = {"type": "about:blank", "title": "Bad request", "status": 400,
                "detail": str(exc), "instance": request.url.path}
        return JSONResponse(body, status_code=400, media_type="application/problem+json",
                            headers={"Cache-Control": "no-store"})
    idx = request.app.state.index
    rows = idx.find(StudyQuery(level="study", matches=matches, limit=limit + 1, offset=offset,
                               newest_first=True))
    if len(rows) > limit:
        rows = rows[:limit]
        nxt = request.url.include_query_params(offset=offset + limit, limit=limit)
        response.headers["Link"] = f'<{nxt.path}?{nxt.query}>; rel="next"'
    return [{"study_instance_uid": r["StudyInstanceUID"], "study_date": r["StudyDate"],
             "description": r["StudyDescription"], "accession_number": r["AccessionNumber"],
             "patient_id": r["PatientID"], "patient_name": r["PatientName"],
             "series": r["NumberOfStudyRelatedSeries"] or 0,
             "modalities": sorted(set(filter(None, (r["ModalitiesInStudy"] or "")
                                             .split("\\"))))}
            for r in rows]


@router.get("/api/studies/{study_uid}/series", summary="Series of a study with their pyramids")
def list_series(study_uid: str, request: Request, response: Response, service: TilesDep) -> Any:
    """Each series with its converted stacks, planes (size, depth) and presets."""
    response.headers.update(cache_headers(request, immutable=False))
    idx = request.app.state.index
    # One study's series rows: their current-instance counts are kept on the row
    # (series.num_instances), so nothing here reads instances (issue 21).
    query = (select(series.c.series_instance_uid, series.c.modality, series.c.series_number,
                    series.c.description, series.c.num_instances.label("n"))
             .select_from(series.join(studies, series.c.study_pk == studies.c.id))
             # A series without current instances (all rejected, IHE IOCM) is hidden,
             # as in every index search (storage.index.queries._visible).
             .where(studies.c.study_instance_uid == study_uid, series.c.num_instances > 0)
             .order_by(series.c.series_number, series.c.id))
    with idx.read() as conn:
        rows = conn.execute(query).all()
    if not rows:
        body = {"type": "about:blank", "title": "Not found", "status": 404,
                "detail": "no such study", "instance": request.url.path}
        return JSONResponse(body, status_code=404, media_type="application/problem+json",
                            headers={"Cache-Control": "no-store"})
    out = []
    for r in rows:
        item: dict[str, Any] = {"series_instance_uid": r.series_instance_uid,
                                "modality": r.modality, "series_number": r.series_number,
                                "description": r.description, "instances": r.n or 0,
                                "version": None, "stacks": []}
        try:
            version, result = service.conversion(r.series_instance_uid, None)
        except NotFoundError:
            out.append(item)
            continue
        item["version"] = version
        for n in range(len(result.get("images") or [])):
            try:
                _, image = service.image(r.series_instance_uid, version, n)
            except ServiceError:
                continue
            views = service.views(image)
            default = next(iter(views))  # the acquisition plane (planes_of)
            windows = [{"name": str(w.get("explanation") or f"{w['center']:g}/{w['width']:g}"),
                        "window": f"{w['center']:g},{w['width']:g}"}
                       for w in image.attrs.get("windows") or []]
            windows += [{"name": name, "window": name} for name in PRESETS]
            base = f"{r.series_instance_uid}@{version}:{n}"
            mid = views[default].depth // 2
            item["stacks"].append({
                "stack": n,
                "kind": image.kind,
                "id": base,
                "color": image.samples > 1,
                "levels": image.levels,
                "planes": {p: {"width": v.width, "height": v.height, "depth": v.depth,
                               "pixel_mm": v.pixel_mm} for p, v in views.items()},
                "default_plane": default,
                "acquisition_plane": default,
                "windows": [] if image.samples > 1 else windows,
                # ^: a plane smaller than 128 px is scaled up, not refused (§4.2)
                "thumbnail": f"/iiif/{base}:{default}:{mid}/full/^!128,128/0/default.png",
            })
        out.append(item)
    return out
