"""Analyzer links: what a live analyzer asks of pacslab (issue 18).

Three use cases, whatever the wire (ASTM E1381/E1394 or HL7 LAW over MLLP, which
the edges in :mod:`ingest.labs.links` speak):

- **store results durably** (:meth:`AnalyzerService.store_results`): filed by
  :class:`services.lab_results.LabResultService` in one transaction, as a dropped
  file is (the same matching, conflict holding, action log and webhook); only when
  it returns may the edge acknowledge the message to the analyzer. A message the
  analyzer sends again (its ACK was lost, we crashed) has the same
  bytes, hence the same hash, and is not stored twice.
- **host query** (:meth:`AnalyzerService.ordered_tests`, E1394 §12, CLSI LIS2-A2
  Q record; HL7 LAW query by specimen): the tests ordered for a specimen barcode,
  from the order store (FHIR ServiceRequest or HL7 ORM/OML orders): an order
  matches when its placer or filler number or accession number is the barcode.
- **order download**: the same answer, pushed when the specimen is received.

The link state each edge reports (:class:`LinkStatus`) is kept here so the API
and ``/metrics`` can show it without importing the edges.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, date, datetime
from typing import Any, Protocol

from core.errors import NotFoundError
from core.labs import ParseResult
from core.orders import CLOSED, OrderRecord
from services.lab_results import LabResultService, LabSource
from storage.lab import LabIngestOutcome

__all__ = [
    "AnalyzerService",
    "LinkRegistry",
    "LinkStatus",
    "OrderFinder",
    "OrderedTest",
    "SpecimenOrders",
]

logger = logging.getLogger(__name__)


class OrderFinder(Protocol):
    """The part of the order store a host query needs (``SqlOrderStore.search``)."""

    def search(self, *, identifier: str | None = None, limit: int = 100) -> list[OrderRecord]: ...


@dataclass(frozen=True, slots=True)
class OrderedTest:
    """One test to run: the analyzer's code and the code it was ordered with."""

    analyzer_code: str
    ordered_code: str
    display: str = ""


@dataclass(frozen=True, slots=True)
class SpecimenOrders:
    """What to run on one specimen (the O records of a host query reply)."""

    specimen_id: str
    tests: tuple[OrderedTest, ...]
    priority: str = ""
    patient_id: str = field(default="", repr=False)
    patient_name: str = field(default="", repr=False)
    birth_date: date | None = field(default=None, repr=False)
    sex: str = field(default="", repr=False)


@dataclass
class LinkStatus:
    """The state of one analyzer link, for the API and ``/metrics`` (no PHI)."""

    name: str
    protocol: str
    link: str
    state: str = "stopped"
    connected: bool = False
    last_message_at: datetime | None = None
    messages_received: int = 0
    messages_sent: int = 0
    results_stored: int = 0
    queries_answered: int = 0
    rejected: int = 0
    errors: int = 0
    last_error: str = ""
    last_error_at: datetime | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def update(self, **changes: Any) -> None:
        with self._lock:
            for key, value in changes.items():
                setattr(self, key, value)

    def count(self, name: str, by: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + by)

    def error(self, reason: str) -> None:
        """Record an anomaly (a reason without patient data: timers, retries)."""
        with self._lock:
            self.errors += 1
            self.last_error = reason[:200]
            self.last_error_at = datetime.now(UTC)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            body = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "_lock"}
        for key in ("last_message_at", "last_error_at"):
            value = body[key]
            body[key] = value.isoformat() if value is not None else None
        return body


class LinkRegistry:
    """Every configured analyzer's :class:`LinkStatus`, by name (one per process)."""

    def __init__(self) -> None:
        self._links: dict[str, LinkStatus] = {}
        self._downloads: dict[str, Callable[[str], bool]] = {}
        self._lock = threading.Lock()

    def set_download(self, name: str, download: Callable[[str], bool]) -> None:
        """Register how orders are pushed to analyzer ``name`` (composition root)."""
        with self._lock:
            self._downloads[name] = download

    def download(self, name: str, specimen_id: str) -> bool:
        """Push the orders of ``specimen_id`` to analyzer ``name``.

        Returns False when nothing is ordered for the specimen.

        Raises
        ------
        NotFoundError
            No such analyzer, or it cannot take order downloads.
        """
        with self._lock:
            download = self._downloads.get(name)
        if download is None:
            raise NotFoundError(f"no analyzer link {name!r} that takes order downloads")
        return download(specimen_id)

    def remove(self, name: str) -> None:
        with self._lock:
            self._links.pop(name, None)
            self._downloads.pop(name, None)

    def add(self, status: LinkStatus) -> LinkStatus:
        with self._lock:
            self._links[status.name] = status
        return status

    def get(self, name: str) -> LinkStatus | None:
        with self._lock:
            return self._links.get(name)

    def all(self) -> list[LinkStatus]:
        with self._lock:
            return [self._links[k] for k in sorted(self._links)]


#: The process's registry, filled by the composition root; read by the API.
REGISTRY = LinkRegistry()


class AnalyzerService:
    """The use cases of one analyzer (see the module docstring).

    Parameters
    ----------
    name : str
        The analyzer's configured name.
    results : LabResultService
        Files the results (with the action log and the webhook).
    orders : OrderFinder, optional
        Without it every host query is answered "no information".
    test_codes : mapping
        Analyzer test code → the code orders use (LOINC).
    status : LinkStatus, optional
    """

    def __init__(
        self,
        name: str,
        results: LabResultService,
        *,
        orders: OrderFinder | None = None,
        test_codes: Mapping[str, str] | None = None,
        status: LinkStatus | None = None,
    ) -> None:
        self.name = name
        self.results = results
        self.source = LabSource.link(name)
        self.orders = orders
        self.test_codes = dict(test_codes or {})
        self._by_ordered = {v: k for k, v in self.test_codes.items()}
        self.status = status or LinkStatus(name, "", "")

    def store_results(self, parsed: ParseResult, *, sha256: str, fmt: str) -> LabIngestOutcome:
        """Store one message's results in one transaction; raise if not stored.

        Returns only once the results are committed: the caller may then
        acknowledge the message. A repeat of a stored message (same bytes, same
        ``sha256``) is a duplicate. The message is journaled as the lab file
        ``<name>-<hash>.<format>`` of profile ``link:<name>``.
        """
        ext = "hl7" if fmt == "hl7v2" else fmt
        filing = self.results.file(
            parsed, sha256=sha256, name=f"{self.name}-{sha256[:16]}.{ext}", fmt=fmt,
            source=self.source,
        )
        if filing.outcome.duplicate:
            logger.info("analyzer %s re-sent message %s: already stored", self.name, sha256[:12])
        else:
            self.status.count("results_stored", filing.outcome.results)
            self.results.publish(filing)
        return filing.outcome

    def ordered_tests(self, specimen_id: str) -> SpecimenOrders | None:
        """The open orders for ``specimen_id``, or None when there is none.

        A test is named by the analyzer's code when the map has one; an order code
        the analyzer does not know is still sent as it is, so the operator sees it
        on the analyzer instead of it vanishing.
        """
        if self.orders is None or not specimen_id:
            return None
        records = [
            r
            for r in self.orders.search(identifier=specimen_id, limit=50)
            if r.status not in CLOSED
        ]
        if not records:
            return None
        tests: list[OrderedTest] = []
        for rec in records:
            code = rec.item.order.requested_procedure_code
            if code is None or not code.value:
                continue
            analyzer_code = self._by_ordered.get(code.value, code.value)
            if all(t.analyzer_code != analyzer_code for t in tests):
                tests.append(OrderedTest(analyzer_code, code.value, code.meaning))
        if not tests:
            return None
        patient = records[0].item.patient
        priority = "S" if any(r.item.order.priority == "STAT" for r in records) else "R"
        self.status.count("queries_answered")
        return SpecimenOrders(
            specimen_id=specimen_id,
            tests=tuple(tests),
            priority=priority,
            patient_id=patient.id,
            patient_name=patient.name,
            birth_date=patient.birth_date,
            sex=patient.sex,
        )

    def ordered_code(self, analyzer_code: str) -> str:
        """The order code (LOINC) for an analyzer test code, or ``""``."""
        return self.test_codes.get(analyzer_code, "")
