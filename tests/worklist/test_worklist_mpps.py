"""MPPS state machine (PS3.4 F.7): transitions, refusals and their effects (pure)."""

from __future__ import annotations

import pytest

from core.errors import (
    DuplicateError,
    InvalidAttributeValueError,
    MissingAttributeError,
    NotFoundError,
    ProcedureStepStateError,
)
from tests.worklist.mpps_requests import REF, UID, n_create, n_set
from worklist.model import SpsStatus
from worklist.mpps import MppsStatus, OrderStatusChanged, SeriesCompleted, apply, transition


def test_f_7_2_1_n_create_in_progress_starts_the_scheduled_step() -> None:
    step, effects = transition(None, n_create())
    assert step.status is MppsStatus.IN_PROGRESS and step.version == 1
    assert effects == (OrderStatusChanged(UID, REF, SpsStatus.STARTED),)
    assert step.attributes.SpecificCharacterSet == "ISO_IR 192"


@pytest.mark.parametrize("status", ["COMPLETED", "DISCONTINUED", "BOGUS"])
def test_f_7_2_1_3_n_create_must_be_in_progress(status: str) -> None:
    with pytest.raises(InvalidAttributeValueError) as info:
        apply(None, n_create(status))
    assert info.value.dimse_status == 0x0106


def test_n_create_without_status_is_missing_attribute() -> None:
    req = n_create()
    del req.attributes.PerformedProcedureStepStatus
    with pytest.raises(MissingAttributeError):
        apply(None, req)


def test_n_create_duplicate_is_0x0111() -> None:
    step = apply(None, n_create())
    with pytest.raises(DuplicateError) as info:
        apply(step, n_create())
    assert info.value.dimse_status == 0x0111


def test_n_set_unknown_is_0x0112() -> None:
    with pytest.raises(NotFoundError) as info:
        apply(None, n_set())
    assert info.value.dimse_status == 0x0112


def test_f_7_2_2_n_set_completed_completes_order_and_series() -> None:
    step = apply(None, n_create())
    done, effects = transition(step, n_set("COMPLETED", series=2))
    assert done.status is MppsStatus.COMPLETED and done.version == 2
    assert effects == (
        OrderStatusChanged(UID, REF, SpsStatus.COMPLETED),
        SeriesCompleted(
            UID, ("1.2.826.0.1.3680043.10.1234.99.2.0", "1.2.826.0.1.3680043.10.1234.99.2.1")
        ),
    )
    assert done.attributes.PerformedProcedureStepEndTime == "093000"


def test_f_7_2_2_n_set_discontinued_without_series() -> None:
    step = apply(None, n_create())
    stopped, effects = transition(step, n_set("DISCONTINUED", series=0))
    assert stopped.status is MppsStatus.DISCONTINUED
    assert effects == (OrderStatusChanged(UID, REF, SpsStatus.DISCONTINUED),)


def test_n_set_staying_in_progress_has_no_effects() -> None:
    step = apply(None, n_create())
    same, effects = transition(
        step, n_set(None, end=False, CommentsOnThePerformedProcedureStep="x")
    )
    assert same.status is MppsStatus.IN_PROGRESS and effects == ()
    assert same.attributes.CommentsOnThePerformedProcedureStep == "x"


@pytest.mark.parametrize("final", ["COMPLETED", "DISCONTINUED"])
def test_f_7_2_2_3_n_set_after_final_state_is_0x0110(final: str) -> None:
    step = apply(apply(None, n_create()), n_set(final))
    with pytest.raises(ProcedureStepStateError) as info:
        apply(step, n_set(None, end=False))
    assert info.value.dimse_status == 0x0110
    assert str(info.value) == "Performed Procedure Step Object may no longer be updated"


def test_table_f_7_2_1_completed_requires_performed_series() -> None:
    step = apply(None, n_create())
    with pytest.raises(MissingAttributeError, match="PerformedSeriesSequence"):
        apply(step, n_set("COMPLETED", series=0))


def test_table_f_7_2_1_final_state_requires_end_date_and_time() -> None:
    step = apply(None, n_create())
    with pytest.raises(MissingAttributeError, match="EndDate"):
        apply(step, n_set("DISCONTINUED", end=False))


def test_table_f_7_2_1_n_set_may_not_change_not_allowed_attributes() -> None:
    step = apply(None, n_create())
    with pytest.raises(InvalidAttributeValueError, match="PatientID"):
        apply(step, n_set(None, end=False, PatientID="OTHER"))
    # Resending the unchanged value is tolerated.
    same = apply(step, n_set(None, end=False, PatientID="PA1", Modality="CT"))
    assert same.attributes.PatientID == "PA1"


def test_n_set_with_unknown_status_is_invalid() -> None:
    step = apply(None, n_create())
    with pytest.raises(InvalidAttributeValueError):
        apply(step, n_set("FINISHED"))


def test_unscheduled_case_has_no_order_effects() -> None:
    req = n_create()
    req.attributes.ScheduledStepAttributesSequence[0].AccessionNumber = ""
    req.attributes.ScheduledStepAttributesSequence[0].ScheduledProcedureStepID = ""
    _, effects = transition(None, req)
    assert effects == ()


def test_apply_does_not_mutate_inputs() -> None:
    create = n_create()
    step = apply(None, create)
    create.attributes.PatientID = "CHANGED"
    assert step.attributes.PatientID == "PA1"
    apply(step, n_set("COMPLETED"))
    assert (
        step.status is MppsStatus.IN_PROGRESS
        and "PerformedProcedureStepEndDate" not in step.attributes
    )
