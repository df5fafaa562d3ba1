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

__all__ = ["build_archive", "build_index", "build_ingest", "build_originals", "staging_dir"]


def build_index(settings: Settings, *, migrate: bool | None = None) -> SqlIndex:
    section = settings.index
    if migrate is not None:
        section = section.model_copy(update={"migrate": migrate})
    return SqlIndex(section)


def staging_dir(settings: Settings, name: str = "") -> Path:
    """Where received files are staged: ``<originals_dir>/.staging[/<name>]``.

    Receivers that share one originals directory (several hosts, or ports, on one
    store) each stage in their own ``name``d subdirectory, so that one receiver's
    start-up clean-up never removes another's files in flight.
    """
    assert settings.storage.originals_dir is not None
    root = settings.storage.originals_dir / ".staging"
    return root / name if name else root


def build_originals(settings: Settings, *, staging_name: str = "") -> OriginalStore:
    """Originals on the local file system (default), or in object storage when
    ``storage.originals_url`` is an fsspec URL; staging stays local either way."""
    storage = settings.storage
    assert storage.originals_dir is not None
    staging = staging_dir(settings, staging_name)
    url = storage.originals_url
    if url.startswith("file://"):
        root = Path(url.removeprefix("file://"))
        return FileOriginalStore(root, fsync=storage.fsync,
                                 staging=root / ".staging" / staging_name if staging_name
                                 else None)
    if url:
        from storage.objectstore import ObjectOriginalStore

        return ObjectOriginalStore(url, staging=staging, cache=storage.originals_dir / ".cache",
                                   storage_options=storage.storage_options)
    return FileOriginalStore(storage.originals_dir, fsync=storage.fsync, staging=staging)


def build_archive(settings: Settings, index: SqlIndex | None = None, *,
                  staging_name: str = "") -> Archive:
    assert settings.storage.quarantine_dir is not None
    originals = build_originals(settings, staging_name=staging_name)
    return Archive(
        originals,
        index or build_index(settings),
        quarantine=settings.storage.quarantine_dir,
        fsync=settings.storage.fsync,
    )


def build_ingest(settings: Settings, index: SqlIndex | None = None, *,
                 staging_name: str = "") -> IngestService:
    return IngestService(build_archive(settings, index, staging_name=staging_name))
