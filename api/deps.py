"""FastAPI dependencies: the stores and services ``create_app`` built, from ``app.state``.

Each is an ``Annotated`` alias ending in ``Dep`` (STYLE.md §2, as the FastAPI
full-stack template's ``SessionDep``): a route names what it needs in its signature.
The services come from the typed :class:`api.state.ApiServices`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api.state import services_of
from core.settings import Settings
from services.lab_results import LabResultService
from services.orders import OrderService
from services.tiles import TileService
from storage.archive import Archive
from storage.index.sql import SqlIndex

__all__ = [
    "ArchiveDep",
    "IndexDep",
    "LabResultsDep",
    "OrdersDep",
    "SettingsDep",
    "TilesDep",
    "base_url",
]


def _index(request: Request) -> SqlIndex:
    index: SqlIndex = request.app.state.index
    return index


def _archive(request: Request) -> Archive:
    archive: Archive = request.app.state.archive
    return archive


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _orders(request: Request) -> OrderService:
    return services_of(request.app).orders


def _lab_results(request: Request) -> LabResultService:
    return services_of(request.app).lab_results


def _tiles(request: Request) -> TileService:
    return services_of(request.app).tiles


IndexDep = Annotated[SqlIndex, Depends(_index)]
ArchiveDep = Annotated[Archive, Depends(_archive)]
SettingsDep = Annotated[Settings, Depends(_settings)]
OrdersDep = Annotated[OrderService, Depends(_orders)]
LabResultsDep = Annotated[LabResultService, Depends(_lab_results)]
TilesDep = Annotated[TileService, Depends(_tiles)]


def base_url(request: Request, prefix: str) -> str:
    """Absolute URL of a router mounted at ``prefix``, for URLs written into responses.

    From ``http.public_url`` when configured; otherwise from the scheme and the local
    address the connection was accepted on (ASGI ``scope["server"]``), plus
    ``root_path``. Never from the ``Host`` header: a client could make us hand other
    clients links to a host of its choosing (host header injection, issue 14.9).
    """
    settings: Settings = request.app.state.settings
    if settings.http.public_url:
        return settings.http.public_url + prefix
    root = str(request.scope.get("root_path", "")).rstrip("/")
    server = request.scope.get("server")
    if not server:  # a Unix socket: a path relative to the server's root
        return root + prefix
    host, port = str(server[0]), server[1]
    if ":" in host:  # an IPv6 literal (RFC 3986 3.2.2)
        host = f"[{host}]"
    scheme = str(request.scope.get("scheme", "http"))
    default = {"http": 80, "https": 443}.get(scheme)
    authority = host if port in (None, default) else f"{host}:{port}"
    return f"{scheme}://{authority}{root}{prefix}"
