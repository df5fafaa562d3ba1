"""Wire the HTTP API of ``pacslab serve`` and ``pacslab api`` over uvicorn."""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator

from fastapi import FastAPI

from api.app import create_app
from core.settings import Settings
from pacslab.wiring import build_archive, build_index
from storage.originals import clear_staging

__all__ = ["api_app", "http_staging_name", "run_api"]

logger = logging.getLogger(__name__)


def http_staging_name(settings: Settings) -> str:
    """This API process's staging subdirectory (STOW-RS spools and parts): unique
    among the processes sharing one originals directory, the same after a restart."""
    return f"http-{socket.gethostname()}-{settings.http.port}"


@contextlib.contextmanager
def api_app(settings: Settings) -> Iterator[FastAPI]:
    """The application with its own index and archive, released on exit.

    A STOW-RS request cut off by a crash leaves its spool and parts in staging; they
    were never acknowledged (the client got no 200), so they are removed here, before
    this process accepts anything.
    """
    index = build_index(settings, migrate=False)
    archive = build_archive(settings, index, staging_name=http_staging_name(settings))
    removed = clear_staging(archive.staging_dir())
    if removed:
        logger.warning("removed %d unacknowledged STOW-RS files from staging", removed)
    try:
        yield create_app(settings, index=index, archive=archive)
    finally:
        archive.close()
        index.close()


def run_api(settings: Settings) -> None:
    """Serve HTTP until SIGTERM or SIGINT (uvicorn handles both)."""
    import uvicorn

    with api_app(settings) as app:
        logger.info("HTTP on port %d; data in %s", settings.http.port, settings.data_dir)
        uvicorn.run(
            app,
            host=settings.http.host,
            port=settings.http.port,
            log_level=settings.log.level.lower(),
            access_log=False,
        )
