"""Keys and certificates: the embedded token issuer, the JWK Set, the hospital certificate.

Embedded default (first run, no identity provider configured): an ES256 (P-256) key at
``auth.local_key`` signs the tokens ``pacslab token`` prints, and its public half is
the only key in the JWK Set (RFC 7517 5). Results are signed with the hospital's key
and X.509 certificate (``signing.key``/``signing.cert``); without them a self-signed
P-256 certificate is created — enough to demonstrate and test, not a legal e-signature.
Private keys are written with mode 0600 under a 0700 directory, atomically, and
exactly one of several processes starting together creates each.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet, RSAKey

from core.settings import AuthSettings, SigningSettings

__all__ = [
    "JwksSource",
    "ensure_hospital_cert",
    "ensure_private_key",
    "issue_token",
    "load_certificate",
    "local_jwks",
]

logger = logging.getLogger(__name__)

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _write_once(path: Path, data: bytes) -> None:
    """Create ``path`` with ``data`` (0600) unless it exists; atomic and race-free."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def ensure_private_key(path: Path) -> PrivateKey:
    """Load the PEM private key at ``path``, creating a P-256 key there if missing."""
    if not path.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write_once(path, pem)
        logger.info("created signing key %s", path)
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(loaded, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError(f"{path}: only EC P-256 and RSA keys are supported")
    return loaded


def _jwk(key: Any, *, private: bool) -> ECKey | RSAKey:
    pem = (
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        if private
        else key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    jwk: ECKey | RSAKey = (
        ECKey.import_key(pem)
        if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey)
        else RSAKey.import_key(pem)
    )
    jwk.ensure_kid()  # RFC 7638 thumbprint
    return jwk


def local_jwks(settings: AuthSettings) -> KeySet:
    """The embedded issuer's public JWK Set (one key)."""
    assert settings.local_key is not None
    private = ensure_private_key(settings.local_key)
    return KeySet([_jwk(private.public_key(), private=False)])


def issue_token(
    settings: AuthSettings,
    *,
    subject: str,
    scopes: list[str],
    ttl_s: int | None = None,
    now: float | None = None,
    audience: str | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """A JWT (RFC 7519) from the embedded issuer, ES256-signed (RFC 7518 3.4)."""
    assert settings.local_key is not None
    private = ensure_private_key(settings.local_key)
    key = _jwk(private, private=True)
    issued = int(now if now is not None else time.time())
    claims: dict[str, Any] = {
        "iss": settings.issuer,
        "aud": audience if audience is not None else settings.audience,
        "sub": subject,
        "iat": issued,
        "nbf": issued,
        "exp": issued + (ttl_s if ttl_s is not None else settings.token_ttl_s),
        "jti": uuid.uuid4().hex,
        "scope": " ".join(scopes),
    }
    claims.update(extra or {})
    alg = "ES256" if isinstance(private, ec.EllipticCurvePrivateKey) else "RS256"
    header = {"alg": alg, "typ": "JWT", "kid": key.kid}
    return jwt.encode(header, claims, key, algorithms=[alg])


class JwksSource:
    """The JWK Set tokens are verified against: embedded key, a file, or an https URL.

    A URL is fetched at most every ``jwks_cache_s`` seconds, and once more (at most
    every 30 s) when a token names a ``kid`` the cached set lacks (key rotation).
    """

    def __init__(self, settings: AuthSettings) -> None:
        self.settings = settings
        self._keys: KeySet | None = None
        self._fetched = 0.0
        self._lock = threading.Lock()

    def _load(self) -> KeySet:
        s = self.settings
        if s.jwks_path is not None:
            return KeySet.import_key_set(json.loads(s.jwks_path.read_text()))
        if s.jwks_url:
            with urllib.request.urlopen(s.jwks_url, timeout=10) as resp:
                return KeySet.import_key_set(json.loads(resp.read()))
        return local_jwks(s)

    def keys(self, *, refresh_for_kid: str | None = None) -> KeySet:
        with self._lock:
            now = time.monotonic()
            stale = self._keys is None or (
                self.settings.jwks_url and now - self._fetched > self.settings.jwks_cache_s
            )
            if (
                not stale
                and refresh_for_kid
                and self._keys is not None
                and not any(k.kid == refresh_for_kid for k in self._keys.keys)
                and (self.settings.jwks_url or self.settings.jwks_path)
                and now - self._fetched > 30
            ):
                stale = True
            if stale:
                try:
                    self._keys = self._load()
                    self._fetched = now
                except Exception:
                    if self._keys is None:
                        raise
                    logger.error("JWK Set refresh failed; keeping the cached keys", exc_info=True)
            assert self._keys is not None
            return self._keys


def load_certificate(path: Path) -> x509.Certificate:
    """The first certificate of a PEM file."""
    return x509.load_pem_x509_certificate(path.read_bytes())


def ensure_hospital_cert(settings: SigningSettings) -> tuple[x509.Certificate, PrivateKey]:
    """The hospital's certificate and key, creating a self-signed pair if none exist."""
    assert settings.cert is not None and settings.key is not None
    key = ensure_private_key(settings.key)
    if not settings.cert.exists():
        name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, settings.organization),
            x509.NameAttribute(NameOID.COMMON_NAME, "pacslab result signing"),
        ])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=True, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        with contextlib.suppress(FileExistsError):
            _write_once(settings.cert, cert.public_bytes(serialization.Encoding.PEM))
        logger.warning("created a self-signed result-signing certificate %s: configure the "
                       "hospital's certificate (signing.cert/signing.key) for legal e-signatures",
                       settings.cert)
    return load_certificate(settings.cert), key
