"""C-FIND over the SQL order store answers exactly what the matcher answers over every item.

``SqlWorklistSource`` narrows candidates in SQL (station, modality, start date,
status, Accession Number, Patient ID); :func:`worklist.query.match` has the last
word. Over a generated worklist and generated identifiers, the responses through
the SQL source (what ``pacslab serve`` answers from) must equal those of a brute-force
match over all items, and those through the in-memory fake, byte for byte.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pynetdicom.dsutils import encode

from core.settings import IndexSettings
from storage.index.orders import SqlOrderStore, SqlWorklistSource
from storage.index.sql import SqlIndex
from tests.worklist.order_requests import place_items
from worklist.memory import InMemoryWorklist
from worklist.model import OFFERED, SpsStatus, WorklistItem, make_item
from worklist.ports import WorklistSource
from worklist.query import build_query, iter_matches

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR")

DAY0 = datetime(2026, 11, 25, 7, 0)
STATIONS = ["CT1", "CT2", "MR1", "ct1"]
NAMES = ["NGUYỄN^VĂN AN", "Nguyen^Van An", "SMITH^JOHN", "ĐẶNG^THỊ HOA", "DOE^JANE"]
STATUSES = [SpsStatus.SCHEDULED, SpsStatus.ARRIVED, SpsStatus.STARTED, SpsStatus.COMPLETED]


def _worklist() -> list[WorklistItem]:
    items = []
    for n in range(120):
        station = STATIONS[n % len(STATIONS)]
        item = make_item(
            f"ACC{n:03d}",
            patient_name=NAMES[n % len(NAMES)],
            patient_id=f"PID{n % 40:02d}",  # several orders per patient
            station_ae_title=station,
            modality=station[:2].upper(),
            start=DAY0 + timedelta(days=n % 5, minutes=37 * n % 720),
        )
        first = replace(item.steps[0], status=STATUSES[n % 7 % len(STATUSES)])
        steps = (first,)
        if n % 3 == 0:  # a second step on another station, the next day
            steps += (
                replace(
                    first,
                    step_id=f"{first.step_id}B",
                    station_ae_title="US1",
                    modality="US",
                    start=first.start + timedelta(days=1, hours=2),
                    status=SpsStatus.SCHEDULED,
                ),
            )
        items.append(replace(item, steps=steps))
    return items


ITEMS = _worklist()


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def sql_source(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorklistSource]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('sqlwl')}/index.db"
    else:
        from conftest_pg import admin_url, create_database  # as tests/conftest.py does

        url = create_database(admin_url(request.getfixturevalue("pg_server")))
    index = SqlIndex(IndexSettings(url=url))
    store = SqlOrderStore(index)
    place_items(store, ITEMS, source="test")
    yield SqlWorklistSource(index)
    index.close()


def _identifier(
    station: str, modality: str, date: str, time: str, accession: str, pid: str, name: str
) -> Dataset:
    q = Dataset()
    q.PatientName = name
    q.PatientID = pid
    q.AccessionNumber = accession
    q.StudyInstanceUID = ""
    sps = Dataset()
    sps.ScheduledStationAETitle = station
    sps.Modality = modality
    sps.ScheduledProcedureStepStartDate = date
    sps.ScheduledProcedureStepStartTime = time
    sps.ScheduledProcedureStepID = ""
    sps.ScheduledProcedureStepStatus = ""
    q.ScheduledProcedureStepSequence = [sps]
    return q


def _answers(source: WorklistSource | None, identifier: Dataset) -> list[bytes]:
    query = build_query(identifier)
    items = ITEMS if source is None else source.candidates(query.prefilter)
    return sorted(encode(ds, True, True) or b"" for ds in iter_matches(query, items))


DAYS = [(DAY0 + timedelta(days=d)).strftime("%Y%m%d") for d in range(7)]

identifiers = st.builds(
    _identifier,
    station=st.sampled_from(["", "*", "CT1", "ct1", "CT?", "C*", "US1", "MR1\\CT2", "XX"]),
    modality=st.sampled_from(["", "CT", "MR", "US", "C?", "ct"]),
    date=st.sampled_from(
        ["", DAYS[0], DAYS[2], f"{DAYS[1]}-{DAYS[3]}", f"-{DAYS[1]}", f"{DAYS[4]}-"]
    ),
    time=st.sampled_from(["", "0700-1200", "12-", "-0930"]),
    accession=st.sampled_from(["", "ACC003", "ACC003\\ACC010\\ACC099", "ACC01*", "acc003", "*"]),
    pid=st.sampled_from(["", "PID03", "PID03\\PID17", "PID1?", "pid03", "NOPE"]),
    name=st.sampled_from(["", "nguyen^van an", "SMITH*", "ĐẶNG^THỊ HOA", "*"]),
)


@settings(
    max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(identifier=identifiers)
def test_sql_source_answers_what_a_full_scan_answers(
    sql_source: WorklistSource, identifier: Dataset
) -> None:
    expected = _answers(None, identifier)
    assert _answers(sql_source, identifier) == expected
    assert _answers(InMemoryWorklist(ITEMS), identifier) == expected


@pytest.mark.parametrize(
    ("accession", "pid"),
    [("ACC003", ""), ("ACC003\\ACC043\\ACC010", ""), ("", "PID03"), ("acc003", ""), ("", "PID0?")],
)
def test_accession_and_patient_id_narrow_in_sql(
    sql_source: WorklistSource, accession: str, pid: str
) -> None:
    """Exact keys reach the index: only those orders are read, not the whole worklist."""
    query = build_query(_identifier("", "", "", "", accession, pid, ""))
    accessions, pids = set(accession.split("\\")) - {""}, set(pid.split("\\")) - {""}
    on_offer = [i for i in ITEMS if any(s.status in OFFERED for s in i.steps)]
    if "?" in pid:  # a wild card is matched in Python: every order on offer is read
        wanted = on_offer
    else:
        wanted = [
            i
            for i in on_offer
            if (not accessions or i.order.accession_number in accessions)
            and (not pids or i.patient.id in pids)
        ]
    got = list(sql_source.candidates(query.prefilter))
    assert sorted(i.key for i in got) == sorted(i.key for i in wanted)
