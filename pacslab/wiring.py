"""Composition root: build each service's parts from Settings (STYLE.md §1).

The one place that knows every concrete class. Each process (receiver child, worker,
API) calls these once at start.
"""

from __future__ import annotations

from pathlib import Path

from core.settings import Settings
from ingest.service import IngestService
from storage.abc import OriginalStore
from storage.archive import Archive
from storage.index.sql import SqlIndex
from storage.originals import FileOriginalStore

__all__ = ["build_archive", "build_index", "build_ingest", "build_originals"]


def build_index(settings: Settings, *, migrate: bool | None = None) -> SqlIndex:
    section = settings.index
    if migrate is not None:
        section = section.model_copy(update={"migrate": migrate})
    return SqlIndex(section)


def build_originals(settings: Settings) -> OriginalStore:
    """Originals on the local file system (default), or in object storage when
    ``storage.originals_url`` is an fsspec URL; staging stays local either way."""
    storage = settings.storage
    assert storage.originals_dir is not None
    url = storage.originals_url
    if url.startswith("file://"):
        return FileOriginalStore(Path(url.removeprefix("file://")), fsync=storage.fsync)
    if url:
        from storage.objectstore import ObjectOriginalStore

        return ObjectOriginalStore(url, staging=storage.originals_dir / ".staging",
                                   storage_options=storage.storage_options)
    return FileOriginalStore(storage.originals_dir, fsync=storage.fsync)


def build_archive(settings: Settings, index: SqlIndex | None = None) -> Archive:
    assert settings.storage.quarantine_dir is not None
    originals = build_originals(settings)
    return Archive(
        originals,
        index or build_index(settings),
        quarantine=settings.storage.quarantine_dir,
        fsync=settings.storage.fsync,
    )


def build_ingest(settings: Settings, index: SqlIndex | None = None) -> IngestService:
    return IngestService(build_archive(settings, index))
