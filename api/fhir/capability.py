"""The server's CapabilityStatement (FHIR R4 capabilitystatement.html), for ``/metadata``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

__all__ = ["ResourceCapability", "capability_statement"]


@dataclass(frozen=True, slots=True)
class ResourceCapability:
    """What the server does with one resource type: interactions and search params.

    ``search_params`` are ``(name, type, documentation)``.
    """

    type: str
    interactions: tuple[str, ...]
    search_params: tuple[tuple[str, str, str], ...] = ()


def capability_statement(
    base: str, resources: Sequence[ResourceCapability], *, software_version: str
) -> dict[str, Any]:
    """A CapabilityStatement of kind ``instance`` for the server at ``base``."""
    rest_resources = []
    for cap in resources:
        entry: dict[str, Any] = {
            "type": cap.type,
            "interaction": [{"code": code} for code in cap.interactions],
        }
        if cap.search_params:
            entry["searchParam"] = [
                {"name": name, "type": kind, "documentation": doc}
                for name, kind, doc in cap.search_params
            ]
        rest_resources.append(entry)
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "kind": "instance",
        "software": {"name": "pacslab", "version": software_version},
        "implementation": {"description": "pacslab FHIR R4 server", "url": base},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [{"mode": "server", "resource": rest_resources}],
    }
