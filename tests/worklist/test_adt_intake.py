"""ADT through the order intake: ACK codes, ERR segments and the action log.

The patient identity service is the protocol's in-memory recorder here (what the
intake does with each answer is the subject); the service itself is exercised end to
end in ``test_adt_e2e.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

import pytest

from core.errors import DuplicateError, NotFoundError, OutOfResourcesError, ServiceError
from core.patients import (
    ChangePatientIdentifier,
    MergePatients,
    PatientChange,
    PatientCommand,
    PatientRef,
    UpdatePatient,
)
from core.settings import Settings
from pacslab.wiring import build_audit, build_index, build_order_service
from storage.audit import AuditLog
from tests.worklist.adt_messages import a08, a40, a47
from worklist.orders.intake import Hl7OrderIntake

NOW = datetime(2026, 12, 2, 10, 30)


class _Recorder:
    """A PatientIdentity that records commands and raises when told to."""

    def __init__(self) -> None:
        self.applied: list[tuple[PatientCommand, str, str]] = []
        self.fail: dict[str, ServiceError] = {}  # patient id → error

    def apply(self, command: PatientCommand, *, source: str, agent: str) -> PatientChange:
        ids = {
            UpdatePatient: lambda c: [c.patient.patient_id],
            MergePatients: lambda c: [c.surviving.patient_id, c.obsolete.patient_id],
            ChangePatientIdentifier: lambda c: [c.old.patient_id, c.new.patient_id],
        }[type(command)](command)
        for patient_id in ids:
            if patient_id in self.fail:
                raise self.fail[patient_id]
        self.applied.append((command, source, agent))
        return PatientChange(f"chg{len(self.applied)}", "merge", studies=1)

    def undo(self, change_id: str, *, source: str, agent: str) -> PatientChange:
        return PatientChange(f"undo-{change_id}", "undo")


@pytest.fixture
def stack(settings: Settings) -> Iterator[tuple[Hl7OrderIntake, _Recorder, AuditLog]]:
    index = build_index(settings, migrate=True)
    audit, secret = build_audit(settings, index)
    recorder = _Recorder()
    intake = Hl7OrderIntake(
        build_order_service(settings, index),
        clock=lambda: NOW,
        audit=audit,
        patient_secret=secret,
        patients=recorder,
    )
    yield intake, recorder, audit
    audit.close()
    index.close()


def _segments(ack: bytes) -> dict[str, list[str]]:
    return {s[:3]: s.split("|") for s in ack.decode().split("\r") if s}


def test_a08_is_applied_and_acked_aa(stack: tuple[Hl7OrderIntake, _Recorder, AuditLog]) -> None:
    intake, recorder, _ = stack
    result = intake.handle(a08("BN0001"), peer="127.0.0.1")
    assert result.code == "AA", result.ack
    ack = _segments(result.ack)
    assert ack["MSA"][1:3] == ["AA", "ADT0008"]
    assert ack["MSH"][8] == "ACK^A08^ACK"
    ((command, source, agent),) = recorder.applied
    assert isinstance(command, UpdatePatient) and command.patient == PatientRef("BN0001", "BVTW")
    assert (source, agent) == ("hl7-mllp", "HIS")
    assert [c.change_id for c in result.changes] == ["chg1"]


def test_inbox_source_is_named_hl7_inbox(
    stack: tuple[Hl7OrderIntake, _Recorder, AuditLog],
) -> None:
    intake, recorder, _ = stack
    assert intake.handle(a47("TMP1", "BN1"), source="hl7-file").code == "AA"
    assert recorder.applied[0][1] == "hl7-inbox"


def test_unknown_patient_in_second_pair_is_ae_204_at_that_mrg(
    stack: tuple[Hl7OrderIntake, _Recorder, AuditLog],
) -> None:
    intake, recorder, _ = stack
    recorder.fail["TMP2"] = NotFoundError("no such patient")
    result = intake.handle(a40([("BN1", "TMP1"), ("BN2", "TMP2")]))
    ack = _segments(result.ack)
    assert ack["MSA"][1] == "AE"
    assert ack["ERR"][2] == "MRG^2^1"
    assert ack["ERR"][3].startswith("204^Unknown key identifier^HL70357")
    assert len(result.changes) == 1  # the first pair stays merged (its own change)


def test_a47_onto_an_identifier_in_use_is_ae_205_at_pid3(
    stack: tuple[Hl7OrderIntake, _Recorder, AuditLog],
) -> None:
    intake, recorder, _ = stack
    recorder.fail["BN1"] = DuplicateError("identifier in use")
    ack = _segments(intake.handle(a47("TMP1", "BN1")).ack)
    assert (ack["MSA"][1], ack["ERR"][2], ack["ERR"][3][:4]) == ("AE", "PID^1^3", "205^")


def test_service_unavailable_is_ar(stack: tuple[Hl7OrderIntake, _Recorder, AuditLog]) -> None:
    intake, recorder, _ = stack
    recorder.fail["BN1"] = OutOfResourcesError("index unavailable")
    ack = _segments(intake.handle(a08("BN1")).ack)
    assert (ack["MSA"][1], ack["ERR"][3][:4]) == ("AR", "206^")


def test_content_error_is_ae_without_calling_the_service(
    stack: tuple[Hl7OrderIntake, _Recorder, AuditLog],
) -> None:
    intake, recorder, _ = stack
    ack = _segments(intake.handle(a08("BN1", sex="Q")).ack)
    assert (ack["MSA"][1], ack["ERR"][2], ack["ERR"][3][:4]) == ("AE", "PID^1^8", "103^")
    assert recorder.applied == []


def test_without_a_service_adt_is_refused_ar_200(settings: Settings) -> None:
    index = build_index(settings, migrate=True)
    try:
        intake = Hl7OrderIntake(build_order_service(settings, index), clock=lambda: NOW)
        ack = _segments(intake.handle(a40([("BN1", "TMP1")])).ack)
        assert (ack["MSA"][1], ack["ERR"][3][:4]) == ("AR", "200^")
    finally:
        index.close()


def test_each_adt_message_is_audited_without_names_or_ids(
    stack: tuple[Hl7OrderIntake, _Recorder, AuditLog],
) -> None:
    intake, recorder, audit = stack
    recorder.fail["TMP9"] = NotFoundError("no such patient")
    intake.handle(a40([("BN0001", "TMP0001")], name="LÊ^VĂN^HÙNG"), peer="10.0.0.5")
    intake.handle(a40([("BN0002", "TMP9")], control_id="ADT0041"), peer="10.0.0.5")
    assert audit.flush()
    entries = [e for e in audit.entries() if e.event_type == "hl7.adt"]
    assert [(e.outcome, e.outcome_desc) for e in entries] == [("0", "AA"), ("4", "AE 204")]
    first = entries[0]
    assert (first.agent, first.source, first.resource) == ("HIS", "10.0.0.5", "PatientChange/chg1")
    assert first.patient_key
    text = repr(entries)
    for secret in ("BN0001", "TMP0001", "BN0002", "TMP9", "HÙNG", "HUNG"):
        assert secret not in text
