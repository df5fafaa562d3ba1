"""Lab results once stored: search, history, and the review of held results (issues 5, 14).

The use cases the API offers over the lab store, whatever the wire (FHIR R4
``Observation``/``DiagnosticReport`` search in ``api/routes/fhir_lab.py``, the review
list in ``api/routes/lab_review.py``):

- **read** (:meth:`LabResultService.search_results`, :meth:`~LabResultService.history`,
  :meth:`~LabResultService.search_reports`): FHIR R4 search and ``_history`` over the
  versioned results (HL7 v2.5.1 OBX-11 ``C``: a correction replaces, the earlier
  version is kept);
- **review** (:meth:`~LabResultService.conflicts`, :meth:`~LabResultService.resolve`):
  a result whose specimen and test were already reported for another patient is
  stored but held (``storage/index/lab.py``). Moving a specimen to another patient
  is an explicit act, written to the action log with what each affected result was
  before and after (versions, states and keyed patient references only: no
  identifier, no name).

Filing results (the inbox and the analyzer links) is
:meth:`services.analyzers.AnalyzerService.store_results` and the inbox's watcher.
"""

from __future__ import annotations

import logging
from typing import Any

from core.audit import AuditEntry, patient_key
from core.logging import correlation_id
from storage.audit import AuditLog
from storage.lab import (
    LabReportQuery,
    LabResolution,
    LabResultQuery,
    LabResultStore,
    StoredLabReport,
    StoredLabResult,
)

__all__ = ["LabResultService", "resolution_json", "result_state"]

logger = logging.getLogger(__name__)


def _patient_ref(pk: int | None) -> str | None:
    return f"Patient/{pk}" if pk is not None else None


def result_state(r: StoredLabResult | None) -> dict[str, Any] | None:
    """What the action log keeps of one result version: no patient data, only references."""
    if r is None:
        return None
    return {
        "observation": r.observation_id,
        "version": r.version,
        "review": r.review,
        "status": r.status,
        "patient": _patient_ref(r.patient_pk),
    }


def resolution_json(resolution: LabResolution) -> dict[str, Any]:
    """The choice and each affected result before and after (the log's and the reply's)."""
    return {
        "choice": resolution.choice,
        "held": {
            "before": result_state(resolution.held_before),
            "after": result_state(resolution.held_after),
        },
        "other": {
            "before": result_state(resolution.retired_before),
            "after": result_state(resolution.retired_after),
        },
    }


class LabResultService:
    """Read stored lab results and settle held ones (thread-safe: the store is).

    Parameters
    ----------
    store : LabResultStore
        The versioned results (``storage.index.lab.SqlLabStore``).
    audit : AuditLog, optional
        The action log a resolution is written to.
    patient_secret : bytes
        Keys the patient references of the log (:func:`core.audit.patient_key`).
    """

    def __init__(
        self, store: LabResultStore, *, audit: AuditLog | None = None, patient_secret: bytes = b""
    ) -> None:
        self.store = store
        self.audit = audit
        self.patient_secret = patient_secret

    # -- read -------------------------------------------------------------------

    def search_results(self, query: LabResultQuery) -> tuple[list[StoredLabResult], int]:
        """One page of results (FHIR ``Observation`` search) and the total."""
        return self.store.search_results(query)

    def history(self, observation_id: str) -> list[StoredLabResult]:
        """Every version of one result, newest first (FHIR ``_history``)."""
        return self.store.result_history(observation_id)

    def search_reports(self, query: LabReportQuery) -> tuple[list[StoredLabReport], int]:
        """One page of result groups (FHIR ``DiagnosticReport`` search) and the total."""
        return self.store.search_reports(query)

    # -- review -----------------------------------------------------------------

    def conflicts(self, *, limit: int = 100, offset: int = 0) -> tuple[list[StoredLabResult], int]:
        """Results held because their specimen/test was another patient's, oldest first."""
        return self.store.conflicts(limit=limit, offset=offset)

    def resolve(
        self, observation_id: str, choice: str, *, agent: str, agent_type: str, source: str
    ) -> LabResolution:
        """Accept the held result as its patient's (the other patient's result of the same
        specimen/test is withdrawn) or discard it; audited with before and after.

        Raises
        ------
        NotFoundError
            No held result ``observation_id``.
        DuplicateError
            Another reviewer settled it first (HTTP 409).
        InvalidQueryError
            ``choice`` is not one of ``storage.lab.REVIEW_CHOICES``.
        """
        resolution = self.store.resolve(observation_id, choice)
        self._audit(resolution, agent=agent, agent_type=agent_type, source=source)
        logger.info("held lab result %s: %s", observation_id, choice)
        return resolution

    def _audit(
        self, resolution: LabResolution, *, agent: str, agent_type: str, source: str
    ) -> None:
        """One ``lab.resolve`` entry; a side effect (logs, never raises: STYLE.md §5)."""
        if self.audit is None:
            return
        try:
            held = resolution.held_after
            self.audit.record(
                AuditEntry(
                    action="U",
                    event_type="lab.resolve",
                    outcome="0",
                    outcome_desc=f"held result {resolution.choice}ed"[:64],
                    agent=agent[:128],
                    agent_type=agent_type,  # type: ignore[arg-type]
                    source=source,
                    resource=f"Observation/{held.observation_id}",
                    # Keyed as the inbox keys its lab.file entries, so one search finds both.
                    patient_key=patient_key(self.patient_secret, held.patient_id),
                    correlation_id=correlation_id.get()[:32],
                    detail=AuditEntry.details(resolution_json(resolution)),
                )
            )
        except Exception:
            logger.error("lab resolution audit entry not recorded", exc_info=True)
