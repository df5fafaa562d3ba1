"""DICOMweb (PS3.18) under ``/dicomweb``: QIDO-RS, WADO-RS and STOW-RS.

Thin HTTP adapters: parsing and rendering are in :mod:`api.dicomweb`, queries in
:mod:`storage.index.queries`, storing in :class:`storage.archive.Archive` (the same
durable path as C-STORE). Blocking work runs in FastAPI's thread pool (plain ``def``
endpoints); STOW-RS spools the body asynchronously first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, BinaryIO

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydicom import dcmread
from starlette.concurrency import run_in_threadpool

from api.deps import ArchiveDep, IndexDep, base_url
from api.dicomweb import (
    fill_bulkdata_uris,
    multipart_body,
    parse_accept,
    parse_search,
    qido_json,
    store_body,
)
from api.dicomweb._multipart import content_type_params, new_boundary
from api.dicomweb._pixels import (
    EXPLICIT_BE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    NATIVE,
    RenderOptions,
    choose_frame_syntax,
    choose_instance_syntax,
    iter_frames,
    parse_viewport,
    parse_window,
    read_bulkdata,
    render,
    transcode,
)
from core.coercion import coerce_patient_json
from core.errors import InvalidQueryError, NotFoundError, OutOfResourcesError
from core.instance import metadata_json
from services.patients import coerced_part10, current_patient_attributes
from storage.archive import Archive
from storage.index.queries import Level
from storage.index.sql import MetadataRow, SqlIndex

__all__ = ["PREFIX", "router"]

logger = logging.getLogger(__name__)

PREFIX = "/dicomweb"
DICOM_JSON = "application/dicom+json"
router = APIRouter(prefix=PREFIX, tags=["dicomweb"])

PIXEL_DATA = 0x7FE00010
_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
_CHUNK = 1 << 20

Uid = Annotated[str, PathParam(max_length=64, description="A DICOM UID (PS3.5 9.1)")]


def _uid(value: str) -> str:
    if not _UID_RE.fullmatch(value) or len(value) > 64:
        raise NotFoundError("not a UID")
    return value


def _base(request: Request) -> str:
    return base_url(request, PREFIX)


def _not_acceptable(what: str) -> HTTPException:
    return HTTPException(status_code=406, detail=f"none of the Accept media types: {what}")


def _check_json_accept(request: Request) -> None:
    for rng in parse_accept(request.headers.get("accept")):
        if rng.matches(DICOM_JSON) or rng.matches("application/json"):
            return
    raise _not_acceptable("application/dicom+json is what this resource provides")


# -- QIDO-RS (PS3.18 10.6) ------------------------------------------------------------


def _search(request: Request, index: SqlIndex, level: Level, context: dict[str, str]) -> Response:
    _check_json_accept(request)
    search = parse_search(level, list(request.query_params.multi_items()), context=context)
    limit = search.query.limit or 0
    # One row more than asked tells whether there is a next page (issue 21).
    rows = index.find(dataclasses.replace(search.query, limit=limit + 1))
    headers = {}
    if len(rows) > limit:
        rows = rows[:limit]
        # PS3.18 8.3.4.4: a partial result carries this warning; the next page's URL
        # rides in a Link header (RFC 8288).
        headers["Warning"] = '299 pacslab "There are additional results that can be requested"'
        if level == "study":
            # Keyset: the next page is read from the index at this page's last study,
            # not past offset + limit skipped rows (issue 21); offset still works.
            nxt = request.url.remove_query_params("offset").include_query_params(
                after=rows[-1]["StudyInstanceUID"], limit=limit)
        else:
            nxt = request.url.include_query_params(offset=search.query.offset + limit,
                                                   limit=limit)
        headers["Link"] = f'<{nxt}>; rel="next"'
    if search.ignored:
        names = ", ".join(sorted(set(search.ignored)))[:500]
        # PS3.18 8.3.4.1: unsupported matching keys are ignored, and said so.
        text = f"The following attributes are not supported for matching: {names}"
        ignored = f'299 pacslab "{text}"'
        # Several warnings share one header field, comma-separated (RFC 7234 5.5).
        headers["Warning"] = ", ".join(filter(None, (headers.get("Warning"), ignored)))
    if not rows:
        return Response(status_code=204, headers=headers)
    base = _base(request)
    body = [qido_json(row, search, base) for row in rows]
    return JSONResponse(body, media_type=DICOM_JSON, headers=headers)


_QIDO = {
    "responses": {
        200: {"description": "Matches, as DICOM JSON", "content": {DICOM_JSON: {}}},
        204: {"description": "No match"},
        400: {"description": "Invalid query parameters"},
    }
}


@router.get("/studies", summary="QIDO-RS: search for studies", **_QIDO)  # type: ignore[arg-type]
def search_studies(request: Request, index: IndexDep) -> Response:
    """Search for studies (PS3.18 10.6.1, Table 10.6.1-5 return attributes)."""
    return _search(request, index, "study", {})


@router.get("/series", summary="QIDO-RS: search for series", **_QIDO)  # type: ignore[arg-type]
def search_series(request: Request, index: IndexDep) -> Response:
    """Search for series of all studies (PS3.18 10.6.1, Table 10.6.1-6)."""
    return _search(request, index, "series", {})


@router.get("/instances", summary="QIDO-RS: search for instances", **_QIDO)  # type: ignore[arg-type]
def search_instances(request: Request, index: IndexDep) -> Response:
    """Search for instances of all studies (PS3.18 10.6.1, Table 10.6.1-7)."""
    return _search(request, index, "instance", {})


@router.get("/studies/{study}/series", summary="QIDO-RS: series of a study", **_QIDO)  # type: ignore[arg-type]
def search_study_series(request: Request, index: IndexDep, study: Uid) -> Response:
    return _search(request, index, "series", {"StudyInstanceUID": _uid(study)})


@router.get("/studies/{study}/instances", summary="QIDO-RS: instances of a study", **_QIDO)  # type: ignore[arg-type]
def search_study_instances(request: Request, index: IndexDep, study: Uid) -> Response:
    return _search(request, index, "instance", {"StudyInstanceUID": _uid(study)})


@router.get(
    "/studies/{study}/series/{series}/instances",
    summary="QIDO-RS: instances of a series",
    **_QIDO,  # type: ignore[arg-type]
)
def search_series_instances(request: Request, index: IndexDep, study: Uid, series: Uid) -> Response:
    context = {"StudyInstanceUID": _uid(study), "SeriesInstanceUID": _uid(series)}
    return _search(request, index, "instance", context)


# -- WADO-RS instances (PS3.18 10.4.1.1.1) --------------------------------------------


def _rows(
    index: SqlIndex, study: str, series: str | None = None, sop: str | None = None
) -> list[MetadataRow]:
    rows = index.instance_metadata(
        _uid(study), _uid(series) if series else None, _uid(sop) if sop else None
    )
    if not rows:
        raise NotFoundError("no such study, series or instance")
    return rows


def _path(archive: Archive, key: str) -> Path:
    path = archive.originals.path(key)
    if not path.exists():
        raise NotFoundError("original missing from the store")
    return path


def _file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as fp:
        while chunk := fp.read(_CHUNK):
            yield chunk


def _retrieve(
    request: Request, archive: Archive, rows: list[MetadataRow], index: SqlIndex
) -> Response:
    accept = parse_accept(request.headers.get("accept"))
    target = choose_instance_syntax(accept, [r.transfer_syntax_uid for r in rows])
    if target is None:
        raise _not_acceptable("application/dicom in a transfer syntax we can produce")
    paths = [(r, _path(archive, r.blob_key)) for r in rows]
    boundary = new_boundary()
    # The patient as the index holds it now (issue 17): instances sent out carry it,
    # the originals stay as stored (services.patients.coerced_part10).
    current = current_patient_attributes(index, rows[0].study_instance_uid)

    def parts() -> Iterator[tuple[str, Iterable[bytes]]]:
        for row, path in paths:
            if target in ("*", row.transfer_syntax_uid):
                ts = row.transfer_syntax_uid
                coerced = (
                    coerced_part10(path, current, metadata=row.metadata_json) if current else None
                )
                body = _file_chunks(path) if coerced is None else [coerced]
                yield f"application/dicom; transfer-syntax={ts}", body
            else:
                data = transcode(path, target)
                coerced = coerced_part10(data, current) if current else None
                yield f"application/dicom; transfer-syntax={target}", [coerced or data]

    type_param = "application/dicom"
    if target != "*":
        type_param += f"; transfer-syntax={target}"
    media = f'multipart/related; type="application/dicom"; boundary={boundary}'
    if target != "*":
        media += f"; transfer-syntax={target}"
    return StreamingResponse(multipart_body(parts(), boundary), media_type=media)


_WADO = {
    "responses": {
        200: {
            "description": "multipart/related; type=application/dicom",
            "content": {"multipart/related": {}},
        },
        404: {"description": "Unknown study, series or instance"},
        406: {"description": "No acceptable media type or transfer syntax"},
    }
}


@router.get("/studies/{study}", summary="WADO-RS: retrieve a study", **_WADO)  # type: ignore[arg-type]
def retrieve_study(request: Request, index: IndexDep, archive: ArchiveDep, study: Uid) -> Response:
    """All instances of a study as multipart/related (PS3.18 10.4.1.1.1)."""
    return _retrieve(request, archive, _rows(index, study), index)


@router.get("/studies/{study}/series/{series}", summary="WADO-RS: retrieve a series", **_WADO)  # type: ignore[arg-type]
def retrieve_series(
    request: Request, index: IndexDep, archive: ArchiveDep, study: Uid, series: Uid
) -> Response:
    return _retrieve(request, archive, _rows(index, study, series), index)


@router.get(
    "/studies/{study}/series/{series}/instances/{sop}",
    summary="WADO-RS: retrieve an instance",
    **_WADO,  # type: ignore[arg-type]
)
def retrieve_instance(
    request: Request, index: IndexDep, archive: ArchiveDep, study: Uid, series: Uid, sop: Uid
) -> Response:
    return _retrieve(request, archive, _rows(index, study, series, sop), index)


# -- WADO-RS metadata (PS3.18 10.4.1.1.2) ---------------------------------------------


def _metadata(
    request: Request, archive: Archive, rows: list[MetadataRow], index: SqlIndex
) -> Response:
    _check_json_accept(request)
    base = _base(request)
    items = []
    # Current patient values over the stored ones (issue 17, core.coercion).
    current = current_patient_attributes(index, rows[0].study_instance_uid) if rows else None
    for row in rows:
        meta = row.metadata_json
        if meta == "{}":
            # The instance job has not run yet: read the header ourselves.
            with archive.originals.open(row.blob_key) as fp:
                meta = metadata_json(dcmread(fp, defer_size=1024))
        if current is not None:
            meta = coerce_patient_json(meta, current)
        url = (
            f"{base}/studies/{row.study_instance_uid}/series/{row.series_instance_uid}"
            f"/instances/{row.sop_instance_uid}"
        )
        items.append(fill_bulkdata_uris(meta, url))
    body = ("[" + ",".join(items) + "]").encode("utf-8")
    return Response(body, media_type=DICOM_JSON)


_META = {"responses": {200: {"description": "DICOM JSON", "content": {DICOM_JSON: {}}}}}


@router.get("/studies/{study}/metadata", summary="WADO-RS: study metadata", **_META)  # type: ignore[arg-type]
def study_metadata(request: Request, index: IndexDep, archive: ArchiveDep, study: Uid) -> Response:
    return _metadata(request, archive, _rows(index, study), index)


@router.get(
    "/studies/{study}/series/{series}/metadata",
    summary="WADO-RS: series metadata",
    **_META,  # type: ignore[arg-type]
)
def series_metadata(
    request: Request, index: IndexDep, archive: ArchiveDep, study: Uid, series: Uid
) -> Response:
    return _metadata(request, archive, _rows(index, study, series), index)


@router.get(
    "/studies/{study}/series/{series}/instances/{sop}/metadata",
    summary="WADO-RS: instance metadata",
    **_META,  # type: ignore[arg-type]
)
def instance_metadata(
    request: Request, index: IndexDep, archive: ArchiveDep, study: Uid, series: Uid, sop: Uid
) -> Response:
    return _metadata(request, archive, _rows(index, study, series, sop), index)


# -- WADO-RS frames, bulk data (PS3.18 10.4.1.1.3, 10.4.1.1.5) -----------------------


#: Longest frame list of one request; with no repeats and every number in range, a
#: response holds each frame of the instance at most once (issue 14.7).
MAX_FRAME_LIST = 10_000


#: Largest single frame answered as one body rather than streamed (see retrieve_frames).
_SINGLE_FRAME_BODY = 16 * 1024 * 1024


def _frame_numbers(frames: str) -> list[int]:
    """The frame list of PS3.18 10.4.1.1.3 (``uid/frames/1,3,5``), 1-based.

    A repeated frame is refused (400) rather than sent again: ``1,1,1,…`` made one
    request multiply a frame thousands of times (issue 14.7). Numbers beyond the
    instance's frames are 404 once the instance is read (:func:`iter_frames`).
    """
    items = frames.split(",")
    if len(items) > MAX_FRAME_LIST:
        raise InvalidQueryError(f"a frame list has at most {MAX_FRAME_LIST} numbers")
    try:
        numbers = [int(f) for f in items if len(f) <= 10]
    except ValueError as exc:
        raise InvalidQueryError("frame list must be comma-separated integers") from exc
    if len(numbers) != len(items) or not numbers:
        raise InvalidQueryError("frame list must be comma-separated integers")
    if any(n < 1 for n in numbers):
        raise InvalidQueryError("frame numbers start at 1")
    if len(set(numbers)) != len(numbers):
        raise InvalidQueryError("frame list repeats a frame number")
    return numbers


@router.get(
    "/studies/{study}/series/{series}/instances/{sop}/frames/{frames}",
    summary="WADO-RS: retrieve frames",
    **_WADO,  # type: ignore[arg-type]
)
def retrieve_frames(
    request: Request,
    index: IndexDep,
    archive: ArchiveDep,
    study: Uid,
    series: Uid,
    sop: Uid,
    frames: str,
) -> Response:
    """Frames as stored (PS3.18 10.4.1.1.3): octet-stream, or the compressed bitstream."""
    numbers = _frame_numbers(frames)
    (row,) = _rows(index, study, series, sop)
    accept = parse_accept(request.headers.get("accept"))
    chosen = choose_frame_syntax(accept, row.transfer_syntax_uid)
    if chosen is None:
        raise _not_acceptable("frames are available as stored or as octet-stream")
    content_type, decode = chosen
    path = _path(archive, row.blob_key)
    # Checked now (404/400 before the body starts), read and decoded one frame at a
    # time while the response streams: memory is one frame, not the whole list.
    data = iter_frames(path, numbers, decode=decode)
    boundary = new_boundary()
    main, params = content_type_params(content_type)
    media = f'multipart/related; type="{main}"; boundary={boundary}'
    if "transfer-syntax" in params:
        media += f"; transfer-syntax={params['transfer-syntax']}"
    if len(numbers) == 1:
        # One frame (what OHIF asks for, slice by slice, issue 20): the frame is in
        # memory either way, so a small one is sent as one body from this worker thread
        # instead of streamed with a thread-pool hop per chunk (~20 % less CPU per
        # request under OHIF's six parallel fetches).
        frame = next(iter(data))
        if len(frame.data) <= _SINGLE_FRAME_BODY:
            body = b"".join(multipart_body([(content_type, [frame.data])], boundary))
            return Response(body, media_type=media)
        data = iter([frame])
    parts = ((content_type, [f.data]) for f in data)
    # A sync iterator: Starlette pulls it in its thread pool, one part at a time.
    return StreamingResponse(multipart_body(parts, boundary), media_type=media)


@router.get(
    "/studies/{study}/series/{series}/instances/{sop}/bulkdata/{tag}",
    summary="WADO-RS: retrieve bulk data",
    **_WADO,  # type: ignore[arg-type]
)
def retrieve_bulkdata(
    request: Request,
    index: IndexDep,
    archive: ArchiveDep,
    study: Uid,
    series: Uid,
    sop: Uid,
    tag: Annotated[str, PathParam(pattern=r"^[0-9A-Fa-f]{8}$")],
) -> Response:
    """The value of a top-level bulk data element (PS3.18 10.4.1.1.5).

    Pixel Data stored compressed honours the Accept transfer syntax like ``/frames``
    (PS3.18 8.7.3.3.2, Table 8.7.3-2): ``application/octet-stream`` without one (or
    with Explicit VR Little Endian) is the decoded native value, every frame in one
    part; the compressed media type, or octet-stream with ``transfer-syntax=*`` or
    the stored UID, is the frames as stored, one part each; anything else is 406
    (issue 13.8: the encapsulated stream went out whatever was asked). Other elements
    and native Pixel Data are sent as encoded.
    """
    (row,) = _rows(index, study, series, sop)
    path = _path(archive, row.blob_key)
    element = int(tag, 16)
    accept = parse_accept(request.headers.get("accept"))
    boundary = new_boundary()
    if element == PIXEL_DATA and row.transfer_syntax_uid not in NATIVE:
        chosen = choose_frame_syntax(accept, row.transfer_syntax_uid)
        if chosen is None:
            raise _not_acceptable("pixel data is available as stored or decoded to octet-stream")
        content_type, decode = chosen
        frames = iter_frames(path, decode=decode)
        parts: Iterable[tuple[str, Iterable[bytes]]]
        if decode:
            parts = [(content_type, (f.data for f in frames))]
        else:
            parts = ((content_type, [f.data]) for f in frames)
        main, params = content_type_params(content_type)
        media = f'multipart/related; type="{main}"; boundary={boundary}'
        if "transfer-syntax" in params:
            media += f"; transfer-syntax={params['transfer-syntax']}"
        return StreamingResponse(multipart_body(parts, boundary), media_type=media)
    # Native little-endian values read the same in either VR encoding.
    little = {IMPLICIT_LE, EXPLICIT_LE} if row.transfer_syntax_uid != EXPLICIT_BE else set()
    ok = [r for r in accept if r.matches("application/octet-stream")]
    if not any(
        r.transfer_syntax in (None, "*", row.transfer_syntax_uid) or r.transfer_syntax in little
        for r in ok
    ):
        raise _not_acceptable("bulk data is application/octet-stream, as stored")
    data = read_bulkdata(path, element)
    body = b"".join(multipart_body([("application/octet-stream", [data])], boundary))
    media = f'multipart/related; type="application/octet-stream"; boundary={boundary}'
    return Response(body, media_type=media)


# -- WADO-RS rendered and thumbnail (PS3.18 10.4.1.1.4, 10.4.1.1.6) ------------------


def _render_options(
    request: Request,
    window: str | None,
    viewport: str | None,
    quality: int | None,
    default_viewport: tuple[int, int] | None = None,
) -> RenderOptions:
    media = None
    for rng in parse_accept(request.headers.get("accept")):
        if rng.matches("image/jpeg"):
            media = "image/jpeg"
            break
        if rng.matches("image/png"):
            media = "image/png"
            break
    if media is None:
        raise _not_acceptable("rendered images are image/jpeg or image/png")
    if quality is not None and not 1 <= quality <= 100:
        raise InvalidQueryError("quality must be between 1 and 100")
    return RenderOptions(
        media_type=media,
        quality=quality or 90,
        window=parse_window(window),
        viewport=parse_viewport(viewport) or default_viewport,
    )


def _rendered(archive: Archive, row: MetadataRow, frame: int, options: RenderOptions) -> Response:
    image = render(_path(archive, row.blob_key), frame, options)
    return Response(image, media_type=options.media_type)


Window = Annotated[str | None, Query(description="center,width[,function] (PS3.18 8.3.5.1.5)")]
Viewport = Annotated[str | None, Query(description="vw,vh (PS3.18 8.3.5.1.3)")]
Quality = Annotated[int | None, Query(description="1-100 (PS3.18 8.3.5.1.2)")]
_IMG = {
    "responses": {
        200: {"description": "A rendered image", "content": {"image/jpeg": {}, "image/png": {}}},
        404: {"description": "Unknown instance or frame"},
        406: {"description": "No acceptable image media type"},
    }
}


@router.get(
    "/studies/{study}/series/{series}/instances/{sop}/rendered",
    summary="WADO-RS: rendered instance",
    **_IMG,  # type: ignore[arg-type]
)
def instance_rendered(
    request: Request,
    index: IndexDep,
    archive: ArchiveDep,
    study: Uid,
    series: Uid,
    sop: Uid,
    window: Window = None,
    viewport: Viewport = None,
    quality: Quality = None,
) -> Response:
    """The first frame rendered (PS3.18 10.4.1.1.4)."""
    options = _render_options(request, window, viewport, quality)
    (row,) = _rows(index, study, series, sop)
    return _rendered(archive, row, 1, options)


@router.get(
    "/studies/{study}/series/{series}/instances/{sop}/frames/{frames}/rendered",
    summary="WADO-RS: rendered frame",
    **_IMG,  # type: ignore[arg-type]
)
def frame_rendered(
    request: Request,
    index: IndexDep,
    archive: ArchiveDep,
    study: Uid,
    series: Uid,
    sop: Uid,
    frames: str,
    window: Window = None,
    viewport: Viewport = None,
    quality: Quality = None,
) -> Response:
    """One frame rendered; of a frame list, the first (PS3.18 10.4.1.1.4)."""
    numbers = _frame_numbers(frames)
    options = _render_options(request, window, viewport, quality)
    (row,) = _rows(index, study, series, sop)
    return _rendered(archive, row, numbers[0], options)


_THUMB = (128, 128)


def _representative(rows: list[MetadataRow]) -> MetadataRow:
    # The middle instance of the first series: for a CT stack, a slice through the body.
    first = rows[0].series_instance_uid
    members = [r for r in rows if r.series_instance_uid == first]
    return members[len(members) // 2]


@router.get("/studies/{study}/thumbnail", summary="WADO-RS: study thumbnail", **_IMG)  # type: ignore[arg-type]
def study_thumbnail(
    request: Request,
    index: IndexDep,
    archive: ArchiveDep,
    study: Uid,
    viewport: Viewport = None,
) -> Response:
    """A small image standing for the study (PS3.18 10.4.1.1.6)."""
    options = _render_options(request, None, viewport, None, _THUMB)
    return _rendered(archive, _representative(_rows(index, study)), 1, options)


@router.get(
    "/studies/{study}/series/{series}/thumbnail",
    summary="WADO-RS: series thumbnail",
    **_IMG,  # type: ignore[arg-type]
)
def series_thumbnail(
    request: Request,
    index: IndexDep,
    archive: ArchiveDep,
    study: Uid,
    series: Uid,
    viewport: Viewport = None,
) -> Response:
    options = _render_options(request, None, viewport, None, _THUMB)
    return _rendered(archive, _representative(_rows(index, study, series)), 1, options)


@router.get(
    "/studies/{study}/series/{series}/instances/{sop}/thumbnail",
    summary="WADO-RS: instance thumbnail",
    **_IMG,  # type: ignore[arg-type]
)
def instance_thumbnail(
    request: Request,
    index: IndexDep,
    archive: ArchiveDep,
    study: Uid,
    series: Uid,
    sop: Uid,
    viewport: Viewport = None,
) -> Response:
    options = _render_options(request, None, viewport, None, _THUMB)
    (row,) = _rows(index, study, series, sop)
    return _rendered(archive, row, 1, options)


# -- STOW-RS (PS3.18 10.5) ------------------------------------------------------------

_STOW = {
    "responses": {
        200: {"description": "All instances stored", "content": {DICOM_JSON: {}}},
        202: {"description": "Some instances stored, some failed"},
        400: {"description": "The request could not be parsed"},
        409: {"description": "No instance stored"},
        415: {"description": "Not multipart/related; type=application/dicom"},
    },
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/related": {
                    "schema": {"type": "string", "format": "binary"},
                }
            },
        }
    },
}


async def _stow(request: Request, archive: Archive, study: str | None) -> Response:
    content_type = request.headers.get("content-type", "")
    main, params = content_type_params(content_type)
    if main != "multipart/related":
        raise HTTPException(415, detail="STOW-RS takes multipart/related; type=application/dicom")
    if params.get("type", "application/dicom").lower() != "application/dicom":
        raise HTTPException(415, detail="only application/dicom parts are supported")
    # Spool to the staging area (same file system as the originals), so that parts
    # of any size are parsed from a memory map and never held in memory.
    try:
        out, spool = _spool_open(archive.staging_dir())
    except OSError as exc:
        raise _spool_error(exc) from exc
    try:
        try:
            with out:
                async for chunk in request.stream():
                    out.write(chunk)
        except OSError as exc:
            raise _spool_error(exc) from exc
        result = await run_in_threadpool(
            store_body, archive, spool, content_type, study_instance_uid=study
        )
    finally:
        with contextlib.suppress(OSError):
            spool.unlink()
    logger.info("STOW-RS: %d stored, %d failed", len(result.stored), len(result.failed))
    body: dict[str, Any] = result.response(_base(request), study)
    return JSONResponse(body, status_code=result.status, media_type=DICOM_JSON)


def _spool_open(directory: Path) -> tuple[BinaryIO, Path]:
    """A new spool file for a STOW-RS body in ``directory`` (the staging area)."""
    fd, name = tempfile.mkstemp(suffix=".stow", dir=directory)
    return os.fdopen(fd, "wb"), Path(name)


def _spool_error(exc: OSError) -> OutOfResourcesError:
    """The spool could not be written: the staging file system is full, read-only or
    failing. Nothing was stored, and the peer may retry later: 507 with 0xA700's
    meaning (core/errors.py), never a 500 (issue 14.8)."""
    logger.error("STOW-RS spool failed: errno %s", exc.errno)
    return OutOfResourcesError("no space to receive the request")


@router.post("/studies", summary="STOW-RS: store instances", **_STOW)  # type: ignore[arg-type]
async def store_instances(request: Request, archive: ArchiveDep) -> Response:
    """Store instances (PS3.18 10.5.1) through the C-STORE path (Archive.accept)."""
    return await _stow(request, archive, None)


@router.post("/studies/{study}", summary="STOW-RS: store instances of a study", **_STOW)  # type: ignore[arg-type]
async def store_study_instances(request: Request, archive: ArchiveDep, study: Uid) -> Response:
    """Store instances of one study; others fail with 0xA900 (PS3.18 10.5.1)."""
    return await _stow(request, archive, _uid(study))
