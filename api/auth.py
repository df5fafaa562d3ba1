"""Authentication and authorization for every HTTP route (issue 7 §1).

:class:`AuthMiddleware` is a plain ASGI middleware installed by ``create_app``, so it
covers every route, router and mount added now or later: a request is let through
without credentials only if its path is on ``auth.public_paths``; otherwise it needs
a bearer JWT (RFC 6750, RFC 7519; RS256/ES256 verified against the JWK Set) or a
device API key, holding one of the scopes :func:`core.auth.required_scopes` names
for its method and path (``admin`` for paths no rule names). Failures are
``application/problem+json`` (RFC 9457) with ``WWW-Authenticate`` (RFC 6750 3):
401 for missing or unacceptable credentials, 403 for a missing scope, and 429 with
``Retry-After`` (RFC 6585 4) for a client address that sent too many wrong API keys
lately (:class:`core.auth.FailureLimiter`; refused before any scrypt work).

The principal is left in ``request.state.principal`` for routes
(:data:`PrincipalDep`) and for the action log (``api/audit.py``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any

import anyio
from fastapi import Depends, Request
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, RSAKey
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.fhir._core import operation_outcome
from core.auth import (
    SCOPES,
    FailureLimiter,
    Principal,
    check_claims,
    is_public,
    parse_api_key,
    require,
    required_scopes,
    verify_api_key,
)
from core.errors import ForbiddenError, ServiceError, TooManyRequestsError, UnauthorizedError
from core.settings import AuthSettings
from core.sharing import SHARE_PREFIX, ShareGrant, share_allows
from storage.apikeys import ApiKeyStore

if TYPE_CHECKING:
    from services.sharing import ShareService

__all__ = [
    "ANONYMOUS",
    "AuthMiddleware",
    "Authenticator",
    "PrincipalDep",
    "current_principal",
    "problem_body",
]

logger = logging.getLogger(__name__)

#: The principal when ``auth.enabled`` is false (tests of other components only).
ANONYMOUS = Principal(subject="anonymous", scopes=frozenset(SCOPES), kind="anonymous")

_KEY_TYPE = {"RS256": RSAKey, "ES256": ECKey}
_API_KEY_CACHE_S = 60.0


def _jose_header(token: str) -> dict[str, Any]:
    """The protected header of a compact JWS (RFC 7515 7.1), not yet verified."""
    try:
        first, _, _ = token.split(".")
        header = json.loads(base64.urlsafe_b64decode(first + "=" * (-len(first) % 4)))
    except (ValueError, TypeError) as exc:
        raise UnauthorizedError("malformed token") from exc
    if not isinstance(header, dict):
        raise UnauthorizedError("malformed token")
    return header


class Authenticator:
    """Turn request headers into a :class:`Principal`, or raise :class:`UnauthorizedError`."""

    def __init__(self, settings: AuthSettings, api_keys: ApiKeyStore | None = None,
                 jwks: Any = None, shares: ShareService | None = None) -> None:
        from api.keys import JwksSource

        self.settings = settings
        self.api_keys = api_keys
        self.shares = shares
        self.jwks = jwks or JwksSource(settings)
        # Successful scrypt checks, by SHA-256 of the key: (when, the stored hash they
        # matched), for _API_KEY_CACHE_S. scrypt is deliberately slow and a device may
        # send a request per instance; revocation is read from the row every time.
        self._key_cache: dict[str, tuple[float, str]] = {}
        self._failures = FailureLimiter(burst=settings.failed_auth_burst,
                                        per_s=settings.failed_auth_per_s)
        self._lock = threading.Lock()

    def authenticate(self, headers: Mapping[str, str], client: str = "") -> Principal:
        """The caller named by ``headers``; ``client`` (the peer address) is rate limited.

        Raises
        ------
        TooManyRequestsError
            ``client`` sent too many wrong API keys lately; nothing was checked.
        UnauthorizedError
            Missing or unacceptable credentials.
        """
        authz = headers.get("authorization", "")
        api_key = headers.get("x-api-key", "")
        if authz:
            scheme, _, value = authz.partition(" ")
            value = value.strip()
            if scheme.lower() != "bearer" or not value:
                raise UnauthorizedError("use the Bearer scheme", error="invalid_request")
            if value.startswith("plk_"):
                return self._limited_api_key(value, client)
            if value.startswith(SHARE_PREFIX):
                return self._share(value)
            return self._jwt(value)
        if api_key:
            return self._limited_api_key(api_key.strip(), client)
        raise UnauthorizedError("authentication required", error="")

    def _limited_api_key(self, value: str, client: str) -> Principal:
        """:meth:`_api_key` behind ``client``'s failure bucket (:class:`FailureLimiter`).

        Only API keys are limited: they are what costs scrypt time (RFC 7914) per
        guess; a wrong JWT costs one ES256/RS256 verification, as cheap as the refusal.
        """
        with self._lock:
            wait = self._failures.retry_after(client, time.monotonic())
        if wait:
            raise TooManyRequestsError(retry_after_s=wait)
        try:
            return self._api_key(value)
        except UnauthorizedError:
            with self._lock:
                self._failures.failed(client, time.monotonic())
            raise

    def _share(self, token: str) -> Principal:
        """A share link's token (core/sharing.py): read access to one study only.

        256 random bits, so guessing is hopeless and no failure bucket is spent on it;
        the row is read on every request, so expiry and revocation act at once.
        """
        if self.shares is None:
            raise UnauthorizedError("share links are not enabled")
        grant = self.shares.resolve(token)
        return Principal(subject=f"share:{grant.share_id}", scopes=frozenset(), kind="share",
                         claims={"grant": grant})

    def _jwt(self, token: str) -> Principal:
        s = self.settings
        header = _jose_header(token)
        alg = header.get("alg")
        if alg not in s.algorithms:
            raise UnauthorizedError("token algorithm not accepted")
        kid = header.get("kid")
        keys = self.jwks.keys(refresh_for_kid=kid if isinstance(kid, str) else None)
        candidates = [
            k for k in keys.keys
            if isinstance(k, _KEY_TYPE[alg]) and (kid is None or k.kid == kid)
        ]
        if not candidates:
            raise UnauthorizedError("no key for this token")
        for key in candidates:
            try:
                token_obj = jwt.decode(token, key, algorithms=[alg])
                break
            except JoseError:
                continue
        else:
            raise UnauthorizedError("token signature invalid")
        return check_claims(token_obj.claims, issuer=s.issuer, audience=s.audience,
                            now=time.time(), leeway_s=s.leeway_s)

    def _api_key(self, value: str) -> Principal:
        """Check a ``plk_<id>_<secret>`` key: the cheap checks first, scrypt last.

        The key's row is read on every request (a primary-key lookup), so an unknown
        key id is refused without any scrypt work, and a revocation — by this process
        or by ``pacslab apikey revoke`` elsewhere — takes effect on the next request.
        Only the scrypt verdict is cached (by SHA-256 of the whole key, tied to the
        stored hash), because scrypt is what is slow. Key ids are public (they name
        the key in logs), so answering an unknown id faster than a wrong secret
        discloses nothing a caller could not already see.
        """
        parsed = parse_api_key(value)
        if parsed is None or self.api_keys is None:
            raise UnauthorizedError("API key not accepted")
        record = self.api_keys.get(parsed.key_id)
        if record is None or record.revoked:
            raise UnauthorizedError("API key not accepted")
        digest = hashlib.sha256(value.encode()).hexdigest()
        now = time.monotonic()
        with self._lock:
            cached = self._key_cache.get(digest)
        fresh = cached is not None and now - cached[0] < _API_KEY_CACHE_S
        if not (fresh and cached is not None and cached[1] == record.secret_hash):
            if not verify_api_key(parsed.secret, record.secret_hash):
                raise UnauthorizedError("API key not accepted")
            with self._lock:
                if len(self._key_cache) > 10_000:
                    self._key_cache.clear()
                self._key_cache[digest] = (now, record.secret_hash)
        return Principal(subject=f"apikey:{record.key_id}", scopes=record.scopes,
                         kind="apikey", client_id=record.name)


def problem_body(exc: ServiceError, instance: str) -> bytes:
    """``application/problem+json`` (RFC 9457 3.1) for an error; no PHI in ``detail``."""
    return json.dumps({
        "type": "about:blank",
        "title": exc.title,
        "status": exc.http_status,
        "detail": str(exc) or exc.title,
        "instance": instance,
    }).encode()


def _www_authenticate(exc: ServiceError) -> str:
    parts = ['Bearer realm="pacslab"']
    if isinstance(exc, UnauthorizedError) and exc.error:
        parts.append(f'error="{exc.error}"')
        parts.append(f'error_description="{exc!s}"')
    elif isinstance(exc, ForbiddenError):
        parts.append('error="insufficient_scope"')
        parts.append(f'scope="{exc.scope}"')
    return ", ".join(parts)


class AuthMiddleware:
    """Pure ASGI: authenticate and authorize every non-public HTTP/WebSocket request."""

    def __init__(self, app: ASGIApp, *, authenticator: Authenticator | None,
                 settings: AuthSettings) -> None:
        self.app = app
        self.authenticator = authenticator
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        state = scope.setdefault("state", {})
        if not self.settings.enabled or self.authenticator is None:
            state["principal"] = ANONYMOUS
            await self.app(scope, receive, send)
            return
        if is_public(path, self.settings.public_paths):
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "GET")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        try:
            client = scope.get("client")
            principal = await anyio.to_thread.run_sync(
                self.authenticator.authenticate, headers, str(client[0]) if client else "")
            state["principal"] = principal
            grant = principal.claims.get("grant") if principal.kind == "share" else None
            if isinstance(grant, ShareGrant):
                query = scope.get("query_string", b"").decode("latin-1")
                if not share_allows(grant, method, path, query):
                    raise ForbiddenError("a share link opens its own study only", scope="")
            else:
                require(principal, required_scopes(method, path))
        except (UnauthorizedError, ForbiddenError, TooManyRequestsError) as exc:
            state["auth_error"] = str(exc)
            logger.info("HTTP %s %s refused: %s", method, path, exc)
            await self._refuse(exc, path, scope, send)
            return
        except Exception:
            # A failing key source is our fault, but must never let a request through.
            logger.error("authentication failed unexpectedly", exc_info=True)
            await self._refuse(UnauthorizedError("authentication unavailable"), path, scope, send)
            return
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(exc: ServiceError, path: str, scope: Scope, send: Send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body, media_type = problem_body(exc, path), b"application/problem+json"
        if path == "/fhir" or path.startswith("/fhir/"):
            # FHIR R4 http.html: errors under the FHIR base are OperationOutcomes.
            outcome = operation_outcome("error", exc.fhir_code, str(exc) or exc.title)
            body, media_type = json.dumps(outcome).encode(), b"application/fhir+json"
        headers = [
            (b"content-type", media_type),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
        ]
        if isinstance(exc, TooManyRequestsError):
            headers.append((b"retry-after", str(exc.retry_after_s).encode()))
        else:
            headers.append((b"www-authenticate", _www_authenticate(exc).encode("latin-1")))
        start: Message = {"type": "http.response.start", "status": exc.http_status,
                          "headers": headers}
        await send(start)
        await send({"type": "http.response.body", "body": body})


def current_principal(request: Request) -> Principal:
    """The caller of this request (set by :class:`AuthMiddleware`)."""
    principal = getattr(request.state, "principal", None)
    if not isinstance(principal, Principal):
        raise UnauthorizedError("authentication required")
    return principal


PrincipalDep = Annotated[Principal, Depends(current_principal)]
