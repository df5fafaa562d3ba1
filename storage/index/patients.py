"""Patient identity changes in the SQL index (IHE PIR; issue 17, migration 0008_pir).

One transaction per change moves or rewrites the rows of one patient in every store
of the index: ``patients`` (and ``patient_name_words``), ``studies``, ``orders`` (the
worklist items' patient, with a new order version), ``lab_results`` and
``lab_reports``. Every changed column of every row is recorded, before and after, in
``patient_changes.rows_json``; an undo checks that each row still holds the "after"
values and writes the "before" values back, in one transaction, or changes nothing
(:class:`~core.errors.ProcedureStepStateError`, 409) when a later change touched the
same rows (undo the later one first).

The tables (``storage/index/pir_tables.py``) are created by migration ``0008_pir``;
``patient_change_patients`` (which patient rows each change involved, all of them) by
``0014_pir_change_patients`` (issue 21): versions, a patient's changes and undo read it,
by index, instead of matching ``patient_changes.patient_pks`` text with ``LIKE`` over the
whole log (text that was cut at 255 characters, too).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Table,
    and_,
    bindparam,
    delete,
    func,
    or_,
    select,
    update,
)

from core.errors import (
    DuplicateError,
    InvalidQueryError,
    NotFoundError,
    PreconditionFailedError,
    ProcedureStepStateError,
)
from core.person_name import person_name_key
from storage.index.pir_tables import patient_change_patients, patient_changes, patient_links
from storage.index.schema import (
    lab_reports,
    lab_results,
    order_versions,
    orders,
    patients,
    studies,
)
from storage.index.sql import set_name_words

if TYPE_CHECKING:
    from storage.index.sql import SqlIndex

__all__ = [
    "PatientRow",
    "SqlPatientStore",
    "StoredChange",
    "patient_change_patients",
    "patient_changes",
    "patient_links",
]

_TABLES: dict[str, Table] = {
    "patients": patients,
    "studies": studies,
    "orders": orders,
    "lab_results": lab_results,
    "lab_reports": lab_reports,
}
_DEMOGRAPHICS = ("name", "birth_date", "sex")
#: orders' patient columns ↔ patients' columns
_ORDER_COLS = {
    "patient_id": "patient_id",
    "issuer": "issuer",
    "patient_name": "name",
    "birth_date": "birth_date",
    "sex": "sex",
}


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class PatientRow:
    """The identity and demographics a ``patients`` row holds."""

    pk: int
    patient_id: str
    issuer: str
    name: str
    birth_date: str
    sex: str
    #: "record" once the record system set the demographics (images then keep off).
    demographics_source: str = ""


@dataclass(frozen=True, slots=True)
class StoredChange:
    """One row of the change log, as the review API shows it (no row values)."""

    change_id: str
    kind: str
    source: str
    agent: str
    patient_pks: tuple[int, ...]
    summary: dict[str, Any]
    undoes: str
    undone_by: str
    created_at: datetime
    rows: dict[str, Any]


@dataclass
class _Plan:
    """Row changes of one command: ``table → [(pk, before, after)]`` (changed columns)."""

    rows: dict[str, list[tuple[int, dict[str, Any], dict[str, Any]]]]
    created: list[int]
    link: tuple[int, int] | None
    patient_pks: list[int]
    #: obsolete pks of earlier merges into the now obsolete patient, re-pointed
    relinked: list[int] = field(default_factory=list)

    def add(self, table: str, pk: int, before: Mapping[str, Any], after: Mapping[str, Any]) -> None:
        changed = {k: v for k, v in after.items() if before.get(k) != v}
        if changed:
            self.rows.setdefault(table, []).append(
                (pk, {k: before.get(k) for k in changed}, changed)
            )

    def count(self, table: str) -> int:
        return len(self.rows.get(table, []))


def _da_to_iso(da: str) -> str | None:
    if len(da) == 8 and da.isdigit():
        try:
            return datetime.strptime(da, "%Y%m%d").date().isoformat()
        except ValueError:
            return None
    return None


class SqlPatientStore:
    """Identity changes over the tables of a :class:`~storage.index.sql.SqlIndex`."""

    def __init__(self, index: SqlIndex) -> None:
        self.index = index
        self.engine = index.engine

    # -- reads ------------------------------------------------------------------

    @staticmethod
    def _row(r: Any) -> PatientRow:
        return PatientRow(
            int(r.id), r.patient_id, r.issuer, r.name, r.birth_date, r.sex, r.demographics_source
        )

    def _find(self, conn: Connection, patient_id: str, issuers: Iterable[str]) -> PatientRow | None:
        for issuer in issuers:
            r = conn.execute(
                select(patients).where(
                    and_(patients.c.patient_id == patient_id, patients.c.issuer == issuer)
                )
            ).first()
            if r is not None:
                return self._row(r)
        return None

    def find(self, patient_id: str, issuers: Iterable[str]) -> PatientRow | None:
        """The row of ``patient_id`` under the first of ``issuers`` that has one."""
        with self.index.read() as conn:
            return self._find(conn, patient_id, issuers)

    def patient(self, pk: int) -> PatientRow | None:
        with self.index.read() as conn:
            r = conn.execute(select(patients).where(patients.c.id == pk)).first()
        return None if r is None else self._row(r)

    def study_patient(self, study_instance_uid: str) -> PatientRow | None:
        """The patient row a study belongs to now (what retrieval coerces to)."""
        with self.index.read() as conn:
            r = conn.execute(
                select(patients)
                .select_from(studies.join(patients, studies.c.patient_pk == patients.c.id))
                .where(studies.c.study_instance_uid == study_instance_uid)
            ).first()
        return None if r is None else self._row(r)

    def surviving(self, patient_id: str, issuers: Iterable[str]) -> PatientRow | None:
        """The patient ``patient_id`` was merged into (IHE PIR A40, FHIR ``$merge``), or
        None when its row (under the first of ``issuers`` that has one) is not merged
        away. Merges into an obsolete patient are re-pointed (``merge``), so one link
        leads to the survivor."""
        with self.index.read() as conn:
            row = self._find(conn, patient_id, issuers)
            if row is None:
                return None
            up = conn.execute(
                select(patient_links.c.surviving_pk).where(patient_links.c.obsolete_pk == row.pk)
            ).scalar()
            return None if up is None else self._fetch(conn, int(up))

    @staticmethod
    def _version(conn: Connection, pk: int) -> int:
        # A range of the link table's primary key (patient_pk, change_pk): as many index
        # entries as the row has changes, whatever the size of the log (issue 21).
        return 1 + int(
            conn.execute(
                select(func.count())
                .select_from(patient_change_patients)
                .where(patient_change_patients.c.patient_pk == pk)
            ).scalar_one()
        )

    def version(self, pk: int) -> int:
        """The FHIR ``meta.versionId`` of a patient row: 1, plus one for every change
        of the log that involved it (updates, identifier changes, merges, undos; a
        merge involves the rows merged into its obsolete patient earlier, too)."""
        with self.index.read() as conn:
            return self._version(conn, pk)

    def _check_version(self, conn: Connection, pk: int, expected: int | None) -> None:
        """Refuse a version-aware update (``If-Match``) of a row that changed since:
        checked in the write transaction of the change, so no update is lost."""
        if expected is not None and self._version(conn, pk) != expected:
            raise PreconditionFailedError("the Patient changed since that version")

    def links(self, pk: int) -> tuple[int | None, list[int]]:
        """``(surviving pk this row was merged into, obsolete pks merged into it)``."""
        with self.index.read() as conn:
            up = conn.execute(
                select(patient_links.c.surviving_pk).where(patient_links.c.obsolete_pk == pk)
            ).scalar()
            down = conn.execute(
                select(patient_links.c.obsolete_pk)
                .where(patient_links.c.surviving_pk == pk)
                .order_by(patient_links.c.obsolete_pk)
            ).scalars()
            return (None if up is None else int(up)), [int(x) for x in down]

    def link_states(self, pks: Sequence[int]) -> dict[int, tuple[int | None, list[int], int]]:
        """``(surviving pk, obsolete pks merged into it, version)`` of each of ``pks``
        (:meth:`links` and :meth:`version` of a whole page): two statements on one
        connection, not three and a connection per row. A search page of 50 patients
        took 150 round trips on PostgreSQL, 150-400 ms under load (issue 21)."""
        wanted = sorted({int(pk) for pk in pks})
        out: dict[int, tuple[int | None, list[int], int]] = {pk: (None, [], 1) for pk in wanted}
        if not wanted:
            return out
        ups: dict[int, int] = {}
        downs: dict[int, list[int]] = {pk: [] for pk in wanted}
        versions = dict.fromkeys(wanted, 1)
        with self.index.read() as conn:
            for obsolete, surviving in conn.execute(
                select(patient_links.c.obsolete_pk, patient_links.c.surviving_pk)
                .where(or_(patient_links.c.obsolete_pk.in_(wanted),
                           patient_links.c.surviving_pk.in_(wanted)))
                .order_by(patient_links.c.obsolete_pk)
            ):
                if int(obsolete) in downs:
                    ups[int(obsolete)] = int(surviving)
                if int(surviving) in downs:
                    downs[int(surviving)].append(int(obsolete))
            # What _version counts, for the page at once: one index range per pk.
            for pk, count in conn.execute(
                select(patient_change_patients.c.patient_pk, func.count())
                .where(patient_change_patients.c.patient_pk.in_(wanted))
                .group_by(patient_change_patients.c.patient_pk)
            ):
                versions[int(pk)] += int(count)
        return {pk: (ups.get(pk), downs[pk], versions[pk]) for pk in wanted}

    def changes(
        self, *, patient_pk: int | None = None, limit: int = 100, offset: int = 0
    ) -> list[StoredChange]:
        """The change log, newest first; with ``patient_pk``, the changes that involved
        that row (a range of the link table's key, read newest first off the index).
        Two statements: the page, then the patients of all its changes at once."""
        link = patient_change_patients
        if patient_pk is None:
            stmt = select(patient_changes).order_by(patient_changes.c.id.desc())
        else:
            stmt = (
                select(patient_changes)
                .select_from(link.join(patient_changes, patient_changes.c.id == link.c.change_pk))
                .where(link.c.patient_pk == patient_pk)
                .order_by(link.c.change_pk.desc())
            )
        with self.index.read() as conn:
            rows = conn.execute(stmt.limit(limit).offset(offset)).all()
            involved = self._involved(conn, [int(r.id) for r in rows])
        return [self._stored(r, involved.get(int(r.id), ()), with_rows=False) for r in rows]

    def change(self, change_id: str) -> StoredChange:
        with self.index.read() as conn:
            r = conn.execute(
                select(patient_changes).where(patient_changes.c.change_id == change_id)
            ).first()
            if r is None:
                raise NotFoundError("no such patient change")
            involved = self._involved(conn, [int(r.id)])
        return self._stored(r, involved.get(int(r.id), ()), with_rows=True)

    @staticmethod
    def _involved(conn: Connection, change_pks: Sequence[int]) -> dict[int, tuple[int, ...]]:
        """The patient rows each of ``change_pks`` involved, in the change's order
        (``ix_patient_change_patients_change_pk``; a page is at most 1,000 changes)."""
        out: dict[int, list[int]] = {}
        link = patient_change_patients
        for chunk in range(0, len(change_pks), 500):
            for change_pk, patient_pk in conn.execute(
                select(link.c.change_pk, link.c.patient_pk)
                .where(link.c.change_pk.in_(change_pks[chunk : chunk + 500]))
                .order_by(link.c.change_pk, link.c.position)
            ):
                out.setdefault(int(change_pk), []).append(int(patient_pk))
        return {k: tuple(v) for k, v in out.items()}

    @staticmethod
    def _stored(r: Any, patient_pks: tuple[int, ...], *, with_rows: bool) -> StoredChange:
        created = r.created_at if r.created_at.tzinfo else r.created_at.replace(tzinfo=UTC)
        return StoredChange(
            change_id=r.change_id,
            kind=r.kind,
            source=r.source,
            agent=r.agent,
            patient_pks=patient_pks,
            summary=json.loads(r.summary_json),
            undoes=r.undoes,
            undone_by=r.undone_by,
            created_at=created,
            rows=json.loads(r.rows_json) if with_rows else {},
        )

    # -- commands ---------------------------------------------------------------

    def update(
        self,
        change_id: str,
        patient_id: str,
        issuers: list[str],
        demographics: Mapping[str, str | None],
        *,
        source: str,
        agent: str,
        expected_version: int | None = None,
    ) -> tuple[StoredChange, PatientRow]:
        """Set demographics (``None``: keep); a patient seen nowhere yet is created
        (A01/A04 register, FHIR update-as-create). ``expected_version``: refuse with
        :class:`~core.errors.PreconditionFailedError` unless the row is at it."""
        now = _now()
        with self.index.write() as conn:
            plan = _Plan({}, [], None, [])
            row = self._find(conn, patient_id, issuers)
            if expected_version is not None:
                if row is None:
                    raise PreconditionFailedError("the Patient changed since that version")
                self._check_version(conn, row.pk, expected_version)
            if row is None:
                row = self._create(conn, plan, patient_id, issuers[0], demographics, now)
            else:
                after = {k: v for k, v in demographics.items() if v is not None}
                self._patient_change(conn, plan, row, after)
            plan.patient_pks.append(row.pk)
            new = self._fetch(conn, row.pk)
            self._orders_follow(conn, plan, row, new)
            stored = self._commit(conn, plan, change_id, "update", source, agent, now)
        return stored, new

    def merge(
        self,
        change_id: str,
        surviving: tuple[str, list[str]],
        obsolete: tuple[str, list[str]],
        demographics: Mapping[str, str | None] | None,
        *,
        source: str,
        agent: str,
    ) -> tuple[StoredChange, PatientRow, PatientRow | None]:
        """Everything of ``obsolete`` becomes ``surviving``'s (HL7 A40, FHIR $merge).

        The obsolete row stays (FHIR shows it inactive, replaced-by), with nothing
        left pointing at it; orders of the obsolete identifier that no index row
        holds are moved too. A surviving patient seen nowhere yet is created with
        the message's demographics, else the obsolete patient's.
        """
        now = _now()
        with self.index.write() as conn:
            plan = _Plan({}, [], None, [])
            old = self._find(conn, obsolete[0], obsolete[1])
            old_orders = self._orders_of(conn, obsolete[0], obsolete[1])
            if old is None and not old_orders:
                raise NotFoundError("the obsolete patient is unknown")
            keep = self._find(conn, surviving[0], surviving[1])
            if keep is not None and old is not None and keep.pk == old.pk:
                raise InvalidQueryError("a patient cannot be merged into itself")
            if keep is None:
                if surviving[0] == obsolete[0] and set(surviving[1]) & set(obsolete[1]):
                    raise InvalidQueryError("a patient cannot be merged into itself")
                base = {k: getattr(old, k) for k in _DEMOGRAPHICS} if old else {}
                base.update({k: v for k, v in (demographics or {}).items() if v is not None})
                keep = self._create(conn, plan, surviving[0], surviving[1][0], base, now)
            elif demographics:
                self._patient_change(
                    conn, plan, keep, {k: v for k, v in demographics.items() if v is not None}
                )
            keep = self._fetch(conn, keep.pk)
            if conn.execute(
                select(patient_links.c.obsolete_pk).where(patient_links.c.obsolete_pk == keep.pk)
            ).first():
                raise InvalidQueryError("the surviving patient was itself merged into another")
            plan.patient_pks.append(keep.pk)
            if old is not None:
                if conn.execute(
                    select(patient_links.c.obsolete_pk).where(patient_links.c.obsolete_pk == old.pk)
                ).first():
                    raise InvalidQueryError("the obsolete patient was already merged")
                plan.patient_pks.append(old.pk)
                self._move(conn, plan, old.pk, keep)
                plan.link = (old.pk, keep.pk)
                conn.execute(
                    patient_links.insert().values(
                        obsolete_pk=old.pk,
                        surviving_pk=keep.pk,
                        change_id=change_id,
                        created_at=now,
                    )
                )
                # Patients merged into the obsolete one earlier now lead to the survivor.
                plan.relinked = [
                    int(x)
                    for x in conn.execute(
                        select(patient_links.c.obsolete_pk).where(
                            patient_links.c.surviving_pk == old.pk
                        )
                    ).scalars()
                ]
                if plan.relinked:
                    conn.execute(
                        update(patient_links)
                        .where(patient_links.c.obsolete_pk.in_(plan.relinked))
                        .values(surviving_pk=keep.pk)
                    )
                conn.execute(update(patients).where(patients.c.id == old.pk).values(updated_at=now))
            self._orders_change(
                conn, plan, [(pk, before, self._order_values(keep)) for pk, before in old_orders]
            )
            stored = self._commit(conn, plan, change_id, "merge", source, agent, now)
        return stored, keep, old

    def change_identifier(
        self,
        change_id: str,
        old: tuple[str, list[str]],
        new: tuple[str, list[str]],
        *,
        new_issuer: str | None,
        source: str,
        agent: str,
        expected_version: int | None = None,
    ) -> tuple[StoredChange, PatientRow]:
        """The same patient under a new Patient ID / issuer (HL7 A47). ``new`` lists
        the issuers the new identifier may already be used under (refused: that is a
        merge: :class:`~core.errors.DuplicateError`); ``new_issuer`` None keeps the
        patient's assigning authority."""
        now = _now()
        with self.index.write() as conn:
            plan = _Plan({}, [], None, [])
            row = self._find(conn, old[0], old[1])
            old_orders = self._orders_of(conn, old[0], old[1])
            if row is None and not old_orders:
                raise NotFoundError("the patient whose identifier changes is unknown")
            if expected_version is not None:
                if row is None:
                    raise PreconditionFailedError("the Patient changed since that version")
                self._check_version(conn, row.pk, expected_version)
            if self._find(conn, new[0], new[1]) is not None:
                # HL7 Table 0357 205 "duplicate key identifier", FHIR 409 "duplicate".
                raise DuplicateError(
                    "the new identifier is already in use: that is a merge (A40), not a change"
                )
            if new_issuer is not None:
                issuer = new_issuer
            elif row is not None:
                issuer = row.issuer
            else:
                issuer = str(old_orders[0][1]["issuer"])
            new = (new[0], [issuer])
            after = {"patient_id": new[0], "issuer": issuer}
            if row is not None:
                plan.patient_pks.append(row.pk)
                self._patient_change(conn, plan, row, after)
                current = self._fetch(conn, row.pk)
                for table in (lab_results, lab_reports):
                    self._lab_follow(conn, plan, table, row.pk, current)
            else:
                current = PatientRow(0, new[0], issuer, "", "", "")
            self._orders_change(
                conn,
                plan,
                [
                    (pk, before, {**before, "patient_id": new[0], "issuer": issuer})
                    for pk, before in old_orders
                ],
            )
            stored = self._commit(conn, plan, change_id, "change-identifier", source, agent, now)
        return stored, current

    def undo(self, change_id: str, new_id: str, *, source: str, agent: str) -> StoredChange:
        """Write back every row's "before" values of ``change_id`` (see module doc)."""
        now = _now()
        with self.index.write() as conn:
            r = conn.execute(
                select(patient_changes).where(patient_changes.c.change_id == change_id)
            ).first()
            if r is None:
                raise NotFoundError("no such patient change")
            if r.undone_by:
                raise ProcedureStepStateError("the change is already undone")
            if r.kind == "undo":
                raise InvalidQueryError("an undo cannot be undone; apply the change again")
            saved = json.loads(r.rows_json)
            # The undo involves every row the change did (the link table holds them all;
            # the text column may have been cut at 255 characters).
            plan = _Plan({}, [], None, list(self._involved(conn, [int(r.id)]).get(int(r.id), ())))
            for table, rows in saved.get("rows", {}).items():
                if table == "orders":
                    pks = [int(pk) for pk, _b, _a in rows]
                    current = self._orders_patients(conn, pks)
                    changes = []
                    for pk, before, after in rows:
                        now_values = current.get(int(pk))
                        self._check(now_values, after)
                        merged = dict(now_values or {})
                        merged.update(before)
                        changes.append((int(pk), now_values or {}, merged))
                    self._orders_change(conn, plan, changes)
                    continue
                self._restore(conn, plan, table, rows, now)
            link = saved.get("link")
            if link:
                conn.execute(delete(patient_links).where(patient_links.c.obsolete_pk == link[0]))
                relinked = [int(x) for x in saved.get("relinked", [])]
                if relinked:
                    conn.execute(
                        update(patient_links)
                        .where(patient_links.c.obsolete_pk.in_(relinked))
                        .values(surviving_pk=link[0])
                    )
                conn.execute(
                    update(patients).where(patients.c.id == link[0]).values(updated_at=now)
                )
            for pk in saved.get("created", []):
                self._drop_if_unused(conn, int(pk))
            result = conn.execute(
                update(patient_changes)
                .where(
                    and_(
                        patient_changes.c.change_id == change_id, patient_changes.c.undone_by == ""
                    )
                )
                .values(undone_by=new_id)
            )
            if not result.rowcount:
                raise ProcedureStepStateError("the change is already undone")
            stored = self._commit(conn, plan, new_id, "undo", source, agent, now, undoes=change_id)
        return stored

    # -- helpers ----------------------------------------------------------------

    def _restore(
        self,
        conn: Connection,
        plan: _Plan,
        table: str,
        rows: list[Any],
        now: datetime,
    ) -> None:
        """Rows of one table back to their "before" values, one UPDATE per distinct
        (before, after) pair, each only where the row still holds "after"."""
        tbl = _TABLES[table]
        groups: dict[tuple[str, str], list[int]] = {}
        for pk, before, after in rows:
            key = (json.dumps(before, sort_keys=True), json.dumps(after, sort_keys=True))
            groups.setdefault(key, []).append(int(pk))
            plan.add(table, int(pk), after, before)
        for (before_text, after_text), pks in groups.items():
            before, after = json.loads(before_text), json.loads(after_text)
            values = dict(before)
            if table in ("patients", "studies"):
                values["updated_at"] = now
            if table == "patients" and "name" in before:
                values["name_key"] = person_name_key(before["name"])
            for chunk in range(0, len(pks), 500):
                ids = pks[chunk : chunk + 500]
                conds = [tbl.c.id.in_(ids)]
                conds += [
                    tbl.c[k].is_(None) if v is None else tbl.c[k] == v for k, v in after.items()
                ]
                done = conn.execute(update(tbl).where(and_(*conds)).values(**values)).rowcount
                if done != len(ids):
                    self._check(None, after)  # raises: rolled back with the transaction
            if table == "patients" and "name" in before:
                for pk in pks:
                    set_name_words(conn, pk, values["name_key"])

    @staticmethod
    def _check(current: Mapping[str, Any] | None, after: Mapping[str, Any]) -> None:
        if current is None or any(current.get(k) != v for k, v in after.items()):
            raise ProcedureStepStateError(
                "rows of this change were changed since; undo the later change first"
            )

    def _fetch(self, conn: Connection, pk: int) -> PatientRow:
        return self._row(conn.execute(select(patients).where(patients.c.id == pk)).one())

    def _create(
        self,
        conn: Connection,
        plan: _Plan,
        patient_id: str,
        issuer: str,
        demographics: Mapping[str, str | None],
        now: datetime,
    ) -> PatientRow:
        name = demographics.get("name") or ""
        key = person_name_key(name)
        pk = int(
            conn.execute(
                patients.insert()
                .values(
                    patient_id=patient_id[:64],
                    issuer=issuer[:64],
                    name=name[:324],
                    name_key=key,
                    birth_date=(demographics.get("birth_date") or "")[:8],
                    sex=(demographics.get("sex") or "")[:16],
                    demographics_source="record",
                    updated_at=now,
                )
                .returning(patients.c.id)
            ).scalar_one()
        )
        set_name_words(conn, pk, key)
        plan.created.append(pk)
        return self._fetch(conn, pk)

    def _patient_change(
        self, conn: Connection, plan: _Plan, row: PatientRow, after: Mapping[str, Any]
    ) -> None:
        before = {
            "patient_id": row.patient_id,
            "issuer": row.issuer,
            "name": row.name,
            "birth_date": row.birth_date,
            "sex": row.sex,
            "demographics_source": row.demographics_source,
        }
        values = {k: v for k, v in after.items() if k in before}
        if any(k in values for k in _DEMOGRAPHICS):
            values["demographics_source"] = "record"
        if "birth_date" in values:
            values["birth_date"] = (values["birth_date"] or "")[:8]
        if "sex" in values:
            values["sex"] = (values["sex"] or "")[:16]
        if "name" in values:
            values["name"] = (values["name"] or "")[:324]
        plan.add("patients", row.pk, before, values)
        changed = {k: v for k, v in values.items() if before[k] != v}
        if not changed:
            return
        if "name" in changed:
            changed["name_key"] = person_name_key(changed["name"])
        conn.execute(
            update(patients).where(patients.c.id == row.pk).values(**changed, updated_at=_now())
        )
        if "name_key" in changed:
            set_name_words(conn, row.pk, changed["name_key"])

    def _move(self, conn: Connection, plan: _Plan, old_pk: int, keep: PatientRow) -> None:
        now = _now()
        study_pks = [
            int(x)
            for x in conn.execute(
                select(studies.c.id).where(studies.c.patient_pk == old_pk)
            ).scalars()
        ]
        for pk in study_pks:
            plan.add("studies", pk, {"patient_pk": old_pk}, {"patient_pk": keep.pk})
        if study_pks:
            conn.execute(
                update(studies)
                .where(studies.c.patient_pk == old_pk)
                .values(patient_pk=keep.pk, updated_at=now)
            )
        for table in (lab_results, lab_reports):
            self._lab_follow(conn, plan, table, old_pk, keep)

    def _lab_follow(
        self, conn: Connection, plan: _Plan, table: Table, old_pk: int, keep: PatientRow
    ) -> None:
        """Lab rows of ``old_pk`` carry ``keep``'s row and identifier (what FHIR shows)."""
        name = "lab_results" if table is lab_results else "lab_reports"
        cols = [table.c.id, table.c.patient_pk, table.c.patient_id, table.c.patient_issuer]
        cond: ColumnElement[bool] = table.c.patient_pk == old_pk
        if table is lab_results:
            cols.append(table.c.conflict_patient_pk)
            cond = or_(cond, table.c.conflict_patient_pk == old_pk)
        groups: dict[tuple[str, str], list[int]] = {}
        for r in conn.execute(select(*cols).where(cond)).all():
            before = dict(r._mapping)
            pk = int(before.pop("id"))
            after = dict(before)
            if before["patient_pk"] == old_pk:
                after.update(
                    patient_pk=keep.pk, patient_id=keep.patient_id, patient_issuer=keep.issuer
                )
            if before.get("conflict_patient_pk") == old_pk:
                after["conflict_patient_pk"] = keep.pk
            plan.add(name, pk, before, after)
            changed = {k: v for k, v in after.items() if before[k] != v}
            if changed:
                groups.setdefault((json.dumps(changed, sort_keys=True), ""), []).append(pk)
        # One UPDATE per distinct change (usually one), not one per result.
        for (changed_text, _), pks in groups.items():
            changed = json.loads(changed_text)
            for chunk in range(0, len(pks), 500):
                conn.execute(
                    update(table).where(table.c.id.in_(pks[chunk : chunk + 500])).values(**changed)
                )

    def _orders_follow(
        self, conn: Connection, plan: _Plan, before: PatientRow, after: PatientRow
    ) -> None:
        values = self._order_values(after)
        found = self._orders_of(conn, before.patient_id, [before.issuer])
        self._orders_change(conn, plan, [(pk, cols, values) for pk, cols in found])

    @staticmethod
    def _order_values(p: PatientRow) -> dict[str, Any]:
        return {
            "patient_id": p.patient_id,
            "issuer": p.issuer,
            "patient_name": p.name,
            "birth_date": p.birth_date,
            "sex": p.sex,
        }

    @staticmethod
    def _orders_of(
        conn: Connection, patient_id: str, issuers: Iterable[str]
    ) -> list[tuple[int, dict[str, Any]]]:
        if not patient_id:
            return []
        rows = conn.execute(
            select(orders.c.id, *(orders.c[c] for c in _ORDER_COLS)).where(
                and_(orders.c.patient_id == patient_id, orders.c.issuer.in_(list(issuers)))
            )
        ).all()
        return [(int(r.id), {c: r._mapping[c] for c in _ORDER_COLS}) for r in rows]

    @staticmethod
    def _orders_patients(conn: Connection, pks: list[int]) -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        for chunk in range(0, len(pks), 500):
            rows = conn.execute(
                select(orders.c.id, *(orders.c[c] for c in _ORDER_COLS)).where(
                    orders.c.id.in_(pks[chunk : chunk + 500])
                )
            ).all()
            for r in rows:
                out[int(r.id)] = {c: r._mapping[c] for c in _ORDER_COLS}
        return out

    def _orders_change(
        self,
        conn: Connection,
        plan: _Plan,
        changes: Sequence[tuple[int, Mapping[str, Any], Mapping[str, Any]]],
    ) -> None:
        """New order versions whose worklist items carry the "after" patient values
        (the worklist caches items by order version, so the version must move).
        Statements are batched: one SELECT per 500 orders, one executemany each for
        the UPDATEs and the version rows."""
        todo: dict[int, dict[str, Any]] = {}
        for pk, before, after in changes:
            changed = {k: after[k] for k in _ORDER_COLS if k in after and before.get(k) != after[k]}
            if changed:
                plan.add("orders", pk, before, changed)
                todo[pk] = changed
        if not todo:
            return
        now = _now()
        updates: list[dict[str, Any]] = []
        versions: list[dict[str, Any]] = []
        pks = sorted(todo)
        for chunk in range(0, len(pks), 500):
            rows = conn.execute(
                select(
                    orders.c.id,
                    orders.c.item_json,
                    orders.c.version,
                    orders.c.status,
                    orders.c.source,
                ).where(orders.c.id.in_(pks[chunk : chunk + 500]))
            ).all()
            for r in rows:
                changed = todo[int(r.id)]
                item = json.loads(r.item_json)
                patient = item.setdefault("patient", {})
                for col, value in changed.items():
                    field = {"patient_id": "id", "patient_name": "name"}.get(col, col)
                    patient[field] = _da_to_iso(value) if col == "birth_date" else value
                text = json.dumps(item, ensure_ascii=False)
                version = int(r.version) + 1
                row = {c: changed.get(c) for c in _ORDER_COLS}
                updates.append(
                    {
                        "pk": int(r.id),
                        **{f"v_{c}": v for c, v in row.items()},
                        "b_item": text,
                        "b_version": version,
                        "b_updated": now,
                    }
                )
                versions.append(
                    {
                        "order_pk": int(r.id),
                        "version": version,
                        "status": r.status,
                        "event": "patient",
                        "source": r.source,
                        "item_json": text,
                        "changed_at": now,
                    }
                )
        # Columns not changed keep their value: COALESCE with a NULL parameter.
        stmt = (
            update(orders)
            .where(orders.c.id == bindparam("pk"))
            .values(
                {
                    **{c: func.coalesce(bindparam(f"v_{c}"), orders.c[c]) for c in _ORDER_COLS},
                    "item_json": bindparam("b_item"),
                    "version": bindparam("b_version"),
                    "updated_at": bindparam("b_updated"),
                }
            )
        )
        conn.execute(stmt, updates)
        conn.execute(order_versions.insert(), versions)

    def _drop_if_unused(self, conn: Connection, pk: int) -> None:
        """Remove a patient row an undone change created, unless something uses it now."""
        for table in (studies, lab_results, lab_reports):
            used = conn.execute(
                select(func.count()).select_from(table).where(table.c.patient_pk == pk)
            ).scalar_one()
            if used:
                return
        if conn.execute(
            select(patient_links.c.obsolete_pk).where(
                (patient_links.c.surviving_pk == pk) | (patient_links.c.obsolete_pk == pk)
            )
        ).first():
            return
        set_name_words(conn, pk, "")
        conn.execute(delete(patients).where(patients.c.id == pk))

    def _commit(
        self,
        conn: Connection,
        plan: _Plan,
        change_id: str,
        kind: str,
        source: str,
        agent: str,
        now: datetime,
        *,
        undoes: str = "",
    ) -> StoredChange:
        # The re-pointed obsolete rows of a merge are involved too: their FHIR
        # Patient.link (replaced-by) changed, so their version must move (If-Match).
        pks = list(dict.fromkeys(plan.patient_pks + plan.created + plan.relinked))
        summary = {
            "studies": plan.count("studies"),
            "orders": plan.count("orders"),
            "lab_results": plan.count("lab_results"),
            "lab_reports": plan.count("lab_reports"),
            "patients": plan.count("patients"),
            "created": len(plan.created),
            "fields": sorted(
                {
                    k
                    for _, _, after in plan.rows.get("patients", [])
                    for k in after
                    if k != "demographics_source"
                }
            ),
        }
        rows = {
            "rows": plan.rows,
            "created": plan.created,
            "link": plan.link,
            "relinked": plan.relinked,
        }
        change_pk = conn.execute(
            patient_changes.insert()
            .values(
                change_id=change_id,
                kind=kind,
                source=source[:16],
                agent=agent[:128],
                # Display and older readers only: cut at 255, so nothing reads it back.
                patient_pks=("," + ",".join(str(p) for p in pks) + ",")[:255],
                summary_json=json.dumps(summary),
                rows_json=json.dumps(rows, ensure_ascii=False),
                undoes=undoes,
                created_at=now,
            )
            .returning(patient_changes.c.id)
        ).scalar_one()
        if pks:  # every one, in the same transaction as the change (issue 21)
            conn.execute(
                patient_change_patients.insert(),
                [
                    {"change_pk": change_pk, "patient_pk": pk, "position": i}
                    for i, pk in enumerate(pks)
                ],
            )
        return StoredChange(
            change_id, kind, source, agent, tuple(pks), summary, undoes, "", now, rows
        )
