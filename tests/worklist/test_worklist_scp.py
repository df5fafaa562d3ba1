"""The pynetdicom shell: handler unit tests, DCMTK loopback and a differential test.

The differential test runs every query with DCMTK ``findscu -W`` against our SCP (over
the in-memory fake, and as ``pacslab serve`` answers: a ``pacslab dicom`` process over
the SQL order store) and against DCMTK ``wlmscpfs`` serving the same worklist as
``.wl`` files, with the default environment and with ``TCP_NODELAY=1``. Where we
follow PS3.4 and wlmscpfs does not, the case names the clause and asserts both
answers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep  # type: ignore[attr-defined]

from tests.worklist.dcmtk import (
    ENVIRONMENTS,
    HAVE_DCMTK,
    findscu,
    pacslab_dicom,
    pacslab_server,
    wlmscpfs,
    write_query,
    write_wl_folder,
)
from tests.worklist.mpps_requests import n_create, n_set
from worklist.memory import InMemoryWorklist
from worklist.model import SpsStatus, WorklistItem, make_item
from worklist.query import MatchOptions
from worklist.scp import handle_find

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR")


def _items() -> list[WorklistItem]:
    return [
        make_item("A1", patient_name="NGUYỄN^VĂN AN", start=datetime(2026, 11, 25, 9, 0)),
        make_item(
            "A2",
            patient_name="Smith^John",
            station_ae_title="MR1",
            modality="MR",
            start=datetime(2026, 11, 25, 23, 0),
        ),
        make_item("A3", patient_name="ĐẶNG^THỊ HOA", start=datetime(2026, 11, 26, 7, 30)),
        make_item(
            "A4", patient_name="DOE^JANE", start=datetime(2026, 11, 27, 14, 0), priority="STAT"
        ),
        make_item(
            "A5",
            patient_name="TRẦN^MINH",
            station_ae_title="US1",
            modality="US",
            start=datetime(2026, 11, 26, 10, 0),
        ),
    ]


# --------------------------------------------------------------------- shell unit tests


def _event(identifier: Dataset, cancel_after: int | None = None) -> Any:
    state = {"yielded": 0}

    class Event(SimpleNamespace):
        @property
        def is_cancelled(self) -> bool:
            return cancel_after is not None and state["yielded"] >= cancel_after

    ev = Event(
        identifier=identifier, assoc=SimpleNamespace(requestor=SimpleNamespace(ae_title="X"))
    )
    ev.state = state
    return ev


def _drain(event: Any, source: Any, options: MatchOptions) -> list[tuple[int, Dataset | None]]:
    out = []
    for status, ds in handle_find(event, source, options):
        code = status if isinstance(status, int) else int(status.Status)
        out.append((code, status if ds is None and not isinstance(status, int) else ds))
        event.state["yielded"] += 1
    return out


def _all_keys() -> Dataset:
    q = Dataset()
    q.PatientName = ""
    q.AccessionNumber = ""
    return q


def test_handle_find_yields_pending_per_match() -> None:
    got = _drain(_event(_all_keys()), InMemoryWorklist(_items()), MatchOptions())
    assert [code for code, _ in got] == [0xFF00] * 5


def test_handle_find_warns_0xff01_for_unsupported_keys() -> None:
    q = _all_keys()
    q.InstitutionName = ""
    got = _drain(_event(q), InMemoryWorklist(_items()), MatchOptions())
    assert {code for code, _ in got} == {0xFF01}


def test_k_4_1_3_c_cancel_is_checked_between_responses() -> None:
    got = _drain(_event(_all_keys(), cancel_after=2), InMemoryWorklist(_items()), MatchOptions())
    assert [code for code, _ in got] == [0xFF00, 0xFF00, 0xFE00]


def test_result_limit_ends_with_out_of_resources() -> None:
    got = _drain(_event(_all_keys()), InMemoryWorklist(_items()), MatchOptions(limit=3))
    assert [code for code, _ in got] == [0xFF00] * 3 + [0xA700]
    assert "Too many" in got[-1][1].ErrorComment  # type: ignore[union-attr]


def test_invalid_identifier_is_0xa900_with_a_phi_free_comment() -> None:
    q = _all_keys()
    sps = Dataset()
    sps.ScheduledProcedureStepStartDate = "2026*"
    q.ScheduledProcedureStepSequence = [sps]
    [(code, status)] = _drain(_event(q), InMemoryWorklist(_items()), MatchOptions())
    assert code == 0xA900
    assert "ScheduledProcedureStepStartDate" in status.ErrorComment  # type: ignore[union-attr]


# ------------------------------------------------------------------ DCMTK differential


def _uid(accession: str) -> str:
    return next(
        i.order.study_instance_uid for i in _items() if i.order.accession_number == accession
    )


@dataclass(frozen=True)
class Case:
    """A query; ``wlmscpfs`` is its expected answer when it differs from ours."""

    id: str
    names: dict[str, Any] = field(default_factory=dict)
    sps: dict[str, str] = field(default_factory=dict)
    expected: tuple[str, ...] = ()
    wlmscpfs: tuple[str, ...] | None = None
    clause: str = ""


CASES = [
    Case("station_ae", sps={"ScheduledStationAETitle": "CT1"}, expected=("A1", "A3", "A4")),
    Case("modality", sps={"Modality": "MR"}, expected=("A2",)),
    Case(
        "date_range",
        sps={"ScheduledProcedureStepStartDate": "20261125-20261126"},
        expected=("A1", "A2", "A3", "A5"),
    ),
    Case(
        "date_open_end",
        sps={"ScheduledProcedureStepStartDate": "20261126-"},
        expected=("A3", "A4", "A5"),
    ),
    Case(
        "date_open_start",
        sps={"ScheduledProcedureStepStartDate": "-20261125"},
        expected=("A1", "A2"),
    ),
    Case(
        "date_and_time_range_combined",
        sps={
            "ScheduledProcedureStepStartDate": "20261125-20261126",
            "ScheduledProcedureStepStartTime": "2200-0800",
        },
        expected=("A2", "A3"),
        clause="Table K.6-1 remark on (0040,0003): one datetime range; wlmscpfs agrees",
    ),
    Case("patient_name_wildcard", names={"PatientName": "Smi*"}, expected=("A2",)),
    Case("accession_number", names={"AccessionNumber": "A3"}, expected=("A3",)),
    Case(
        "vietnamese_utf8_name",
        names={"PatientName": "NGUYỄN^VĂN AN", "SpecificCharacterSet": "ISO_IR 192"},
        expected=("A1",),
    ),
    Case(
        "vietnamese_utf8_wildcard",
        names={"PatientName": "ĐẶNG*", "SpecificCharacterSet": "ISO_IR 192"},
        expected=("A3",),
    ),
    Case(
        "pn_case_insensitive",
        names={"PatientName": "smith^john"},
        expected=("A2",),
        wlmscpfs=(),
        clause="PS3.4 C.2.2.2.1.1: PN may match case-insensitively; wlmscpfs is case-sensitive",
    ),
    Case(
        "pn_accent_insensitive",
        names={"PatientName": "NGUYEN^VAN AN"},
        expected=("A1",),
        wlmscpfs=(),
        clause="PS3.4 C.2.2.2.1.1 note 1: PN may match accent-insensitively; wlmscpfs does not",
    ),
    Case(
        "station_ae_wildcard",
        sps={"ScheduledStationAETitle": "CT*"},
        expected=("A1", "A3", "A4"),
        wlmscpfs=(),
        clause="PS3.4 C.2.2.2.4 defines wild cards for AE; wlmscpfs matches literally",
    ),
    Case(
        "modality_wildcard",
        sps={"Modality": "U?"},
        expected=("A5",),
        wlmscpfs=(),
        clause="PS3.4 C.2.2.2.4 defines wild cards for CS; wlmscpfs matches literally",
    ),
    Case(
        "patient_id_wildcard",
        names={"PatientID": "PA?"},
        expected=("A1", "A2", "A3", "A4", "A5"),
        wlmscpfs=(),
        clause="PS3.4 C.2.2.2.4 defines wild cards for LO; wlmscpfs matches literally",
    ),
    Case("optional_key_priority", names={"RequestedProcedurePriority": "STAT"}, expected=("A4",)),
    Case(
        "study_uid_list",
        names={"StudyInstanceUID": [_uid("A1"), _uid("A3")]},
        expected=("A1", "A3"),
        wlmscpfs=("A1", "A2", "A3", "A4", "A5"),
        clause="PS3.4 C.2.2.2.2 List of UID Matching, K.2.2.1.1.2: wlmscpfs ignores the key",
    ),
]


def _identifier(case: Case) -> Dataset:
    q = Dataset()
    q.PatientName = ""
    q.PatientID = ""
    q.AccessionNumber = ""
    q.RequestedProcedurePriority = ""
    for keyword, value in case.names.items():
        setattr(q, keyword, value)
    sps = Dataset()
    for keyword in (
        "ScheduledStationAETitle",
        "Modality",
        "ScheduledProcedureStepStartDate",
        "ScheduledProcedureStepStartTime",
        "ScheduledProcedureStepID",
    ):
        setattr(sps, keyword, case.sps.get(keyword, ""))
    q.ScheduledProcedureStepSequence = [sps]
    return q


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    if not HAVE_DCMTK:
        pytest.skip("DCMTK findscu/wlmscpfs not installed")
    root = tmp_path_factory.mktemp("mwl")
    items = _items()
    write_wl_folder(items, root / "wl", "PACSLAB")
    (root / "serve").mkdir()
    with (
        wlmscpfs(root / "wl") as wl_port,
        pacslab_server(items) as (our_port, _),
        pacslab_dicom(items, root / "serve") as serve_port,
    ):
        yield {"root": root, "ours": our_port, "serve": serve_port, "wlmscpfs": wl_port}


def _summary(responses: list[Dataset]) -> list[tuple[str, str, str]]:
    return sorted(
        (
            str(r.AccessionNumber),
            str(r.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID),
            str(r.PatientName),
        )
        for r in responses
    )


@pytest.mark.network
@pytest.mark.parametrize("source", ["ours", "serve"], ids=["memory", "serve-sql"])
@pytest.mark.parametrize("env", list(ENVIRONMENTS))
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_findscu_against_pacslab_and_wlmscpfs(
    case: Case, env: str, source: str, servers: dict[str, Any], tmp_path: Path
) -> None:
    query = write_query(_identifier(case), tmp_path / "query.dcm")
    ours = findscu(servers[source], query, tmp_path / "ours", env=ENVIRONMENTS[env])
    theirs = findscu(servers["wlmscpfs"], query, tmp_path / "wlm", env=ENVIRONMENTS[env])
    assert ours.returncode == 0, ours.stderr
    assert theirs.returncode == 0, theirs.stderr

    assert sorted({a for a, _, _ in _summary(ours.responses)}) == list(case.expected)
    wl_expected = case.expected if case.wlmscpfs is None else case.wlmscpfs
    assert sorted({a for a, _, _ in _summary(theirs.responses)}) == list(wl_expected), case.clause
    if case.wlmscpfs is None:
        # Same items, same decoded names and ids from both servers.
        assert _summary(ours.responses) == _summary(theirs.responses)
    for r in ours.responses:
        if not str(r.PatientName).isascii():
            assert r.SpecificCharacterSet == "ISO_IR 192"
        assert "RequestedProcedurePriority" in r  # every requested key comes back


@pytest.mark.network
def test_dcmtk_loads_every_exported_wl_file(servers: dict[str, Any], tmp_path: Path) -> None:
    """wlmscpfs rejects incomplete .wl files by default; all of ours must be served."""
    query = write_query(_identifier(Case("all")), tmp_path / "q.dcm")
    got = findscu(servers["wlmscpfs"], query, tmp_path / "out")
    assert len(got.responses) == len(_items())


# -------------------------------------------------------------------------- MPPS loopback


@pytest.mark.network
def test_mpps_loopback_create_complete_then_refuse() -> None:
    items = [make_item("A1")]
    with pacslab_server(items) as (port, worklist):
        ae = AE(ae_title="MODALITY1")
        ae.add_requested_context(ModalityPerformedProcedureStep)
        assoc = ae.associate("127.0.0.1", port, ae_title="PACSLAB")
        assert assoc.is_established
        try:
            create = n_create()
            status, _ = assoc.send_n_create(
                create.attributes, ModalityPerformedProcedureStep, create.sop_instance_uid
            )
            assert status.Status == 0x0000
            assert worklist.items()[0].steps[0].status is SpsStatus.STARTED

            done = n_set("COMPLETED")
            status, _ = assoc.send_n_set(
                done.modifications, ModalityPerformedProcedureStep, done.sop_instance_uid
            )
            assert status.Status == 0x0000
            assert worklist.items()[0].steps[0].status is SpsStatus.COMPLETED

            status, _ = assoc.send_n_set(
                n_set(None, end=False).modifications,
                ModalityPerformedProcedureStep,
                done.sop_instance_uid,
            )
            assert status.Status == 0x0110
            assert status.ErrorComment == "Performed Procedure Step Object may no longer be updated"
            assert status.ErrorID == 0xA710

            status, _ = assoc.send_n_create(
                create.attributes, ModalityPerformedProcedureStep, create.sop_instance_uid
            )
            assert status.Status == 0x0111
            status, _ = assoc.send_n_set(
                done.modifications, ModalityPerformedProcedureStep, "1.2.3.4.404"
            )
            assert status.Status == 0x0112
        finally:
            assoc.release()


@pytest.mark.network
def test_mpps_n_create_without_uid_gets_one_assigned() -> None:
    with pacslab_server([make_item("A1")]) as (port, _):
        ae = AE(ae_title="MODALITY1")
        ae.add_requested_context(ModalityPerformedProcedureStep)
        assoc = ae.associate("127.0.0.1", port, ae_title="PACSLAB")
        try:
            status, _ = assoc.send_n_create(n_create().attributes, ModalityPerformedProcedureStep)
            assert status.Status == 0x0000
        finally:
            assoc.release()


@pytest.mark.network
def test_every_transfer_syntax_gets_the_same_responses() -> None:
    """Little Endian contexts get pre-encoded responses, Big Endian pydicom's (PS3.5 A)."""
    from pydicom.uid import (
        DeflatedExplicitVRLittleEndian,
        ExplicitVRBigEndian,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
    )
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        ModalityWorklistInformationFind,
    )

    query = _all_keys()
    query.PatientBirthDate = ""
    query.ScheduledProcedureStepSequence = [Dataset()]  # whole steps, nested codes
    answers = {}
    with pacslab_server(_items()) as (port, _):
        for syntax in (
            ImplicitVRLittleEndian,
            ExplicitVRLittleEndian,
            DeflatedExplicitVRLittleEndian,
            ExplicitVRBigEndian,
        ):
            ae = AE(ae_title="MODALITY1")
            ae.add_requested_context(ModalityWorklistInformationFind, [syntax])
            assoc = ae.associate("127.0.0.1", port, ae_title="PACSLAB")
            assert assoc.is_established
            try:
                got = [
                    ds.to_json()
                    for status, ds in assoc.send_c_find(query, ModalityWorklistInformationFind)
                    if status and status.Status == 0xFF00
                ]
            finally:
                assoc.release()
            answers[syntax.name] = sorted(got)
    assert len(answers[ImplicitVRLittleEndian.name]) == len(_items())
    assert len({tuple(v) for v in answers.values()}) == 1, answers.keys()


def test_started_steps_leave_the_worklist() -> None:
    source = InMemoryWorklist([replace(_items()[0])])
    item = source.items()[0]
    source.put(item.with_step_status("SPSA1", SpsStatus.STARTED))
    assert _drain(_event(_all_keys()), source, MatchOptions()) == []


def test_runtime_keeps_identifiers_out_of_pynetdicom_logs() -> None:
    # The composition root sets pynetdicom's globals (pacslab.runtime), not handlers().
    from pynetdicom import _config, evt

    from tests.support import configured_runtime
    from worklist.memory import InMemoryMppsRepository
    from worklist.scp import handlers, presentation_contexts

    with configured_runtime():
        registered = handlers(InMemoryWorklist(), InMemoryMppsRepository(), MatchOptions())
        assert _config.LOG_REQUEST_IDENTIFIERS is False
        assert _config.LOG_RESPONSE_IDENTIFIERS is False
    events = {h[0] for h in registered}
    assert {evt.EVT_C_FIND, evt.EVT_N_CREATE, evt.EVT_N_SET, evt.EVT_CONN_OPEN} <= events
    assert [c.abstract_syntax for c in presentation_contexts()] == [
        "1.2.840.10008.5.1.4.31",
        "1.2.840.10008.3.1.2.3.3",
    ]
