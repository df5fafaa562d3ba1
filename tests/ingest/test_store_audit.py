"""ingest/store_audit.py: C-STORE entries per association and study (PS3.15 A.5.3), pure."""

from __future__ import annotations

import json

from ingest.store_audit import StoreKey, TransferSummaries

CT, SR = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.88.22"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def key(association: str = "a1", study: str = "1.2.1", patient: str = "p1",
        outcome: str = "0x0000 stored", ae: str = "CT1") -> StoreKey:
    return StoreKey(association, ae, study, patient, outcome)


def test_an_association_gets_one_entry_per_study_patient_and_outcome() -> None:
    clock = Clock()
    summaries = TransferSummaries(5.0, clock)
    for _ in range(3):
        assert summaries.add(key(), CT) == []
    assert summaries.add(key(), SR) == []
    assert summaries.add(key(study="1.2.2"), CT) == []
    assert summaries.add(key(patient="p2"), CT) == []  # same study, another patient
    assert summaries.add(key(outcome="0x0000 duplicate"), CT) == []
    assert summaries.add(key(association="a2"), CT) == []  # another association
    assert len(summaries) == 5
    ended = summaries.ended("a1")
    assert len(summaries) == 1  # a2's is still open
    entries = {(e.resource, e.patient_key, e.outcome_desc): json.loads(e.detail)
               for e in (s.entry() for s in ended)}
    assert entries == {
        ("Study/1.2.1", "p1", "0x0000 stored"): {
            "study_instance_uid": "1.2.1", "instances": 4, "sop_classes": {CT: 3, SR: 1}},
        ("Study/1.2.2", "p1", "0x0000 stored"): {
            "study_instance_uid": "1.2.2", "instances": 1, "sop_classes": {CT: 1}},
        ("Study/1.2.1", "p2", "0x0000 stored"): {
            "study_instance_uid": "1.2.1", "instances": 1, "sop_classes": {CT: 1}},
        ("Study/1.2.1", "p1", "0x0000 duplicate"): {
            "study_instance_uid": "1.2.1", "instances": 1, "sop_classes": {CT: 1}},
    }
    entry = ended[0].entry()
    assert (entry.event_type, entry.action, entry.outcome, entry.agent, entry.agent_type,
            entry.correlation_id) == ("dicom.c-store", "C", "0", "CT1", "ae", "a1")
    assert summaries.ended("a1") == []  # written once
    assert [s.instances for s in summaries.drain()] == [1] and len(summaries) == 0


def test_an_open_transfer_is_written_every_max_age() -> None:
    clock = Clock()
    summaries = TransferSummaries(5.0, clock)
    summaries.add(key(), CT)
    summaries.add(key(association="a2"), CT)
    clock.now += 4.9
    summaries.add(key(), CT)
    assert summaries.due() == []
    clock.now += 0.1
    # a2's next instance comes when its summary is 5 s old: that one is due, and the
    # instance starts the next; a1 sends nothing more, and the sweep finds it
    (rolled,) = summaries.add(key(association="a2"), CT)
    assert (rolled.key.association, rolled.instances) == ("a2", 1)
    due = summaries.due()
    assert [(s.key.association, s.instances) for s in due] == [("a1", 2)]
    clock.now += 2.0
    summaries.add(key(association="a2"), CT)
    assert summaries.due() == []
    assert [s.instances for s in summaries.ended("a2")] == [2]


def test_max_age_zero_is_one_entry_per_instance() -> None:
    summaries = TransferSummaries(0.0, Clock())
    (one,) = summaries.add(key(), CT)
    (two,) = summaries.add(key(), CT)
    assert one.instances == two.instances == 1 and len(summaries) == 0
