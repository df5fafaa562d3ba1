"""Every route but the allow-list refuses bad credentials (issue 7 §1).

The routes are read from the app itself (``app.routes``, and ``app.openapi()`` as a
cross-check), so a router added by any branch is covered without editing this file.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.routing import Mount, Route

from core.auth import SCOPES, is_public, required_scopes
from core.settings import Settings
from tests.security._support import bearer

ALL = list(SCOPES)


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x1", path)


def protected_requests(app: FastAPI, settings: Settings) -> list[tuple[str, str]]:
    out: set[tuple[str, str]] = set()
    for route in app.routes:
        if isinstance(route, Route):
            for method in sorted(route.methods or {"GET"}):
                if method == "HEAD":
                    continue
                out.add((method, _concrete(route.path)))
        elif isinstance(route, Mount):
            out.add(("GET", _concrete(route.path) + "/x1"))
    for path, item in app.openapi()["paths"].items():
        for method in item:
            out.add((method.upper(), _concrete(path)))
    return sorted((m, p) for m, p in out if not is_public(p, settings.auth.public_paths))


def _error_type(path: str) -> str:
    return "application/fhir+json" if path.startswith("/fhir/") else "application/problem+json"


def test_there_are_routes_to_check(app: FastAPI, secure_settings: Settings) -> None:
    paths = {p for _, p in protected_requests(app, secure_settings)}
    assert "/metrics" in paths and "/fhir/AuditEvent" in paths


def test_health_is_open_and_everything_else_is_not(client: TestClient, app: FastAPI,
                                                   secure_settings: Settings) -> None:
    assert client.get("/health").status_code == 200
    for method, path in protected_requests(app, secure_settings):
        r = client.request(method, path)
        assert r.status_code == 401, (method, path, r.status_code)
        # Under /fhir errors are OperationOutcomes (FHIR R4 http.html), else RFC 9457.
        assert r.headers["content-type"] == _error_type(path)
        assert r.headers["www-authenticate"].startswith("Bearer")
        if path.startswith("/fhir/"):
            assert r.json()["resourceType"] == "OperationOutcome"
            assert r.json()["issue"][0]["code"] == "login"
        else:
            assert r.json()["status"] == 401


@pytest.mark.parametrize("case", ["expired", "audience", "issuer", "not-yet", "garbage",
                                  "other-key", "alg-none", "basic"])
def test_bad_tokens_are_401_on_every_route(case: str, client: TestClient, app: FastAPI,
                                           secure_settings: Settings,
                                           token: Callable[..., str], tmp_path) -> None:
    from api.keys import issue_token

    now = time.time()
    if case == "expired":
        value = token(*ALL, now=now - 7200, ttl_s=600)
    elif case == "audience":
        value = token(*ALL, audience="someone-else")
    elif case == "issuer":
        value = issue_token(secure_settings.auth.model_copy(update={"issuer": "urn:evil"}),
                            subject="x", scopes=ALL)
    elif case == "not-yet":
        value = token(*ALL, now=now + 3600)
    elif case == "other-key":
        other = secure_settings.auth.model_copy(update={"local_key": tmp_path / "other.pem"})
        value = issue_token(other, subject="x", scopes=ALL)
    elif case == "alg-none":
        import base64
        import json

        def b64(d: dict[str, object]) -> str:
            return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

        value = b64({"alg": "none"}) + "." + b64({
            "iss": secure_settings.auth.issuer, "aud": "pacslab", "sub": "x",
            "exp": now + 600, "scope": " ".join(ALL)}) + "."
    else:
        value = "not-a-token"
    headers = {"Authorization": "Basic dXNlcjpwYXNz"} if case == "basic" else bearer(value)
    for method, path in protected_requests(app, secure_settings):
        r = client.request(method, path, headers=headers)
        assert r.status_code == 401, (case, method, path, r.status_code, r.text)
        assert 'error="invalid' in r.headers["www-authenticate"]


def test_wrong_scope_is_403_and_the_right_one_passes(client: TestClient, app: FastAPI,
                                                     secure_settings: Settings,
                                                     token: Callable[..., str]) -> None:
    for method, path in protected_requests(app, secure_settings):
        needed = required_scopes(method, path)
        others = [s for s in SCOPES if s not in needed]
        r = client.request(method, path, headers=bearer(token(*others)))
        assert r.status_code == 403, (method, path, r.status_code)
        # Under /fhir errors are OperationOutcomes (FHIR R4 http.html), else RFC 9457.
        assert r.headers["content-type"] == _error_type(path)
        assert 'error="insufficient_scope"' in r.headers["www-authenticate"]
        r = client.request(method, path, headers=bearer(token(needed[0])))
        assert r.status_code not in (401, 403), (method, path, r.status_code, r.text)


def test_a_route_added_later_is_protected_by_default(app: FastAPI,
                                                     token: Callable[..., str]) -> None:
    @app.get("/brand-new/{thing}")
    def brand_new(thing: str) -> dict[str, str]:
        return {"thing": thing}

    with TestClient(app) as client:
        assert client.get("/brand-new/1").status_code == 401
        assert client.get("/brand-new/1", headers=bearer(token("imaging.read"))).status_code == 403
        assert client.get("/brand-new/1", headers=bearer(token("admin"))).status_code == 200


def test_path_tricks_do_not_reach_protected_routes(client: TestClient) -> None:
    for path in ("/health/../metrics", "/viewer/static/../../metrics", "//metrics",
                 "/health/%2e%2e/metrics"):
        assert client.get(path).status_code in (401, 404), path


def test_api_key_for_a_device(client: TestClient, app: FastAPI) -> None:
    from storage.apikeys import ApiKeyStore

    store = ApiKeyStore(app.state.index.engine)
    key = store.create("CT scanner", ["admin"])
    assert client.get("/metrics", headers={"X-API-Key": key}).status_code == 200
    assert client.get("/metrics", headers=bearer(key)).status_code == 200
    assert client.get("/metrics", headers={"X-API-Key": key[:-2] + "xx"}).status_code == 401
    (record,) = store.list()
    # the secret itself may contain "_" (token_urlsafe): split off the prefix and key id only
    assert key.split("_", 2)[2] not in record.secret_hash  # only the hash is stored
    low = store.create("viewer", ["imaging.read"])
    assert client.get("/metrics", headers={"X-API-Key": low}).status_code == 403


def test_jwks_file_from_an_identity_provider(tmp_path, settings: Settings) -> None:
    """RS256 tokens of an external issuer, verified against its JWK Set file."""
    import json

    from joserfc import jwt
    from joserfc.jwk import KeySet, RSAKey

    from api.app import create_app
    from pacslab.wiring import build_index

    private = RSAKey.generate_key(2048)
    private.ensure_kid()
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(KeySet([private]).as_dict(private=False)))
    cfg = settings.model_copy(update={"auth": settings.auth.model_copy(update={
        "enabled": True, "jwks_path": jwks, "issuer": "https://idp.example/realms/h",
        "audience": "pacslab-api"})})
    build_index(cfg, migrate=True).close()
    now = int(time.time())
    claims = {"iss": "https://idp.example/realms/h", "aud": ["pacslab-api", "other"],
              "sub": "u1", "exp": now + 300, "scope": "admin"}
    good = jwt.encode({"alg": "RS256", "kid": private.kid}, claims, private)
    wrong_aud = jwt.encode({"alg": "RS256", "kid": private.kid}, {**claims, "aud": "x"}, private)
    with TestClient(create_app(cfg)) as client:
        assert client.get("/metrics", headers=bearer(good)).status_code == 200
        assert client.get("/metrics", headers=bearer(wrong_aud)).status_code == 401


def test_auth_can_be_disabled_for_other_components(settings: Settings) -> None:
    from api.app import create_app
    from pacslab.wiring import build_index

    assert Settings().auth.enabled  # on unless turned off
    assert not settings.auth.enabled  # the shared fixture turns it off
    build_index(settings, migrate=True).close()
    with TestClient(create_app(settings)) as client:
        assert client.get("/metrics").status_code == 200
