"""Signed results: detached JWS over RFC 8785 canonical JSON, with the hospital's X.509 chain.

The signature is a JWS Compact Serialization with detached content (RFC 7515
Appendix F): ``BASE64URL(header)..BASE64URL(signature)``, where the payload is the
report's canonical bytes (:func:`core.canonical.canonicalize`). The protected header
carries ``alg`` (ES256 or RS256, RFC 7518 3.3/3.4), ``x5c`` (the signing certificate,
RFC 7515 4.1.6), ``x5t#S256`` and ``sigT`` (signing time, ETSI TS 119 182-1 JAdES).
Anyone holding the certificate can verify it offline — ``pacslab verify-signature`` or
any JOSE library (the tests use ``jwcrypto``). The FHIR R4 ``Provenance`` built here
carries the same JWS in ``signature.data`` (``sigFormat: application/jose``), as
FHIR R4 §2.6.2 (Signatures) describes.
"""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, RSAKey
from joserfc.registry import HeaderParameter

from core.errors import InvalidSignatureError

__all__ = ["cert_sha256", "provenance", "sign_detached", "verify_detached"]

#: ASTM E1762 signature type "Author's Signature" (FHIR R4 ValueSet signature-type).
_AUTHOR_SIGNATURE = {
    "system": "urn:iso-astm:E1762-95:2013",
    "code": "1.2.840.10065.1.12.1.1",
    "display": "Author's Signature",
}


class _ReportRegistry(jws.JWSRegistry):
    # joserfc's defaults (512-byte header, 128 kB payload) fit tokens, not an x5c
    # certificate in the header or a long report as payload.
    max_header_length = 64 * 1024
    max_payload_length = 64 * 1024 * 1024


_REGISTRY = _ReportRegistry(
    header_registry={"sigT": HeaderParameter("Claimed signing time (ETSI JAdES)", "str")},
    algorithms=["ES256", "RS256"],
)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def cert_sha256(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _private_jwk(key: Any) -> tuple[ECKey | RSAKey, str]:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.name != "secp256r1":
            raise ValueError("ES256 needs a P-256 key")
        return ECKey.import_key(pem), "ES256"
    if isinstance(key, rsa.RSAPrivateKey):
        return RSAKey.import_key(pem), "RS256"
    raise ValueError("only EC P-256 and RSA keys can sign")


def _public_jwk(cert: x509.Certificate) -> tuple[ECKey | RSAKey, str]:
    public = cert.public_key()
    pem = public.public_bytes(serialization.Encoding.PEM,
                              serialization.PublicFormat.SubjectPublicKeyInfo)
    if isinstance(public, ec.EllipticCurvePublicKey):
        return ECKey.import_key(pem), "ES256"
    if isinstance(public, rsa.RSAPublicKey):
        return RSAKey.import_key(pem), "RS256"
    raise InvalidSignatureError("certificate key type not supported")


def sign_detached(
    payload: bytes, key: Any, cert: x509.Certificate, *, when: datetime | None = None
) -> str:
    """Detached compact JWS (RFC 7515 Appendix F) of ``payload`` with ``x5c``."""
    jwk, alg = _private_jwk(key)
    moment = (when or datetime.now(UTC)).astimezone(UTC)
    header = {
        "alg": alg,
        "typ": "JOSE",
        "x5c": [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()],
        "x5t#S256": _b64url(hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()),
        "sigT": moment.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    value = jws.serialize_compact(header, payload, jwk, algorithms=[alg], registry=_REGISTRY)
    return jws.detach_content(value)


def verify_detached(payload: bytes, signature: str, cert: x509.Certificate) -> dict[str, Any]:
    """Verify a detached JWS over ``payload`` with ``cert``; return the protected header.

    The signature must verify with the certificate's public key, and the ``x5c``
    certificate in the header, if any, must be that certificate.

    Raises
    ------
    InvalidSignatureError
        If anything does not match (one changed byte of the payload is enough).
    """
    signature = signature.strip()
    parts = signature.split(".")
    if len(parts) != 3 or parts[1] != "":
        raise InvalidSignatureError("not a detached compact JWS (header..signature)")
    try:
        header = json.loads(base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)))
    except ValueError as exc:
        raise InvalidSignatureError("unreadable JWS header") from exc
    if not isinstance(header, dict) or "crit" in header:
        raise InvalidSignatureError("unsupported JWS header")
    jwk, alg = _public_jwk(cert)
    if header.get("alg") != alg:
        raise InvalidSignatureError("algorithm does not match the certificate")
    x5c = header.get("x5c")
    if x5c:
        try:
            embedded = base64.b64decode(x5c[0])
        except (ValueError, TypeError, IndexError) as exc:
            raise InvalidSignatureError("unreadable x5c") from exc
        if embedded != cert.public_bytes(serialization.Encoding.DER):
            raise InvalidSignatureError("signed with another certificate")
    try:
        jws.deserialize_compact(signature, jwk, payload=payload, algorithms=[alg],
                                registry=_REGISTRY)
    except JoseError as exc:
        raise InvalidSignatureError("signature does not match the report") from exc
    return header


def provenance(
    *,
    target: str,
    recorded: datetime,
    signer: str,
    signature: str,
    organization: str,
    replaces: str | None = None,
) -> dict[str, Any]:
    """FHIR R4 ``Provenance`` for a signed version (``signature.data``: base64 of the JWS)."""
    resource: dict[str, Any] = {
        "resourceType": "Provenance",
        "target": [{"reference": target}],
        "recorded": recorded.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "activity": {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/v3-DocumentCompletion",
            "code": "LA", "display": "legally authenticated"}]},
        "agent": [{
            "type": {"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                "code": "verifier"}]},
            "who": {"identifier": {"value": signer}},
            "onBehalfOf": {"display": organization},
        }],
        "signature": [{
            "type": [_AUTHOR_SIGNATURE],
            "when": recorded.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "who": {"identifier": {"value": signer}},
            "targetFormat": "application/fhir+json",
            "sigFormat": "application/jose",
            "data": base64.b64encode(signature.encode()).decode(),
        }],
    }
    if replaces:
        resource["entity"] = [{"role": "revision", "what": {"reference": replaces}}]
    return resource
