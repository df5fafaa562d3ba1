"""Shared FHIR R4 layer: OperationOutcome, Bundles, search parsing, resource builders.

Imaging resources live in :mod:`api.fhir.imaging`; lab (Observation, DiagnosticReport)
and order (ServiceRequest) builders are to be added beside it, reusing the helpers
re-exported here.
"""

from api.fhir._core import (
    FHIR_JSON,
    DateParam,
    Paging,
    Token,
    fhir_instant,
    last_updated_bounds,
    operation_outcome,
    parse_date_param,
    parse_paging,
    parse_token,
    searchset_bundle,
)
from api.fhir.capability import ResourceCapability, capability_statement

__all__ = [
    "FHIR_JSON",
    "DateParam",
    "Paging",
    "ResourceCapability",
    "Token",
    "capability_statement",
    "fhir_instant",
    "last_updated_bounds",
    "operation_outcome",
    "parse_date_param",
    "parse_paging",
    "parse_token",
    "searchset_bundle",
]
