"""What MPPS transitions do outside the step: orders follow, series get processed.

An :class:`~worklist.ports.EffectSink` (called by ``worklist/scp.py`` after the
step is saved). IHE RAD TF-2 4.7 (Modality Procedure Step In Progress/Completed):
the order's status follows the performed step; PS3.4 F.7.2.2.2: once an MPPS is
COMPLETED or DISCONTINUED the modality adds nothing to the listed series, so their
processing need not wait for the series quiet period.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from worklist.mpps import Effect, OrderStatusChanged, SeriesCompleted

if TYPE_CHECKING:
    from services.orders import OrderService

__all__ = ["OrderEffects"]

logger = logging.getLogger(__name__)


class OrderEffects:
    """Apply MPPS effects to orders and queue series jobs.

    Parameters
    ----------
    service : OrderService
        Follows step status into the order.
    queue_series : callable
        ``queue_series(series_instance_uid)`` queues a ``series`` processing job
        (``SqlIndex.add_job("series", uid)``).
    """

    def __init__(self, service: OrderService, queue_series: Callable[[str], None]) -> None:
        self.service = service
        self.queue_series = queue_series

    def __call__(self, effects: Sequence[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, OrderStatusChanged):
                ref = effect.step
                self.service.step_status(
                    accession=ref.accession_number,
                    procedure_id=ref.requested_procedure_id,
                    step_id=ref.scheduled_procedure_step_id,
                    status=effect.status,
                    study_uid=ref.study_instance_uid,
                )
            elif isinstance(effect, SeriesCompleted):
                for uid in effect.series_instance_uids:
                    self.queue_series(uid)
                logger.info(
                    "MPPS %s: %d series queued for processing",
                    effect.mpps_uid,
                    len(effect.series_instance_uids),
                )
