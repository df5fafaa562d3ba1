"""Shared FHIR R4 layer: OperationOutcome, Bundles, one search machinery, the registry
of served resources (which the CapabilityStatement is generated from), and input
bounds for writes.

Imaging resources are built by :mod:`api.fhir.imaging`; lab ones by
:mod:`api.fhir_lab`; ServiceRequest by :mod:`api.routes.fhir_orders`.
"""

from api.fhir._core import (
    DEFAULT_COUNT,
    FHIR_JSON,
    MAX_COUNT,
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
from api.fhir._http import (
    FHIR_PREFIX,
    check_accept,
    fhir_base,
    fhir_response,
    parse_reference,
    search_bundle,
    search_request,
)
from api.fhir._search import (
    Criterion,
    ResourceSpec,
    Search,
    SearchParam,
    TooCostlyError,
    handling,
    page_total,
    parse_search,
    reported_total,
    split_or,
    total_bound,
)
from api.fhir.capability import capability_statement, smart_configuration

__all__ = [
    "DEFAULT_COUNT",
    "FHIR_JSON",
    "FHIR_PREFIX",
    "MAX_COUNT",
    "Criterion",
    "DateParam",
    "Paging",
    "ResourceSpec",
    "Search",
    "SearchParam",
    "Token",
    "TooCostlyError",
    "capability_statement",
    "check_accept",
    "fhir_base",
    "fhir_instant",
    "fhir_response",
    "handling",
    "last_updated_bounds",
    "operation_outcome",
    "page_total",
    "parse_date_param",
    "parse_paging",
    "parse_reference",
    "parse_search",
    "parse_token",
    "reported_total",
    "search_bundle",
    "search_request",
    "searchset_bundle",
    "smart_configuration",
    "split_or",
    "total_bound",
]
