"""Who may call what: pure checks over token claims, scopes and API keys (no I/O).

Bearer tokens are JWTs (RFC 7519) signed with RS256 or ES256 (RFC 7518 3.3, 3.4);
their signature is checked at the edge (``api/auth.py``, against the JWK Set), and the
claims here: ``iss``, ``aud``, ``exp``, ``nbf`` (RFC 7519 4.1) and the OAuth2 ``scope``
(RFC 8693 4.2, RFC 9068 2.2.3). Devices use long-lived API keys
``plk_<key id>_<secret>``; only an scrypt hash (RFC 7914) of the secret is stored.

Which scope a request needs is decided by :func:`required_scopes` from the method and
path alone, so routers added later are covered without touching this module: a path
no rule names needs ``admin`` (deny by default).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import posixpath
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from core.errors import ForbiddenError, UnauthorizedError

__all__ = [
    "ANY_SCOPE",
    "SCOPES",
    "ApiKeySecret",
    "FailureLimiter",
    "Principal",
    "check_claims",
    "hash_api_key",
    "is_public",
    "new_api_key",
    "parse_api_key",
    "parse_scopes",
    "require",
    "required_scopes",
    "verify_api_key",
]

#: The purposes a token may be issued for (issue 7).
SCOPES: Final = (
    "imaging.read",
    "imaging.write",
    "lab.read",
    "lab.write",
    "orders.read",
    "orders.write",
    "results.sign",
    # Create and revoke share links to one study (issue 17 item 4).
    "imaging.share",
    "admin",
)
#: Any authenticated caller (e.g. the FHIR capability statement).
ANY_SCOPE: Final = "*"

_READ = frozenset({"GET", "HEAD", "OPTIONS"})
_WRITE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_ALL = _READ | _WRITE


@dataclass(frozen=True, slots=True)
class _Rule:
    methods: frozenset[str]
    pattern: re.Pattern[str]
    #: Any one of these scopes is enough.
    scopes: tuple[str, ...]


def _rule(methods: frozenset[str], pattern: str, *scopes: str) -> _Rule:
    return _Rule(methods, re.compile(pattern), scopes)


#: First match wins: specific operations before the resource families.
_RULES: Final = (
    # Signing results (FHIR operations $sign / $amend on DiagnosticReport).
    _rule(_WRITE, r"^/fhir/DiagnosticReport/(\$sign|[^/]+/\$(sign|amend))$", "results.sign"),
    # The action log itself is for auditors only.
    _rule(_ALL, r"^/fhir/AuditEvent(/|$)", "admin"),
    _rule(_READ, r"^/fhir/metadata$", ANY_SCOPE),
    _rule(_READ, r"^/fhir/(Observation|DiagnosticReport|Specimen|Provenance)(/|$)", "lab.read"),
    _rule(_WRITE, r"^/fhir/(Observation|DiagnosticReport|Specimen)(/|$)", "lab.write"),
    _rule(_READ, r"^/fhir/ServiceRequest(/|$)", "orders.read", "orders.write"),
    _rule(_WRITE, r"^/fhir/ServiceRequest(/|$)", "orders.write"),
    _rule(_READ, r"^/fhir/(ImagingStudy|Endpoint)(/|$)", "imaging.read"),
    _rule(_READ, r"^/fhir/Patient(/|$)", "imaging.read", "lab.read", "orders.read"),
    # DICOMweb: STOW-RS stores, everything else reads (PS3.18 10.5, 10.4, 10.6).
    _rule(frozenset({"POST"}), r"^/dicomweb/studies(/[^/]+)?$", "imaging.write"),
    _rule(_READ, r"^/(dicomweb|iiif|dzi|viewer|wado)(/|$)", "imaging.read"),
    _rule(_ALL, r"^/admin/shares(/|$)", "imaging.share", "admin"),
    # Export (issue 17.3): the same instances as WADO-RS, as a ZIP file-set.
    _rule(_READ, r"^/export(/|$)", "imaging.read"),
    _rule(_ALL, r"^/(metrics|admin|jobs)(/|$)", "admin"),
)
_DEFAULT: Final = ("admin",)


def _normalise(path: str) -> str:
    norm = posixpath.normpath(path) if path else "/"
    return "/" + norm.lstrip("/")


def is_public(path: str, public_paths: Iterable[str]) -> bool:
    """True if ``path`` is on the allow-list: an exact entry, or under one ending in ``/``.

    A path with ``.``/``..``/``//`` segments is public only if its normalised form
    and the raw form both are, so traversal cannot reach a protected route.
    """
    allowed = list(public_paths)

    def one(p: str) -> bool:
        return any(p == entry or (entry.endswith("/") and p.startswith(entry)) for entry in allowed)

    return one(path) and one(_normalise(path))


def required_scopes(method: str, path: str) -> tuple[str, ...]:
    """The scopes (any one suffices) a request needs; ``admin`` if no rule names the path.

    Both the raw and the normalised path are looked up and the stricter answer kept
    when they differ (``admin`` being the strictest).
    """

    def lookup(p: str) -> tuple[str, ...]:
        m = method.upper()
        for rule in _RULES:
            if m in rule.methods and rule.pattern.search(p):
                return rule.scopes
        return _DEFAULT

    raw, norm = lookup(path), lookup(_normalise(path))
    if raw == norm:
        return raw
    return _DEFAULT


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: a token subject, an API key, or (auth off) ``anonymous``."""

    subject: str
    scopes: frozenset[str]
    kind: str = "user"  # user | apikey | anonymous | share
    issuer: str = ""
    client_id: str = ""
    claims: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def allows(self, needed: Iterable[str]) -> bool:
        wanted = tuple(needed)
        if ANY_SCOPE in wanted:
            return True
        return any(scope in self.scopes for scope in wanted)


def require(principal: Principal, needed: tuple[str, ...]) -> None:
    """Raise :class:`ForbiddenError` unless ``principal`` holds one of ``needed``."""
    if not principal.allows(needed):
        raise ForbiddenError(
            f"this request needs scope {' or '.join(needed)}", scope=" ".join(needed)
        )


def parse_scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    """Scopes from ``scope`` (space-separated, RFC 8693 4.2) or ``scp`` (a list)."""
    value = claims.get("scope", claims.get("scp", ""))
    if isinstance(value, str):
        items = value.split()
    elif isinstance(value, list):
        items = [str(v) for v in value]
    else:
        items = []
    return frozenset(items)


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UnauthorizedError(f"claim {name} is not a NumericDate")
    return float(value)


def check_claims(
    claims: Mapping[str, Any],
    *,
    issuer: str,
    audience: str,
    now: float,
    leeway_s: float = 30.0,
) -> Principal:
    """Validate registered claims of a verified JWT (RFC 7519 4.1) and build the principal.

    ``exp`` is required (tokens without an end are not accepted), ``sub`` too.

    Raises
    ------
    UnauthorizedError
        Naming the failed check (``expired``, ``audience``…), never a claim value.
    """
    exp = _number(claims, "exp")
    if exp is None:
        raise UnauthorizedError("token has no exp claim")
    if now > exp + leeway_s:
        raise UnauthorizedError("token expired")
    nbf = _number(claims, "nbf")
    if nbf is not None and now + leeway_s < nbf:
        raise UnauthorizedError("token not yet valid")
    if claims.get("iss") != issuer:
        raise UnauthorizedError("token issuer not accepted")
    aud = claims.get("aud")
    audiences = aud if isinstance(aud, list) else [aud]
    if audience not in audiences:
        raise UnauthorizedError("token audience not accepted")
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise UnauthorizedError("token has no sub claim")
    client = claims.get("client_id", claims.get("azp", ""))
    return Principal(
        subject=subject,
        scopes=parse_scopes(claims),
        kind="user",
        issuer=issuer,
        client_id=str(client or ""),
        claims=dict(claims),
    )


# -- API keys -----------------------------------------------------------------------

_KEY_RE = re.compile(r"^plk_([0-9a-f]{16})_([A-Za-z0-9_-]{32,128})$")
#: scrypt cost (RFC 7914 2): n=2**14, r=8, p=1 is ~16 MiB and tens of ms per check;
#: successful checks are cached briefly by the caller.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


@dataclass(frozen=True, slots=True)
class ApiKeySecret:
    """A parsed ``plk_<key id>_<secret>`` value."""

    key_id: str
    secret: str

    @property
    def token(self) -> str:
        return f"plk_{self.key_id}_{self.secret}"


def new_api_key() -> ApiKeySecret:
    """A fresh key: 64-bit public id, 256-bit secret (base64url)."""
    return ApiKeySecret(secrets.token_hex(8), secrets.token_urlsafe(32))


def parse_api_key(value: str) -> ApiKeySecret | None:
    """The key id and secret of an API key, or None if ``value`` is not shaped like one."""
    m = _KEY_RE.match(value)
    return ApiKeySecret(m.group(1), m.group(2)) if m else None


def hash_api_key(secret: str, *, salt: bytes | None = None) -> str:
    """``scrypt$n$r$p$salt$hash`` of ``secret`` (RFC 7914), for storage."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(
        secret.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32
    )
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${salt.hex()}${digest.hex()}"


def verify_api_key(secret: str, stored: str) -> bool:
    """Constant-time check of ``secret`` against a :func:`hash_api_key` value."""
    try:
        scheme, n, r, p, salt_hex, digest_hex = stored.split("$")
        if scheme != "scrypt":
            return False
        digest = hashlib.scrypt(
            secret.encode(),
            salt=bytes.fromhex(salt_hex),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(digest_hex) // 2,
        )
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(digest.hex(), digest_hex)


class FailureLimiter:
    """Token buckets of failed authentications, one per client address (pure, no clock).

    Each client starts with ``burst`` tokens; every failed authentication takes one and
    they come back at ``per_s`` a second. A client with less than one token is refused
    *before* its credentials are looked at (429, RFC 6585 4), so a flood of wrong API
    keys or forged tokens costs neither scrypt (RFC 7914) nor signature work, and a
    client that authenticates correctly never spends a token. Buckets that have filled
    up again are forgotten, so memory stays bounded by the clients failing right now
    (and by ``max_clients``: beyond it the fullest buckets are dropped first).
    """

    def __init__(self, *, burst: int, per_s: float, max_clients: int = 100_000) -> None:
        if burst < 1 or per_s <= 0:
            raise ValueError("burst must be >= 1 and per_s > 0")
        self.burst = float(burst)
        self.per_s = per_s
        self.max_clients = max_clients
        #: client -> (tokens, at): the bucket's level at monotonic time ``at``.
        self._buckets: dict[str, tuple[float, float]] = {}

    def _level(self, client: str, now: float) -> float:
        tokens, at = self._buckets.get(client, (self.burst, now))
        return min(self.burst, tokens + max(0.0, now - at) * self.per_s)

    def retry_after(self, client: str, now: float) -> int:
        """0 if ``client`` may try to authenticate now, else whole seconds to wait."""
        level = self._level(client, now)
        if level >= 1.0:
            return 0
        return max(1, math.ceil((1.0 - level) / self.per_s))

    def failed(self, client: str, now: float) -> None:
        """Take one token from ``client``'s bucket (a failed authentication)."""
        level = self._level(client, now) - 1.0
        self._buckets[client] = (max(level, -self.burst), now)
        if len(self._buckets) > self.max_clients:
            self._prune(now)

    def _prune(self, now: float) -> None:
        full = [c for c in self._buckets if self._level(c, now) >= self.burst]
        for c in full:
            del self._buckets[c]
        if len(self._buckets) > self.max_clients:
            # Still too many clients failing at once: forget the least drained half.
            ranked = sorted(self._buckets, key=lambda c: self._level(c, now), reverse=True)
            for c in ranked[: len(ranked) // 2]:
                del self._buckets[c]

    def __len__(self) -> int:
        return len(self._buckets)
