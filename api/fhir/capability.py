"""The server's CapabilityStatement (FHIR R4 capabilitystatement.html), for ``/metadata``,
and the SMART App Launch discovery document (``.well-known/smart-configuration``).

Both are generated from the registry of served resources (:mod:`api.fhir.registry`)
and the authentication settings, never written by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from api.fhir._search import TOTAL_ESTIMATE_BOUND, ResourceSpec
from core.auth import SCOPES
from core.settings import AuthSettings

__all__ = ["capability_statement", "smart_configuration"]

_SECURITY_SERVICE = "http://terminology.hl7.org/CodeSystem/restful-security-service"
_OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"


def _modifiers(modifiers: tuple[str, ...]) -> str:
    return f" (modifiers: {', '.join(':' + m for m in modifiers)})" if modifiers else ""


def _resource(spec: ResourceSpec) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "type": spec.type,
        "interaction": [{"code": code} for code in spec.interactions],
    }
    if spec.versioning:
        entry["versioning"] = spec.versioning
    if "update" in spec.interactions:
        entry["updateCreate"] = spec.update_create
    if spec.params:
        entry["searchParam"] = [
            {
                "name": p.name,
                "definition": p.definition,
                "type": p.type,
                "documentation": p.documentation + _modifiers(p.modifiers),
            }
            for p in spec.params
        ]
    if spec.includes:
        entry["searchInclude"] = list(spec.includes)
    if spec.operations:
        entry["operation"] = [{"name": n, "definition": d} for n, d in spec.operations]
    if "search-type" in spec.interactions:
        sort = f"; _sort: {' | '.join(spec.sorts)} (one key)" if spec.sorts else ""
        entry["documentation"] = (
            "Search: _count, _offset; _total: none | estimate (the default: counted up "
            f"to {TOTAL_ESTIMATE_BOUND} past the page, Bundle.total left out beyond) | "
            "accurate; unknown parameters refused unless "
            f"Prefer: handling=lenient{sort}"
        )
    return entry


def _security(auth: AuthSettings) -> dict[str, Any]:
    """``rest.security`` (FHIR R4 CapabilityStatement.rest.security; SMART App Launch
    conformance: the ``oauth-uris`` extension, only with endpoints that exist)."""
    security: dict[str, Any] = {
        "cors": False,
        "service": [
            {
                "coding": [
                    {
                        "system": _SECURITY_SERVICE,
                        "code": "SMART-on-FHIR",
                        "display": "SMART-on-FHIR",
                    }
                ],
                "text": "OAuth2 bearer tokens (RFC 6750)",
            }
        ],
    }
    uris = [
        {"url": name, "valueUri": value}
        for name, value in (
            ("token", auth.token_endpoint),
            ("authorize", auth.authorization_endpoint),
        )
        if value
    ]
    if uris:
        security["extension"] = [{"url": _OAUTH_URIS, "extension": uris}]
    if auth.is_local:
        source = "tokens issued by this service (`pacslab token`, ES256)"
    else:
        source = "tokens from the identity provider whose JWK Set is configured (RS256/ES256)"
    security["description"] = (
        f"Send 'Authorization: Bearer <JWT>' with {source}, audience "
        f"'{auth.audience}', and one of the scopes {', '.join(SCOPES)} the resource needs "
        "(imaging.read: ImagingStudy, Endpoint; lab.read: Observation, DiagnosticReport; "
        "orders.read/orders.write: ServiceRequest; admin: AuditEvent). Devices may send an "
        "API key instead. /metadata and /.well-known/smart-configuration are public."
        if auth.enabled
        else "Authentication is switched off on this instance."
    )
    return security


def capability_statement(
    base: str,
    resources: Sequence[ResourceSpec],
    *,
    software_version: str,
    auth: AuthSettings,
) -> dict[str, Any]:
    """A CapabilityStatement of kind ``instance`` for the server at ``base``."""
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "kind": "instance",
        "software": {"name": "pacslab", "version": software_version},
        "implementation": {"description": "pacslab FHIR R4 server", "url": base},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [
            {
                "mode": "server",
                "security": _security(auth),
                "resource": [_resource(spec) for spec in resources],
            }
        ],
    }


def smart_configuration(auth: AuthSettings) -> dict[str, Any]:
    """SMART App Launch 2.0 discovery (``/.well-known/smart-configuration``, 2.0.0
    conformance.html): endpoints only where they exist; capabilities only what a
    client can rely on here.

    This service verifies bearer tokens; it does not run an authorization server. With
    the embedded issuer, tokens come from the ``pacslab token`` command (no OAuth
    endpoint); with an identity provider, its endpoints are configured in
    ``auth.token_endpoint`` / ``auth.authorization_endpoint``.
    """
    doc: dict[str, Any] = {"capabilities": []}
    if auth.jwks_url:
        doc["jwks_uri"] = auth.jwks_url
    if auth.issuer.startswith("https://"):
        doc["issuer"] = auth.issuer
    grants: list[str] = []
    if auth.authorization_endpoint:
        doc["authorization_endpoint"] = auth.authorization_endpoint
        doc["response_types_supported"] = ["code"]
        doc["code_challenge_methods_supported"] = ["S256"]
        doc["capabilities"] = ["launch-standalone", "client-public"]
        grants.append("authorization_code")
    if auth.token_endpoint:
        doc["token_endpoint"] = auth.token_endpoint
        grants.append("client_credentials")
    if grants:
        doc["grant_types_supported"] = grants
    doc["scopes_supported"] = list(SCOPES)
    return doc
