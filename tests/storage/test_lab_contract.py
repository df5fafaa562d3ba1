"""Lab result store contract (issues 13.5 and 14.1), run on SQLite and PostgreSQL.

Every search field must narrow the answer: each case has results of two patients (and
of two codes, dates, statuses, orders) so that an ignored filter returns too much and
fails. A result for a specimen and test already reported for another patient is held,
never a new version of the other patient's result; lab patients are rows of the
``patients`` table imaging uses, and a lab message never rewrites an existing row.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from core.errors import DuplicateError, InvalidQueryError, NotFoundError
from core.settings import IndexSettings, OrdersSettings
from services.orders import OrderService
from storage.index.lab import SqlLabStore
from storage.index.orders import SqlOrderStore
from storage.index.schema import patients
from storage.index.sql import SqlIndex
from storage.lab import LabReportQuery, LabResultQuery, NewLabFile, NewLabReport, NewLabResult
from tests.storage.migration_checks import empty_index_url, on_both_backends
from worklist.orders.hl7v2 import parse_message, placed_orders, split_batch

T0 = datetime(2024, 3, 15, 7, 15, tzinfo=UTC)
HL7 = Path(__file__).resolve().parents[1] / "data" / "lab" / "hl7"
ORM = HL7 / "cdc_orm_o01_v251_order_linked.hl7"  # real capture, see tests/data/lab/SOURCES.md


def _sid(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _result(
    *,
    patient: str,
    issuer: str = "HOSP",
    specimen: str,
    code: str = "2823-3",
    status: str = "final",
    when: datetime = T0,
    placer: str = "",
    name: str = "DOE^JANE",
    panel: str = "",
) -> NewLabResult:
    """One HL7-like result; the series is specimen + code, the group the placer/specimen."""
    report = NewLabReport(
        report_id=_sid(f"pt|{placer or specimen}"),
        specimen_id=specimen,
        placer_order_id=placer,
        patient_id=patient,
        patient_issuer=issuer,
        patient_name=name,
        order_code=panel,
        order_system="LN" if panel else "",
        order_display="Panel" if panel else "",
    )
    return NewLabResult(
        observation_id=_sid(f"pt|{specimen}|LN|{code}"),
        report=report,
        location="message 1, segment 4",
        message_index=0,
        position=0,
        test_code=code,
        test_system="LN",
        value=4.1,
        value_type="NM",
        status=status,
        specimen_id=specimen,
        placer_order_id=placer,
        performed_at=when,
        patient_id=patient,
        patient_issuer=issuer,
        patient_name=name,
        patient_birth_date="1980-01-01",
        patient_sex="F",
    )


_files = iter(range(1_000_000))


def _ingest(store: SqlLabStore, *results: NewLabResult):  # type: ignore[no-untyped-def]
    n = next(_files)
    return store.ingest_file(
        NewLabFile(
            sha256=_sid(f"file{n}") * 2,
            name=f"f{n}.hl7",
            profile="auto",
            format="hl7v2",
            message_count=1,
            received_at=T0,
        ),
        results,
    )


def _ids(store: SqlLabStore, **query: object) -> set[str]:
    found, total = store.search_results(LabResultQuery(**query))  # type: ignore[arg-type]
    assert total == len(found)
    return {r.specimen_id + ":" + r.test_code for r in found}


class LabStoreContract:
    @pytest.fixture
    def index(self) -> SqlIndex:
        raise NotImplementedError

    @pytest.fixture
    def store(self, index: SqlIndex) -> SqlLabStore:
        return SqlLabStore(index, default_issuer="1.2.3.4")

    # -- patients ---------------------------------------------------------------

    def test_lab_patients_are_patient_rows_never_rewritten(
        self, store: SqlLabStore, index: SqlIndex
    ) -> None:
        _ingest(store, _result(patient="P1", specimen="S1", name="FIRST^NAME"))
        _ingest(store, _result(patient="P1", specimen="S2", name="OTHER^NAME"))
        _ingest(store, _result(patient="P1", issuer="", specimen="S3"))  # default issuer
        _ingest(store, _result(patient="P1", issuer="ELSEWHERE", specimen="S4"))
        with index.engine.connect() as conn:
            rows = conn.execute(
                select(patients.c.issuer, patients.c.name, patients.c.birth_date)
                .where(patients.c.patient_id == "P1")
                .order_by(patients.c.issuer)
            ).all()
        # One row per (Patient ID, issuer); the first message's demographics stay.
        assert [tuple(r) for r in rows] == [
            ("1.2.3.4", "DOE^JANE", "19800101"),
            ("ELSEWHERE", "DOE^JANE", "19800101"),
            ("HOSP", "FIRST^NAME", "19800101"),
        ]
        found, _ = store.search_results(LabResultQuery(specimen_ids=("S1", "S2")))
        assert len({r.patient_pk for r in found}) == 1 and found[0].patient_pk is not None
        assert {r.patient_issuer for r in found} == {"HOSP"}

    # -- search fields over two patients ---------------------------------------

    def _two_patients(self, store: SqlLabStore) -> tuple[int, int]:
        _ingest(
            store,
            _result(patient="A", specimen="SA", code="2823-3", placer="PA", panel="24326-1"),
            _result(patient="A", specimen="SA", code="2951-2", status="preliminary",
                    placer="PA", panel="24326-1"),
        )  # fmt: skip
        _ingest(
            store,
            _result(patient="B", specimen="SB", code="2823-3", when=T0 + timedelta(days=40)),
            _result(patient="B", issuer="OTHER", specimen="SC", code="718-7"),
        )
        found, _ = store.search_results(LabResultQuery(specimen_ids=("SA", "SB")))
        pks = {r.patient_id: r.patient_pk for r in found}
        assert pks["A"] is not None and pks["B"] is not None and pks["A"] != pks["B"]
        return pks["A"], pks["B"]

    def test_result_filters_each_narrow(self, store: SqlLabStore) -> None:
        a, b = self._two_patients(store)
        everything = {"SA:2823-3", "SA:2951-2", "SB:2823-3", "SC:718-7"}
        assert _ids(store) == everything
        assert _ids(store, patient_pks=(a,)) == {"SA:2823-3", "SA:2951-2"}
        assert _ids(store, patient_pks=(b,)) == {"SB:2823-3"}
        assert _ids(store, patient_pks=(a, b)) == {"SA:2823-3", "SA:2951-2", "SB:2823-3"}
        assert _ids(store, patient_pks=(-1,)) == set()
        assert _ids(store, patient_identifiers=(("HOSP", "B"),)) == {"SB:2823-3"}
        assert _ids(store, patient_identifiers=(("OTHER", "B"),)) == {"SC:718-7"}
        assert _ids(store, patient_identifiers=((None, "B"),)) == {"SB:2823-3", "SC:718-7"}
        assert _ids(store, patient_identifiers=(("HOSP", "C"),)) == set()
        assert _ids(store, codes=((None, "2823-3"),)) == {"SA:2823-3", "SB:2823-3"}
        assert _ids(store, codes=(("LN", "2823-3"),), patient_pks=(a,)) == {"SA:2823-3"}
        assert _ids(store, statuses=("preliminary",)) == {"SA:2951-2"}
        assert _ids(store, performed=(("ge", T0 + timedelta(days=1)),)) == {"SB:2823-3"}
        assert _ids(store, performed=(("lt", T0 + timedelta(days=1)),), patient_pks=(b,)) == set()
        assert _ids(store, categories=("laboratory",)) == everything
        assert _ids(store, categories=("vital-signs",)) == set()
        assert _ids(store, reviews=("conflict",)) == set()

    def test_report_filters_each_narrow(self, store: SqlLabStore) -> None:
        a, b = self._two_patients(store)

        def specimens(**query: object) -> set[str]:
            found, _ = store.search_reports(LabReportQuery(**query))  # type: ignore[arg-type]
            return {r.specimen_id for r in found}

        assert specimens() == {"SA", "SB", "SC"}
        assert specimens(patient_pks=(a,)) == {"SA"}
        assert specimens(patient_pks=(b,)) == {"SB"}
        assert specimens(patient_identifiers=((None, "B"),)) == {"SB", "SC"}
        assert specimens(patient_identifiers=(("OTHER", "B"),)) == {"SC"}
        # The ordered panel is the report's code; a result's code finds its report too.
        assert specimens(codes=(("LN", "24326-1"),)) == {"SA"}
        assert specimens(codes=((None, "718-7"),)) == {"SC"}
        assert specimens(categories=("LAB",)) == {"SA", "SB", "SC"}
        assert specimens(categories=("RAD",)) == set()
        assert specimens(statuses=("partial",)) == {"SA"}  # final + preliminary results
        assert specimens(statuses=("final",)) == {"SB", "SC"}
        assert specimens(statuses=("final", "partial"), patient_pks=(b,)) == {"SB"}
        assert specimens(statuses=("registered",)) == set()
        (report,) = store.search_reports(LabReportQuery(patient_pks=(a,)))[0]
        assert (report.order_code, report.order_system) == ("24326-1", "LN")
        assert report.patient_pk == a and report.patient_issuer == "HOSP"

    def test_based_on_only_for_the_same_patients_order(
        self, store: SqlLabStore, index: SqlIndex
    ) -> None:
        service = OrderService(SqlOrderStore(index), OrdersSettings())
        (raw,) = split_batch(ORM.read_bytes())
        (placed,) = placed_orders(parse_message(raw))
        order = service.submit(placed)
        # The real order: placer 4560411583, patient 1300974 of "Baptist East".
        _ingest(store, _result(patient="1300974", issuer="Baptist East", specimen="NB1",
                               placer="4560411583"))  # fmt: skip
        _ingest(store, _result(patient="9999999", issuer="Baptist East", specimen="NB2",
                               placer="4560411583", code="718-7"))  # fmt: skip
        _ingest(store, _result(patient="1300974", issuer="Baptist East", specimen="NB3",
                               placer="0000000"))  # fmt: skip
        ref = f"ServiceRequest/{order.id}"
        found, _ = store.search_results(LabResultQuery())
        assert {r.specimen_id: r.order_ref for r in found} == {"NB1": ref, "NB2": "", "NB3": ""}
        assert _ids(store, based_on=(order.id,)) == {"NB1:2823-3"}
        assert _ids(store, based_on=(ref,)) == {"NB1:2823-3"}
        assert _ids(store, based_on=("nope",)) == set()
        reports, _ = store.search_reports(LabReportQuery(based_on=(order.id,)))
        assert [r.specimen_id for r in reports] == ["NB1"]

    def test_late_link_never_crosses_patients(self, store: SqlLabStore, index: SqlIndex) -> None:
        _ingest(store, _result(patient="1300974", issuer="Baptist East", specimen="L1",
                               placer="4560411583"))  # fmt: skip
        _ingest(store, _result(patient="5555", issuer="Baptist East", specimen="L2",
                               placer="4560411583", code="718-7"))  # fmt: skip
        _ingest(store, _result(patient="5555", issuer="Baptist East", specimen="L1"))  # held
        assert store.search_results(LabResultQuery(unmatched=True))[1] == 3
        # A full page counts its total only as far as asked (FHIR _total, issue 21).
        assert store.search_results(LabResultQuery(unmatched=True, limit=1,
                                                   total_at_most=0))[1] == 1
        assert store.search_results(LabResultQuery(unmatched=True, limit=1,
                                                   total_at_most=5))[1] == 3
        assert store.search_reports(LabReportQuery(limit=1, total_at_most=0))[1] <= 1
        service = OrderService(SqlOrderStore(index), OrdersSettings())
        (raw,) = split_batch(ORM.read_bytes())
        order = service.submit(placed_orders(parse_message(raw))[0])  # patient 1300974
        ref = f"ServiceRequest/{order.id}"
        # By order number: only the order's patient's group; by specimen: not the held one.
        assert store.link_results(ref, order_id="4560411583") == 1
        assert store.link_results(ref, specimen_id="L1") == 0
        linked, _ = store.search_results(LabResultQuery(based_on=(ref,)))
        assert [(r.patient_id, r.specimen_id, r.review) for r in linked] == [("1300974", "L1", "")]

    # -- conflicts -------------------------------------------------------------------

    def test_same_specimen_test_other_patient_is_held_not_a_version(
        self, store: SqlLabStore
    ) -> None:
        first = _ingest(store, _result(patient="A", specimen="S1"))
        assert first.conflicts == ()
        again = _ingest(store, _result(patient="A", specimen="S1", status="corrected"))
        assert again.new_versions == 1 and again.conflicts == ()
        other = _ingest(store, _result(patient="B", specimen="S1"))
        assert other.new_versions == 0
        (held,) = other.conflicts
        a_current, _ = store.search_results(LabResultQuery(patient_identifiers=((None, "A"),)))
        (a_result,) = a_current
        # A's result stays current, its version 2, untouched.
        assert (a_result.version, a_result.status, a_result.review) == (2, "corrected", "")
        assert held.observation_id != a_result.observation_id
        assert (held.review, held.conflict_with) == ("conflict", a_result.observation_id)
        assert held.conflict_patient_pk == a_result.patient_pk
        assert held.report_id != a_result.report_id  # not in A's DiagnosticReport
        reports = {r.report_id: r.status for r in store.search_reports(LabReportQuery())[0]}
        assert reports == {a_result.report_id: "corrected", held.report_id: "preliminary"}
        listed, total = store.conflicts()
        assert total == 1 and listed[0].observation_id == held.observation_id
        # Served as preliminary (unverified patient), so searched as preliminary.
        assert {r.patient_id for r in store.search_results(
            LabResultQuery(statuses=("preliminary",)))[0]} == {"B"}  # fmt: skip
        assert {r.patient_id for r in store.search_results(
            LabResultQuery(statuses=("final", "corrected")))[0]} == {"A"}  # fmt: skip
        # A re-send for B continues B's held series, still held.
        resent = _ingest(store, _result(patient="B", specimen="S1", status="corrected"))
        (held2,) = resent.conflicts
        assert (held2.observation_id, held2.version) == (held.observation_id, 2)
        assert store.conflicts()[1] == 1
        # Another test of the same specimen for B: A's specimen (group), so held too.
        other_test = _ingest(store, _result(patient="B", specimen="S1", code="718-7"))
        assert len(other_test.conflicts) == 1 and other_test.conflicts[0].conflict_with == ""
        # A result without a patient continues the series (analyzers send barcodes only).
        anonymous = _ingest(store, replace(_result(patient="", specimen="S1"), patient_id=""))
        assert anonymous.conflicts == () and anonymous.new_versions == 1

    def test_resolve_accept_moves_the_specimen_with_new_versions(self, store: SqlLabStore) -> None:
        _ingest(store, _result(patient="A", specimen="S1"))
        (held,) = _ingest(store, _result(patient="B", specimen="S1")).conflicts
        with pytest.raises(InvalidQueryError):
            store.resolve(held.observation_id, "maybe")
        with pytest.raises(NotFoundError):
            store.resolve("0" * 32, "accept")
        resolution = store.resolve(held.observation_id, "accept")
        assert resolution.held_before.review == "conflict"
        assert (resolution.held_after.review, resolution.held_after.version) == ("accepted", 2)
        assert resolution.retired_before is not None and resolution.retired_after is not None
        assert resolution.retired_before.status == "final"
        assert resolution.retired_after.status == "entered-in-error"
        assert resolution.retired_after.review == "moved"
        assert store.conflicts()[1] == 0
        with pytest.raises(NotFoundError):
            store.resolve(held.observation_id, "accept")  # settled once
        history = store.result_history(resolution.retired_after.observation_id)
        assert [(v.version, v.status) for v in history] == [(2, "entered-in-error"), (1, "final")]
        # Accepted: B's re-send is an ordinary version, not held again.
        resent = _ingest(store, _result(patient="B", specimen="S1", status="corrected"))
        assert resent.conflicts == ()
        b, _ = store.search_results(LabResultQuery(patient_identifiers=((None, "B"),)))
        assert [(r.version, r.review, r.status) for r in b] == [(3, "accepted", "corrected")]

    def test_two_reviewers_at_once_settle_it_once(self, store: SqlLabStore) -> None:
        import threading

        _ingest(store, _result(patient="A", specimen="S1"))
        (held,) = _ingest(store, _result(patient="B", specimen="S1")).conflicts
        outcomes: list[str] = []
        start = threading.Barrier(2)

        def review(choice: str) -> None:
            start.wait()
            try:
                outcomes.append(store.resolve(held.observation_id, choice).choice)
            except (NotFoundError, DuplicateError) as exc:
                outcomes.append(type(exc).__name__)

        threads = [threading.Thread(target=review, args=(c,)) for c in ("accept", "discard")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(outcomes) == 2
        assert len([o for o in outcomes if o in ("accept", "discard")]) == 1, outcomes
        history = store.result_history(held.observation_id)
        assert [v.version for v in history] == [2, 1]  # one settlement, one new version

    def test_resolve_discard_keeps_the_first_patients_result(self, store: SqlLabStore) -> None:
        _ingest(store, _result(patient="A", specimen="S1"))
        (held,) = _ingest(store, _result(patient="B", specimen="S1")).conflicts
        resolution = store.resolve(held.observation_id, "discard")
        assert resolution.retired_before is None
        assert (resolution.held_after.status, resolution.held_after.review) == (
            "entered-in-error",
            "discarded",
        )
        a, _ = store.search_results(LabResultQuery(patient_identifiers=((None, "A"),)))
        assert [(r.version, r.status, r.review) for r in a] == [(1, "final", "")]
        assert store.conflicts()[1] == 0
        (held_report,) = store.search_reports(LabReportQuery(report_ids=(held.report_id,)))[0]
        assert held_report.status == "entered-in-error"
        # The next result for B on A's specimen is held again.
        assert len(_ingest(store, _result(patient="B", specimen="S1")).conflicts) == 1


@pytest.fixture
def sqlite_index(tmp_path: Path) -> Iterator[SqlIndex]:
    index = SqlIndex(IndexSettings(url=f"sqlite:///{tmp_path}/index.db"))
    yield index
    index.close()


@pytest.fixture
def postgres_index(pg_url: str) -> Iterator[SqlIndex]:
    index = SqlIndex(IndexSettings(url=pg_url))
    yield index
    index.close()


class TestSqliteLabStore(LabStoreContract):
    @pytest.fixture
    def index(self, sqlite_index: SqlIndex) -> SqlIndex:
        return sqlite_index


@pytest.mark.postgres
class TestPostgresLabStore(LabStoreContract):
    @pytest.fixture
    def index(self, postgres_index: SqlIndex) -> SqlIndex:
        return postgres_index


def _lab_rows_before_0005(index: SqlIndex) -> None:
    """Rows as revision 0004 wrote them: patient ID on the result, no patient row."""
    from storage.index.schema import lab_files, lab_reports, lab_results

    with index.engine.begin() as conn:
        file_pk = conn.execute(
            lab_files.insert()
            .values(
                sha256="a" * 64, name="f.hl7", profile="auto", format="hl7v2",
                status="filed", message_count=1, result_count=2, received_at=T0,
            )
            .returning(lab_files.c.id)
        ).scalar_one()  # fmt: skip
        for n, patient, qc in ((1, "OLD-1", False), (2, "", True)):
            report_pk = conn.execute(
                lab_reports.insert()
                .values(
                    report_id=f"r{n}", patient_id=patient, is_qc=qc, unmatched=True,
                    created_at=T0, updated_at=T0,
                )
                .returning(lab_reports.c.id)
            ).scalar_one()  # fmt: skip
            conn.execute(
                lab_results.insert().values(
                    observation_id=f"o{n}", version=1, is_current=True, file_pk=file_pk,
                    report_pk=report_pk, message_index=0, position=n, test_code="K", is_qc=qc,
                    specimen_id=f"S{n}", status="final", patient_id=patient,
                    patient_name="OLD^NAME", patient_birth_date="1970-01-02",
                    is_critical=False, unmatched=True,
                    created_at=T0, updated_at=T0,
                )
            )  # fmt: skip


@on_both_backends
def test_migration_gives_existing_lab_rows_their_patient(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from storage.index.migrate import upgrade

    url = empty_index_url(backend, tmp_path, request)
    index = SqlIndex(IndexSettings(url=url, migrate=False))
    try:
        upgrade(index.engine, "0004")
        _lab_rows_before_0005(index)
        upgrade(index.engine)
        store = SqlLabStore(index)
        found, _ = store.search_results(LabResultQuery(qc=None))
        by_id = {r.observation_id: r for r in found}
        assert by_id["o2"].patient_pk is None  # QC: no patient
        pk = by_id["o1"].patient_pk
        assert pk is not None and by_id["o1"].review == ""
        with index.engine.connect() as conn:
            row = conn.execute(select(patients).where(patients.c.id == pk)).one()
        assert (row.patient_id, row.issuer, row.name, row.birth_date) == (
            "OLD-1", "", "OLD^NAME", "19700102"
        )  # fmt: skip
        (report,) = store.search_reports(LabReportQuery(patient_pks=(pk,)))[0]
        assert (report.report_id, report.status) == ("r1", "final")
        # A new result of the same patient (no issuer) joins the same row.
        _ingest(store, replace(_result(patient="OLD-1", issuer="", specimen="S9")))
        assert _ids(store, patient_pks=(pk,)) == {"S1:K", "S9:2823-3"}
    finally:
        index.close()
