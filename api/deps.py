"""FastAPI dependencies: the stores ``create_app`` built, taken from ``app.state``."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from core.settings import Settings
from storage.archive import Archive
from storage.index.sql import SqlIndex

__all__ = ["ArchiveDep", "IndexDep", "SettingsDep", "base_url"]


def _index(request: Request) -> SqlIndex:
    index: SqlIndex = request.app.state.index
    return index


def _archive(request: Request) -> Archive:
    archive: Archive = request.app.state.archive
    return archive


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


IndexDep = Annotated[SqlIndex, Depends(_index)]
ArchiveDep = Annotated[Archive, Depends(_archive)]
SettingsDep = Annotated[Settings, Depends(_settings)]


def base_url(request: Request, prefix: str) -> str:
    """Absolute URL of a router mounted at ``prefix`` (honours ``root_path``)."""
    return str(request.base_url).rstrip("/") + prefix
