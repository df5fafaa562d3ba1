"""``/docs``: Swagger UI served from this process, never from a CDN (issue 14.9).

FastAPI's default ``/docs`` page loads Swagger UI's JavaScript and CSS from a CDN and
its favicon from fastapi.tiangolo.com: a hospital network may block them, and a
compromised CDN would run script next to the clinicians' tokens. This follows
FastAPI's documented "self-hosting JavaScript and CSS for docs" pattern with the
files of the ``swagger-ui-bundle`` package (Swagger UI's own release files, so no
minified JavaScript is committed here), mounted under ``/static/swagger-ui/`` (public,
like the viewer's scripts). ``/redoc`` is turned off: no package ships ReDoc's
bundle, and one documentation page is enough.
"""

from __future__ import annotations

from typing import Final

import swagger_ui_bundle
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse

from api.routes.viewer import NoSniffStaticFiles

__all__ = ["ASSETS", "install_docs"]

#: Where Swagger UI's files are served (under the public ``/static/`` prefix).
ASSETS: Final = "/static/swagger-ui"


def install_docs(app: FastAPI) -> None:
    """Add ``/docs`` and ``/docs/oauth2-redirect`` with local assets.

    Call before anything is mounted at ``/static`` (the first matching mount wins),
    on an app created with ``docs_url=None, redoc_url=None``.
    """
    app.mount(ASSETS, NoSniffStaticFiles(directory=swagger_ui_bundle.swagger_ui_path),
              name="swagger-ui")

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - API docs",
            oauth2_redirect_url="/docs/oauth2-redirect",
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon-32x32.png",
        )

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()
