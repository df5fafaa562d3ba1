"""pacslab worklist: Modality Worklist C-FIND and MPPS (PS3.4 Annexes K and F).

Pure logic lives in :mod:`worklist.model`, :mod:`worklist.query` and
:mod:`worklist.mpps`; storage seams in :mod:`worklist.ports` (fakes in
:mod:`worklist.memory`); the pynetdicom shell in :mod:`worklist.scp`.
"""

from worklist.model import (
    Code,
    Order,
    Patient,
    ScheduledProcedureStep,
    SpsStatus,
    WorklistItem,
    from_dataset,
    make_item,
    to_dataset,
)
from worklist.ports import CandidateFilter, EffectSink, MppsRepository, WorklistSource
from worklist.query import MatchOptions, WorklistQuery, build_query, match

__all__ = [
    "CandidateFilter",
    "Code",
    "EffectSink",
    "MatchOptions",
    "MppsRepository",
    "Order",
    "Patient",
    "ScheduledProcedureStep",
    "SpsStatus",
    "WorklistItem",
    "WorklistQuery",
    "WorklistSource",
    "build_query",
    "from_dataset",
    "make_item",
    "match",
    "to_dataset",
]
