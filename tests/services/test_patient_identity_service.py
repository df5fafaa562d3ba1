"""PatientIdentityService (services/patients.py) on SQLite and PostgreSQL: the rules of
merges, identifier changes, updates and their undo, beside the end-to-end test."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import event, select

from core.errors import (
    DuplicateError,
    InvalidQueryError,
    NotFoundError,
    ProcedureStepStateError,
)
from core.patients import (
    ChangePatientIdentifier,
    Demographics,
    MergePatients,
    PatientRef,
    UpdatePatient,
)
from core.settings import IndexSettings
from services.patients import (
    PatientIdentityService,
    PatientLinks,
    current_patient_attributes,
)
from storage.index.queries import Match, Query
from storage.index.schema import orders, patient_name_words, patients, series, studies
from storage.index.sql import SqlIndex


def _patient(
    index: SqlIndex, patient_id: str, name: str, issuer: str = "", *, pk: int | None = None
) -> int:
    with index.write() as conn:
        return int(
            conn.execute(
                patients.insert()
                .values(
                    **({} if pk is None else {"id": pk}),
                    patient_id=patient_id,
                    issuer=issuer,
                    name=name,
                    name_key=name.lower(),
                    updated_at=datetime.now(UTC),
                )
                .returning(patients.c.id)
            ).scalar_one()
        )


def _study(index: SqlIndex, uid: str, patient_pk: int) -> None:
    now = datetime.now(UTC)
    with index.write() as conn:
        study_pk = conn.execute(
            studies.insert()
            .values(study_instance_uid=uid, patient_pk=patient_pk, created_at=now, updated_at=now)
            .returning(studies.c.id)
        ).scalar_one()
        # A study is visible only with a series holding a current instance (IOCM,
        # storage/index/queries.py _visible): give it one, as a received study has.
        conn.execute(
            series.insert().values(
                series_instance_uid=f"{uid}.1", study_pk=study_pk, updated_at=now, num_instances=1
            )
        )


def _order(index: SqlIndex, public_id: str, patient_id: str, name: str) -> None:
    now = datetime.now(UTC)
    item = {
        "patient": {"id": patient_id, "issuer": "", "name": name, "birth_date": None, "sex": ""},
        "order": {"accession_number": public_id},
        "steps": [],
    }
    with index.write() as conn:
        conn.execute(
            orders.insert().values(
                public_id=public_id,
                accession_number=public_id,
                status="SCHEDULED",
                version=1,
                patient_id=patient_id,
                patient_name=name,
                item_json=json.dumps(item),
                created_at=now,
                updated_at=now,
            )
        )


def _owner(index: SqlIndex, uid: str) -> str:
    [row] = index.find(Query(level="study", matches=(Match("StudyInstanceUID", uid),)))
    return str(row["PatientID"])


def _order_row(index: SqlIndex, public_id: str) -> tuple[str, str, int, dict[str, object]]:
    with index.read() as conn:
        r = conn.execute(select(orders).where(orders.c.public_id == public_id)).one()
    return r.patient_id, r.patient_name, int(r.version), json.loads(r.item_json)["patient"]


@contextlib.contextmanager
def _selects(index: SqlIndex) -> Iterator[list[str]]:
    """The SELECT statements the index's engine runs inside the block."""
    seen: list[str] = []

    def count(*args: object) -> None:
        if str(args[2]).lstrip().upper().startswith("SELECT"):
            seen.append(str(args[2]))

    event.listen(index.engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        event.remove(index.engine, "before_cursor_execute", count)


def _states_agree(index: SqlIndex, svc: PatientIdentityService, pks: list[int]) -> None:
    """A search page's batch read (issue 21) says what links() and version() say of
    each row, in two statements whatever the page's size (a round trip per row made a
    FHIR Patient page 150-400 ms on PostgreSQL)."""
    with _selects(index) as seen:
        states = svc.link_states([*pks, 10**9])
    assert len(seen) == 2, seen
    assert states == {pk: (svc.links(pk), svc.version(pk)) for pk in [*pks, 10**9]}


class IdentityContract:
    @pytest.fixture
    def index(self) -> SqlIndex:
        raise NotImplementedError

    @pytest.fixture
    def svc(self, index: SqlIndex) -> PatientIdentityService:
        return PatientIdentityService(index, default_issuer="HOSP")

    def test_merge_chain_and_undo_in_reverse_order(
        self, index: SqlIndex, svc: PatientIdentityService
    ) -> None:
        a, b, c = (_patient(index, p, f"{p}^X") for p in ("A", "B", "C"))
        _study(index, "1.1", a)
        _study(index, "1.2", b)
        _order(index, "oa", "A", "A^X")
        first = svc.apply(MergePatients(PatientRef("B"), PatientRef("A")), source="api", agent="t")
        assert (first.studies, first.orders) == (1, 1)
        second = svc.apply(MergePatients(PatientRef("C"), PatientRef("B")), source="api", agent="t")
        assert second.studies == 2 and second.orders == 1
        assert {_owner(index, u) for u in ("1.1", "1.2")} == {"C"}
        # A, merged into B earlier, now leads to C as well.
        assert svc.links(a).replaced_by == c and svc.links(b).replaced_by == c
        assert sorted(svc.links(c).replaces) == [a, b]
        _states_agree(index, svc, [a, b, c])
        patient_id, name, version, item = _order_row(index, "oa")
        assert (patient_id, name, version, item["id"], item["name"]) == ("C", "C^X", 3, "C", "C^X")
        # The first merge cannot be undone while the second holds its rows.
        with pytest.raises(ProcedureStepStateError):
            svc.undo(first.change_id, source="api", agent="t")
        svc.undo(second.change_id, source="api", agent="t")
        assert svc.links(a).replaced_by == b and svc.links(b).replaced_by is None
        svc.undo(first.change_id, source="api", agent="t")
        assert (_owner(index, "1.1"), _owner(index, "1.2")) == ("A", "B")
        patient_id, name, version, item = _order_row(index, "oa")
        assert (patient_id, name, version, item["id"], item["name"]) == ("A", "A^X", 5, "A", "A^X")
        assert svc.links(a).replaced_by is None and svc.links(c).replaces == ()
        _states_agree(index, svc, [a, b, c])
        kinds = [ch.kind for ch in svc.changes()]
        assert kinds == ["undo", "undo", "merge", "merge"]
        assert [ch.undone_by != "" for ch in svc.changes()] == [False, False, True, True]

    def test_a_merge_of_many_rows_counts_lists_and_undoes_every_one(
        self, index: SqlIndex, svc: PatientIdentityService
    ) -> None:
        """Issue 21: A, into which 41 patients were merged, merged into B involves 43
        rows (B, A and the 41 re-pointed to B, whose Patient.link changed). With the pks
        of a grown archive (7 digits) their ",pk,pk," text passes 255 characters, where
        patient_changes.patient_pks is cut: every row must still count the change in
        its version, list it among its changes, and get its link back on undo."""
        base = 1_000_000  # pks as in an archive of a million patients
        xs = [_patient(index, f"X{i}", f"X{i}^X", pk=base + i) for i in range(41)]
        a = _patient(index, "A", "A^X", pk=base + 100)
        b = _patient(index, "B", "B^X", pk=base + 101)
        for i in range(41):
            svc.apply(MergePatients(PatientRef("A"), PatientRef(f"X{i}")), source="api", agent="t")
        involved = [b, a, *xs]
        assert len("," + ",".join(map(str, involved)) + ",") > 255
        before = {pk: svc.version(pk) for pk in involved}
        merge = svc.apply(MergePatients(PatientRef("B"), PatientRef("A")), source="api", agent="t")
        stored = svc.change(merge.change_id)
        assert stored.patient_pks[:2] == (b, a)  # the change's order: survivor first
        assert sorted(stored.patient_pks) == sorted(involved)
        assert all(svc.links(x).replaced_by == b for x in xs)
        for pk in involved:
            assert svc.version(pk) == before[pk] + 1, pk
            assert [c.change_id for c in svc.changes(patient_pk=pk, limit=1)] == [
                merge.change_id
            ], pk
        _states_agree(index, svc, involved)
        undo = svc.undo(merge.change_id, source="api", agent="t")
        assert svc.links(a) == PatientLinks(None, tuple(xs))
        assert all(svc.links(x).replaced_by == a for x in xs)
        assert svc.links(b).replaces == ()
        for pk in involved:
            assert svc.version(pk) == before[pk] + 2, pk
            assert [c.change_id for c in svc.changes(patient_pk=pk, limit=2)] == [
                undo.change_id,
                merge.change_id,
            ], pk
        _states_agree(index, svc, involved)
        # The review list's page gets its patients in one more statement, not one a row.
        with _selects(index) as seen:
            page = svc.changes(limit=50)
        assert len(page) == 43 and len(seen) == 2, seen
        assert sorted(page[0].patient_pks) == sorted(involved)  # the undo: the same rows

    def test_merge_into_an_unknown_patient_creates_it_and_undo_removes_it(
        self, index: SqlIndex, svc: PatientIdentityService
    ) -> None:
        a = _patient(index, "A", "A^X")
        _study(index, "2.1", a)
        change = svc.apply(
            MergePatients(
                PatientRef("NEW", "HOSP"),
                PatientRef("A"),
                Demographics(name="NGUYỄN^VĂN AN", birth_date="19900101"),
            ),
            source="hl7-mllp",
            agent="HIS",
        )
        current = current_patient_attributes(index, "2.1")
        assert current is not None
        assert (current.patient_id, current.issuer, current.name, current.birth_date) == (
            "NEW",
            "HOSP",
            "NGUYỄN^VĂN AN",
            "19900101",
        )
        # Name search words of the created patient (QIDO fuzzy, FHIR name=).
        found = index.find(Query(level="study", matches=(Match("PatientName", "nguyen*"),)))
        assert [r["StudyInstanceUID"] for r in found] == ["2.1"]
        svc.undo(change.change_id, source="api", agent="t")
        assert svc.find(PatientRef("NEW", "HOSP")) is None
        assert _owner(index, "2.1") == "A"
        with index.read() as conn:
            assert (
                conn.execute(
                    select(patient_name_words.c.word).where(patient_name_words.c.word == "nguyen")
                ).first()
                is None
            )

    def test_refusals_change_nothing(self, index: SqlIndex, svc: PatientIdentityService) -> None:
        _patient(index, "A", "A^X")
        _patient(index, "B", "B^X")
        with pytest.raises(InvalidQueryError):
            svc.apply(MergePatients(PatientRef("A"), PatientRef("A")), source="api", agent="t")
        with pytest.raises(NotFoundError):
            svc.apply(MergePatients(PatientRef("A"), PatientRef("GHOST")), source="api", agent="t")
        with pytest.raises(NotFoundError):
            svc.apply(
                ChangePatientIdentifier(PatientRef("GHOST"), PatientRef("Z")),
                source="api",
                agent="t",
            )
        # A47 onto an identifier in use: a duplicate key (HL7 205, FHIR 409), not 207/400.
        with pytest.raises(DuplicateError):
            svc.apply(
                ChangePatientIdentifier(PatientRef("A"), PatientRef("B")), source="api", agent="t"
            )
        for bad in (
            Demographics(name="A\\B"),
            Demographics(birth_date="1990"),
            Demographics(sex="X"),
        ):
            with pytest.raises(InvalidQueryError):
                svc.apply(UpdatePatient(PatientRef("A"), bad), source="api", agent="t")
        with pytest.raises(InvalidQueryError):
            svc.apply(UpdatePatient(PatientRef("x" * 65), Demographics()), source="api", agent="t")
        with pytest.raises(InvalidQueryError):
            svc.undo("../etc", source="api", agent="t")
        with pytest.raises(NotFoundError):
            svc.undo("0" * 32, source="api", agent="t")
        assert svc.changes() == []

    def test_update_registers_an_unknown_patient_and_keeps_unsent_fields(
        self, index: SqlIndex, svc: PatientIdentityService
    ) -> None:
        # A04 for a patient not seen yet: registered under the hospital's issuer.
        svc.apply(
            UpdatePatient(PatientRef("R1"), Demographics(name="LÊ^AN", sex="F")),
            source="hl7-mllp",
            agent="HIS",
        )
        row = svc.find(PatientRef("R1"))
        assert row is not None and (row.issuer, row.name, row.sex) == ("HOSP", "LÊ^AN", "F")
        # A08 with only the birth date: name and sex stay (None = not sent).
        svc.apply(
            UpdatePatient(PatientRef("R1"), Demographics(birth_date="20000101")),
            source="hl7-mllp",
            agent="HIS",
        )
        row = svc.find(PatientRef("R1"))
        assert row is not None and (row.name, row.sex, row.birth_date) == ("LÊ^AN", "F", "20000101")
        # Sent empty ("" in HL7): cleared.
        svc.apply(UpdatePatient(PatientRef("R1"), Demographics(sex="")), source="api", agent="t")
        row = svc.find(PatientRef("R1"))
        assert row is not None and row.sex == ""


class TestSqliteIdentity(IdentityContract):
    @pytest.fixture
    def index(self, tmp_path: Path) -> Iterator[SqlIndex]:
        idx = SqlIndex(IndexSettings(url=f"sqlite:///{tmp_path}/index.db"))
        yield idx
        idx.close()


@pytest.mark.postgres
class TestPostgresIdentity(IdentityContract):
    @pytest.fixture
    def index(self, pg_url: str) -> Iterator[SqlIndex]:
        idx = SqlIndex(IndexSettings(url=pg_url))
        yield idx
        idx.close()
