"""CORS (Fetch standard) on the API with authentication ON (issue 13.7).

Starlette's CORSMiddleware is outermost: a preflight from an allowed origin is
answered without a token; one from any other origin gets no Access-Control-* header,
and with no origins configured the API stays same-origin only. The browser itself is
exercised in tests/api/test_dicomweb_browser.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from core.settings import Settings
from tests.api._support import Stored, running_app, store_ct

VIEWER = "http://viewer.example:3000"
ACCEPT_MULTIPART = 'multipart/related; type="application/octet-stream"'


def secured(settings: Settings, origins: list[str]) -> Settings:
    http = settings.http.model_copy(update={"cors_origins": origins})
    auth = settings.auth.model_copy(update={"enabled": True})
    return settings.model_copy(update={"http": http, "auth": auth})


@pytest.fixture
def cors_app(settings: Settings) -> Iterator[FastAPI]:
    with running_app(secured(settings, [VIEWER])) as application:
        yield application


@pytest.fixture
def stored(cors_app: FastAPI, tmp_path: Path) -> Stored:
    return store_ct(cors_app, tmp_path / "ct")


def token(app: FastAPI, *scopes: str) -> str:
    from api.keys import issue_token

    return issue_token(app.state.settings.auth, subject="viewer", scopes=list(scopes))


def preflight(client: TestClient, url: str, origin: str, method: str = "GET") -> object:
    return client.options(url, headers={
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization,accept",
    })


def test_preflight_from_allowed_origin_needs_no_token(cors_app: FastAPI, stored: Stored) -> None:
    client = TestClient(cors_app)
    url = f"/dicomweb/studies/{stored.study}/series/{stored.series}/instances/{stored.sops[0]}"
    for path in ("/dicomweb/studies", url + "/frames/1", url + "/metadata", "/fhir/metadata"):
        r = preflight(client, path, VIEWER)
        assert r.status_code == 200, (path, r.status_code, r.text)  # type: ignore[attr-defined]
        h = r.headers  # type: ignore[attr-defined]
        assert h["access-control-allow-origin"] == VIEWER
        assert "GET" in h["access-control-allow-methods"]
        assert "authorization" in h["access-control-allow-headers"].lower()
        assert "access-control-allow-credentials" not in h
    r = preflight(client, "/dicomweb/studies", VIEWER, "POST")
    assert r.status_code == 200  # type: ignore[attr-defined]


def test_actual_requests_carry_cors_headers(cors_app: FastAPI, stored: Stored) -> None:
    client = TestClient(cors_app)
    # without a token: 401, readable by the page (WWW-Authenticate exposed)
    r = client.get("/dicomweb/studies", headers={"Origin": VIEWER})
    assert r.status_code == 401
    assert r.headers["access-control-allow-origin"] == VIEWER
    exposed = r.headers["access-control-expose-headers"].lower()
    for name in ("www-authenticate", "content-location", "link", "content-length", "warning"):
        assert name in exposed
    auth = {"Authorization": f"Bearer {token(cors_app, 'imaging.read')}", "Origin": VIEWER}
    r = client.get("/dicomweb/studies", headers=auth)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == VIEWER
    url = f"/dicomweb/studies/{stored.study}/series/{stored.series}/instances/{stored.sops[0]}"
    r = client.get(url + "/frames/1", headers={**auth, "Accept": ACCEPT_MULTIPART})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == VIEWER


def test_other_origins_get_no_cors_headers(cors_app: FastAPI, stored: Stored) -> None:
    client = TestClient(cors_app)
    r = preflight(client, "/dicomweb/studies", "http://evil.example")
    assert r.status_code == 400  # type: ignore[attr-defined]
    assert "access-control-allow-origin" not in r.headers  # type: ignore[attr-defined]
    auth = {"Authorization": f"Bearer {token(cors_app, 'imaging.read')}",
            "Origin": "http://evil.example"}
    r = client.get("/dicomweb/studies", headers=auth)
    assert "access-control-allow-origin" not in r.headers


def test_no_origins_configured_is_same_origin_only(settings: Settings) -> None:
    with running_app(secured(settings, [])) as application:
        client = TestClient(application)
        r = preflight(client, "/dicomweb/studies", VIEWER)
        assert r.status_code == 401  # type: ignore[attr-defined]
        assert "access-control-allow-origin" not in r.headers  # type: ignore[attr-defined]


@pytest.mark.parametrize("origin", ["viewer.example", "http://viewer.example/path", "ftp://x"])
def test_origins_must_be_scheme_host_port(origin: str) -> None:
    with pytest.raises(ValueError, match="cors_origins"):
        Settings(http={"cors_origins": [origin]})


def test_origins_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACSLAB_HTTP__CORS_ORIGINS", '["https://OHIF.example.org:3000"]')
    assert Settings().http.cors_origins == ["https://ohif.example.org:3000"]
