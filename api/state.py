"""The application state of the HTTP API: the services ``create_app`` hands to the routes.

FastAPI's ``app.state`` is an untyped bag; the services live in one typed, frozen
value on it (:class:`ApiServices`), built once when the app is created, and routes
receive them through the ``Annotated`` aliases of :mod:`api.deps` (``OrdersDep``,
``LabResultsDep``, ``TilesDep``), as the FastAPI full-stack template's ``SessionDep``.
Nothing is built lazily inside a route module, so every request of an app shares one
instance of each service and its caches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.settings import Settings
from services.lab_results import LabResultService
from services.orders import OrderService, order_service
from services.tiles import TileService
from storage.audit import AuditLog
from storage.index.lab import SqlLabStore
from storage.index.sql import SqlIndex

__all__ = ["ApiServices", "build_api_services", "services_of"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiServices:
    """The use cases the routes call (STYLE.md §1: api → services → storage)."""

    orders: OrderService
    lab_results: LabResultService
    tiles: TileService


def build_api_services(
    settings: Settings, index: SqlIndex, *, audit: AuditLog, patient_secret: bytes
) -> ApiServices:
    """Every service of the API over ``index``, each built once."""
    lab_store = SqlLabStore(index, default_issuer=settings.lab.patient_issuer)
    return ApiServices(
        orders=order_service(
            index,
            settings.orders,
            audit=audit,
            patient_secret=patient_secret,
            default_issuer=settings.lab.patient_issuer,
        ),
        lab_results=LabResultService(lab_store, audit=audit, patient_secret=patient_secret),
        tiles=TileService(index),
    )


def services_of(app: Any) -> ApiServices:
    """The :class:`ApiServices` of a FastAPI app (``app.state.services``)."""
    services = app.state.services
    assert isinstance(services, ApiServices)
    return services
