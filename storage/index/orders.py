"""Orders, scheduled steps, MPPS and study links in the SQL index (SQLite and PostgreSQL).

Three classes over one :class:`~storage.index.sql.SqlIndex` (same engine, same
write queue):

* :class:`SqlOrderStore`: orders with every version kept, scheduled steps, study
  links (reconciliation) and the change feed. Decisions (what an NW/XO/CA or an MPPS
  means for an order) are made by :class:`services.orders.OrderService`; this module
  only reads and writes rows, with compare-and-set on the order's version.
* :class:`SqlWorklistSource`: the ``worklist.ports.WorklistSource`` protocol. The
  ``worklist.ports.CandidateFilter`` maps onto the ``scheduled_steps`` indexes
  (station/modality, start) and the ``orders`` indexes (Accession Number, Patient
  ID); the matcher in ``worklist/query.py`` has the last word (PS3.4 C.2.2.2).
* :class:`SqlMppsRepository`: the ``worklist.ports.MppsRepository`` protocol
  (PS3.4 F.7). It stores the attribute list as DICOM JSON (PS3.18 F.2) and rebuilds
  steps with the ``restore`` callable it is given, because the step type belongs to
  ``worklist`` (a layer above; STYLE.md §1) and is only imported for type checking.

Database errors that mean "cannot serve now" become
:class:`~core.errors.OutOfResourcesError` (C-FIND/N-CREATE answer 0xA700).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydicom.dataset import Dataset
from sqlalchemy import Connection, and_, func, or_, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from core.errors import DuplicateError, OutOfResourcesError, ProcedureStepStateError
from core.orders import (
    OrderRecord,
    OrderStatus,
    WorklistItem,
    item_from_json,
    item_to_json,
)
from core.person_name import person_name_key
from storage.index.queries import bounded_count
from storage.index.schema import (
    jobs,
    mpps,
    order_versions,
    orders,
    patients,
    scheduled_steps,
    studies,
    study_links,
)
from storage.index.sql import set_name_words
from storage.index.sqlite import read_only

if TYPE_CHECKING:
    from storage.index.sql import SqlIndex

__all__ = [
    "OrderVersion",
    "SqlMppsRepository",
    "SqlOrderStore",
    "SqlWorklistSource",
    "StudyLink",
]

logger = logging.getLogger(__name__)


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime) -> datetime:
    # SQLite hands back naive datetimes even for timezone=True columns; we store UTC.
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _unavailable(exc: Exception) -> OutOfResourcesError:
    orig = getattr(exc, "orig", None)
    logger.error("order index access failed: %s", type(orig).__name__ if orig else exc)
    return OutOfResourcesError("index unavailable")


@dataclass(frozen=True, slots=True)
class OrderVersion:
    """One kept version of an order (its history, and the change feed)."""

    version: int
    status: OrderStatus
    event: str
    source: str
    item: WorklistItem
    changed_at: datetime


@dataclass(frozen=True, slots=True)
class StudyLink:
    """What reconciliation decided for one received study.

    ``order_id`` is empty while the study is unmatched. ``original`` holds the
    modality's values that the order's replaced (patient and accession number).
    """

    study_instance_uid: str
    order_id: str
    matched_by: str
    accession_number: str
    requested_procedure_id: str
    original: dict[str, Any]
    first_seen_at: datetime
    linked_at: datetime | None


def _record(row: Any) -> OrderRecord:
    return OrderRecord(
        id=row.public_id,
        placer_order_number=row.placer_order_number,
        filler_order_number=row.filler_order_number,
        item=item_from_json(json.loads(row.item_json)),
        status=OrderStatus(row.status),
        version=row.version,
        source=row.source,
        created_at=_aware(row.created_at),
        updated_at=_aware(row.updated_at),
        linked_study_uid=row.linked_study_uid,
    )


def _order_columns(item: WorklistItem) -> dict[str, Any]:
    p, o = item.patient, item.order
    return {
        "accession_number": o.accession_number or None,
        "requested_procedure_id": o.requested_procedure_id[:16],
        "study_instance_uid": o.study_instance_uid or None,
        "patient_id": p.id[:64],
        "issuer": p.issuer[:64],
        "patient_name": p.name[:324],
        "birth_date": p.birth_date.strftime("%Y%m%d") if p.birth_date else "",
        "sex": p.sex[:16],
        "item_json": json.dumps(item_to_json(item), ensure_ascii=False),
    }


def _step_rows(order_pk: int, item: WorklistItem) -> list[dict[str, Any]]:
    return [
        {
            "order_pk": order_pk,
            "step_id": s.step_id,
            "station_ae_title": s.station_ae_title,
            "modality": s.modality,
            "start_at": s.start.replace(tzinfo=None),
            "status": str(s.status),
        }
        for s in item.steps
    ]


class SqlOrderStore:
    """Rows of ``orders``, ``order_versions``, ``scheduled_steps`` and ``study_links``.

    Parameters
    ----------
    index : SqlIndex
        The index whose engine and write queue this store shares.
    webhook : bool
        Queue a ``webhook`` job (in the same transaction) for every new version, so
        a status change is never lost between the commit and the POST.
    """

    def __init__(self, index: SqlIndex, *, webhook: bool = False) -> None:
        self.index = index
        self.engine = index.engine
        self.webhook = webhook

    # -- reads ------------------------------------------------------------------

    def find(
        self,
        *,
        public_id: str | None = None,
        placer: str | None = None,
        accession: str | None = None,
        study_uid: str | None = None,
        procedure_id: str | None = None,
    ) -> OrderRecord | None:
        """The order with the first given key, or None."""
        if public_id is not None:
            cond = orders.c.public_id == public_id
        elif placer is not None:
            cond = orders.c.placer_order_number == placer
        elif accession is not None:
            cond = orders.c.accession_number == accession
        elif study_uid is not None:
            cond = orders.c.study_instance_uid == study_uid
        elif procedure_id is not None:
            cond = orders.c.requested_procedure_id == procedure_id
        else:
            raise TypeError("find() needs one key")
        try:
            with read_only(self.engine) as conn:
                row = conn.execute(select(orders).where(cond).order_by(orders.c.id)).first()
        except (OperationalError, DBAPIError) as exc:
            raise _unavailable(exc) from exc
        return None if row is None else _record(row)

    def search(
        self,
        *,
        status: Sequence[OrderStatus] = (),
        updated_from: datetime | None = None,
        updated_before: datetime | None = None,
        identifier: str | None = None,
        patient_id: str | None = None,
        issuer: str | None = None,
        public_ids: Sequence[str] = (),
        created_from: datetime | None = None,
        created_before: datetime | None = None,
        limit: int = 100,
        offset: int = 0,
        order: str = "updated",
    ) -> list[OrderRecord]:
        """Orders by status, last update (FHIR ``_lastUpdated``), creation (FHIR
        ``authored``), identifier, patient (ID and issuer) and public id.

        ``order="updated"``: oldest change first (then the row id), the change feed;
        ``order="id"``: creation order, a unique key that updates do not move, so a
        pager sees every order once.
        """
        conds = self._conditions(
            status=status, updated_from=updated_from, updated_before=updated_before,
            identifier=identifier, patient_id=patient_id, issuer=issuer,
            public_ids=public_ids, created_from=created_from, created_before=created_before,
        )
        query = (
            select(orders)
            .where(and_(True, *conds))
            .order_by(*((orders.c.id,) if order == "id" else (orders.c.updated_at, orders.c.id)))
            .limit(limit)
            .offset(offset)
        )
        with read_only(self.engine) as conn:
            return [_record(r) for r in conn.execute(query)]

    def count(self, at_most: int | None = None, **criteria: Any) -> int:
        """How many orders :meth:`search` with these criteria (no paging) finds, counted
        no further than ``at_most + 1`` when given (FHIR ``_total``)."""
        conds = self._conditions(**criteria)
        query = bounded_count(select(orders.c.id).where(and_(True, *conds)), at_most)
        with read_only(self.engine) as conn:
            return int(conn.execute(query).scalar_one())

    @staticmethod
    def _conditions(
        *,
        status: Sequence[OrderStatus] = (),
        updated_from: datetime | None = None,
        updated_before: datetime | None = None,
        identifier: str | None = None,
        patient_id: str | None = None,
        issuer: str | None = None,
        public_ids: Sequence[str] = (),
        created_from: datetime | None = None,
        created_before: datetime | None = None,
    ) -> list[Any]:
        conds: list[Any] = []
        if status:
            conds.append(orders.c.status.in_([str(s) for s in status]))
        if updated_from is not None:
            conds.append(orders.c.updated_at >= updated_from)
        if updated_before is not None:
            conds.append(orders.c.updated_at < updated_before)
        if created_from is not None:
            conds.append(orders.c.created_at >= created_from)
        if created_before is not None:
            conds.append(orders.c.created_at < created_before)
        if identifier is not None:
            conds.append(
                or_(
                    orders.c.placer_order_number == identifier,
                    orders.c.filler_order_number == identifier,
                    orders.c.accession_number == identifier,
                    orders.c.public_id == identifier,
                )
            )
        if patient_id is not None:
            conds.append(orders.c.patient_id == patient_id)
        if issuer is not None:
            conds.append(orders.c.issuer == issuer)
        if public_ids:
            conds.append(orders.c.public_id.in_(list(public_ids)))
        return conds

    def history(self, public_id: str) -> list[OrderVersion]:
        """Every kept version of the order, oldest first."""
        query = (
            select(order_versions)
            .join(orders, orders.c.id == order_versions.c.order_pk)
            .where(orders.c.public_id == public_id)
            .order_by(order_versions.c.version)
        )
        with read_only(self.engine) as conn:
            return [
                OrderVersion(
                    version=r.version,
                    status=OrderStatus(r.status),
                    event=r.event,
                    source=r.source,
                    item=item_from_json(json.loads(r.item_json)),
                    changed_at=_aware(r.changed_at),
                )
                for r in conn.execute(query)
            ]

    # -- writes -----------------------------------------------------------------

    def _version_row(
        self, conn: Connection, order_pk: int, public_id: str, values: dict[str, Any], event: str
    ) -> None:
        conn.execute(
            order_versions.insert().values(
                order_pk=order_pk,
                version=values["version"],
                status=values["status"],
                event=event,
                source=values.get("source", ""),
                item_json=values["item_json"],
                changed_at=values["updated_at"],
            )
        )
        if self.webhook:
            now = values["updated_at"]
            conn.execute(
                jobs.insert().values(
                    kind="webhook",
                    target=f"{public_id}:{values['version']}",
                    status="pending",
                    created_at=now,
                    updated_at=now,
                )
            )

    def create(
        self,
        *,
        public_id: str,
        placer: str,
        filler: str,
        source: str,
        build: Callable[[int], WorklistItem],
        status: Callable[[WorklistItem], OrderStatus],
        event: str = "placed",
    ) -> OrderRecord:
        """Insert a new order; ``build(pk)`` makes its item once the row has a key.

        The key lets the caller derive unique identifiers (Accession Number,
        Requested Procedure ID) without a separate counter.

        Raises
        ------
        DuplicateError
            The public id, placer number, Accession Number or Study Instance UID is
            taken (a concurrent create of the same order, or a caller's value).
        """
        now = _now()
        try:
            with self.index.write() as conn:
                if placer:
                    taken = conn.execute(
                        select(orders.c.id).where(orders.c.placer_order_number == placer)
                    ).first()
                    if taken is not None:
                        raise DuplicateError(f"order {placer} exists")
                pk = int(
                    conn.execute(
                        orders.insert()
                        .values(
                            public_id=public_id,
                            placer_order_number=placer[:64],
                            filler_order_number=filler[:64],
                            status=str(OrderStatus.SCHEDULED),
                            version=1,
                            source=source[:16],
                            item_json="{}",
                            created_at=now,
                            updated_at=now,
                        )
                        .returning(orders.c.id)
                    ).scalar_one()
                )
                item = build(pk)
                values = {
                    **_order_columns(item),
                    "status": str(status(item)),
                    "version": 1,
                    "source": source[:16],
                    "updated_at": now,
                }
                conn.execute(update(orders).where(orders.c.id == pk).values(**values))
                conn.execute(scheduled_steps.insert(), _step_rows(pk, item))
                self._version_row(conn, pk, public_id, values, event)
                row = conn.execute(select(orders).where(orders.c.id == pk)).one()
        except IntegrityError as exc:
            raise DuplicateError("order identifiers already in use") from exc
        except (OperationalError, DBAPIError) as exc:
            raise _unavailable(exc) from exc
        return _record(row)

    def update(
        self,
        before: OrderRecord,
        item: WorklistItem,
        status: OrderStatus,
        *,
        event: str,
        source: str = "",
        linked_study_uid: str | None = None,
        filler: str | None = None,
    ) -> OrderRecord:
        """Write a new version of ``before`` (compare-and-set on its version).

        Raises
        ------
        ProcedureStepStateError
            The order changed since ``before`` was read (the caller may retry).
        """
        now = _now()
        values: dict[str, Any] = {
            **_order_columns(item),
            "status": str(status),
            "version": before.version + 1,
            "source": (source or before.source)[:16],
            "updated_at": now,
        }
        if linked_study_uid is not None:
            values["linked_study_uid"] = linked_study_uid
        if filler is not None:
            values["filler_order_number"] = filler[:64]
        try:
            with self.index.write() as conn:
                pk = conn.execute(
                    select(orders.c.id).where(
                        and_(orders.c.public_id == before.id, orders.c.version == before.version)
                    )
                ).scalar()
                if pk is None:
                    raise ProcedureStepStateError(f"order {before.id} changed concurrently")
                conn.execute(update(orders).where(orders.c.id == pk).values(**values))
                self._sync_steps(conn, int(pk), item)
                self._version_row(conn, int(pk), before.id, values, event)
                row = conn.execute(select(orders).where(orders.c.id == pk)).one()
        except IntegrityError as exc:
            raise DuplicateError("order identifiers already in use") from exc
        except (OperationalError, DBAPIError) as exc:
            raise _unavailable(exc) from exc
        return _record(row)

    @staticmethod
    def _sync_steps(conn: Connection, pk: int, item: WorklistItem) -> None:
        current = {
            r.step_id: r
            for r in conn.execute(select(scheduled_steps).where(scheduled_steps.c.order_pk == pk))
        }
        wanted = {row["step_id"]: row for row in _step_rows(pk, item)}
        gone = [current[k].id for k in current.keys() - wanted.keys()]
        if gone:
            conn.execute(scheduled_steps.delete().where(scheduled_steps.c.id.in_(gone)))
        for step_id, row in wanted.items():
            old = current.get(step_id)
            if old is None:
                conn.execute(scheduled_steps.insert().values(**row))
            elif (old.station_ae_title, old.modality, old.start_at, old.status) != (
                row["station_ae_title"],
                row["modality"],
                row["start_at"],
                row["status"],
            ):
                conn.execute(
                    update(scheduled_steps).where(scheduled_steps.c.id == old.id).values(**row)
                )

    # -- reconciliation ---------------------------------------------------------

    def get_link(self, study_uid: str) -> StudyLink | None:
        query = (
            select(study_links, orders.c.public_id)
            .select_from(study_links.outerjoin(orders, orders.c.id == study_links.c.order_pk))
            .where(study_links.c.study_instance_uid == study_uid)
        )
        with read_only(self.engine) as conn:
            row = conn.execute(query).first()
        return None if row is None else self._link(row)

    @staticmethod
    def _link(row: Any) -> StudyLink:
        return StudyLink(
            study_instance_uid=row.study_instance_uid,
            order_id=row.public_id or "",
            matched_by=row.matched_by,
            accession_number=row.accession_number,
            requested_procedure_id=row.requested_procedure_id,
            original=json.loads(row.original_json or "{}"),
            first_seen_at=_aware(row.first_seen_at),
            linked_at=_aware(row.linked_at) if row.linked_at else None,
        )

    def unmatched(self, *, limit: int = 100, offset: int = 0) -> list[StudyLink]:
        """Received studies that no order claims, oldest first."""
        query = (
            select(study_links, orders.c.public_id)
            .select_from(study_links.outerjoin(orders, orders.c.id == study_links.c.order_pk))
            .where(study_links.c.order_pk.is_(None))
            .order_by(study_links.c.first_seen_at, study_links.c.id)
            .limit(limit)
            .offset(offset)
        )
        with read_only(self.engine) as conn:
            return [self._link(r) for r in conn.execute(query)]

    def record_link(
        self,
        study_uid: str,
        *,
        accession: str,
        procedure_id: str,
        order: OrderRecord | None,
        matched_by: str,
        original: dict[str, Any],
    ) -> bool:
        """Insert the study's link row, or set its order if it is still unmatched.

        Returns False when another worker already linked the study (nothing done).
        """
        now = _now()
        order_pk: Any = None
        with self.index.write() as conn:
            if order is not None:
                order_pk = conn.execute(
                    select(orders.c.id).where(orders.c.public_id == order.id)
                ).scalar_one()
            existing = conn.execute(
                select(study_links.c.id, study_links.c.order_pk).where(
                    study_links.c.study_instance_uid == study_uid
                )
            ).first()
            values = {
                "order_pk": order_pk,
                "matched_by": matched_by,
                "original_json": json.dumps(original, ensure_ascii=False),
                "linked_at": now if order_pk is not None else None,
            }
            if existing is None:
                conn.execute(
                    study_links.insert().values(
                        study_instance_uid=study_uid,
                        accession_number=accession[:16],
                        requested_procedure_id=procedure_id[:16],
                        first_seen_at=now,
                        **values,
                    )
                )
                return True
            if existing.order_pk is not None or order_pk is None:
                return False
            conn.execute(
                update(study_links).where(study_links.c.id == existing.id).values(**values)
            )
            return True

    def adopt_patient(self, study_uid: str, item: WorklistItem) -> dict[str, Any]:
        """Make the study belong to the order's patient; return the values it had.

        The index's study row moves to the patient row of the order's Patient ID and
        issuer (created or updated with the order's name, birth date and sex), and
        takes the order's Accession Number. The stored originals are untouched.
        """
        p = item.patient
        now = _now()
        with self.index.write() as conn:
            row = conn.execute(
                select(
                    studies.c.id,
                    studies.c.accession_number,
                    patients.c.patient_id,
                    patients.c.issuer,
                    patients.c.name,
                    patients.c.birth_date,
                    patients.c.sex,
                )
                .select_from(studies.join(patients, patients.c.id == studies.c.patient_pk))
                .where(studies.c.study_instance_uid == study_uid)
            ).first()
            if row is None:
                return {}
            original = {
                "patient_id": row.patient_id,
                "issuer": row.issuer,
                "patient_name": row.name,
                "birth_date": row.birth_date,
                "sex": row.sex,
                "accession_number": row.accession_number,
            }
            stmt = self.index._upsert(patients).values(
                patient_id=p.id,
                issuer=p.issuer,
                name=p.name,
                name_key=person_name_key(p.name),
                birth_date=p.birth_date.strftime("%Y%m%d") if p.birth_date else "",
                sex=p.sex[:16],
                updated_at=now,
            )
            stmt = stmt.on_conflict_do_update(
                index_elements=["patient_id", "issuer"],
                set_={
                    k: stmt.excluded[k]
                    for k in ("name", "name_key", "birth_date", "sex", "updated_at")
                },
            ).returning(patients.c.id)
            patient_pk = conn.execute(stmt).scalar_one()
            set_name_words(conn, patient_pk, person_name_key(p.name))
            conn.execute(
                update(studies)
                .where(studies.c.id == row.id)
                .values(
                    patient_pk=patient_pk,
                    accession_number=item.order.accession_number[:16],
                    updated_at=now,
                )
            )
        return original

    def study_patient(self, study_uid: str) -> dict[str, str]:
        """Patient and accession values the index holds for a study (empty if unknown)."""
        with read_only(self.engine) as conn:
            row = conn.execute(
                select(
                    studies.c.accession_number,
                    patients.c.patient_id,
                    patients.c.issuer,
                    patients.c.name,
                    patients.c.birth_date,
                    patients.c.sex,
                )
                .select_from(studies.join(patients, patients.c.id == studies.c.patient_pk))
                .where(studies.c.study_instance_uid == study_uid)
            ).first()
        if row is None:
            return {}
        return {
            "patient_id": row.patient_id,
            "issuer": row.issuer,
            "patient_name": row.name,
            "birth_date": row.birth_date,
            "sex": row.sex,
            "accession_number": row.accession_number,
        }


class SqlWorklistSource:
    """``worklist.ports.WorklistSource`` over the ``scheduled_steps`` index.

    One query per C-FIND selects the orders with a step on offer that satisfies the
    filter (station, modality, start date, status on ``scheduled_steps``; Accession
    Number and Patient ID on ``orders``), ordered by their first such step. It reads
    only keys and versions: parsed items are cached by (order, version), and the
    JSON of the orders not cached yet is read in a second query, so modalities
    polling the same day move and parse no order twice.
    """

    def __init__(self, index: SqlIndex, *, cache_size: int = 20_000) -> None:
        self.engine = index.engine
        self._cache: dict[tuple[int, int], WorklistItem] = {}
        self._cache_size = cache_size
        self._lock = threading.Lock()

    @staticmethod
    def _conditions(flt: Any) -> list[Any]:
        s = scheduled_steps
        # Sorted: the same filter gives the same SQL text (and statement cache entry).
        conds: list[Any] = [s.c.status.in_(sorted(str(x) for x in flt.statuses))]
        if flt.station_ae_title is not None:
            conds.append(s.c.station_ae_title == flt.station_ae_title)
        if flt.modality is not None:
            conds.append(s.c.modality == flt.modality)
        if flt.start_from is not None:
            conds.append(s.c.start_at >= datetime.combine(flt.start_from, time.min))
        if flt.start_until is not None:
            until: date = flt.start_until
            conds.append(s.c.start_at < datetime.combine(until + timedelta(days=1), time.min))
        if flt.accession_numbers is not None:
            conds.append(orders.c.accession_number.in_(sorted(flt.accession_numbers)))
        if flt.patient_ids is not None:
            # The column keeps 64 characters (LO); a longer value can only match there.
            conds.append(orders.c.patient_id.in_(sorted({v[:64] for v in flt.patient_ids})))
        return conds

    def candidates(self, flt: Any) -> Iterator[WorklistItem]:
        """Items with a step that satisfies ``flt`` (a ``worklist.ports.CandidateFilter``)."""
        s = scheduled_steps
        query = (
            select(orders.c.id, orders.c.version)
            .select_from(s.join(orders, orders.c.id == s.c.order_pk))
            .where(and_(*self._conditions(flt)))
            .group_by(orders.c.id, orders.c.version)
            .order_by(func.min(s.c.start_at), orders.c.id)
        )
        try:
            with read_only(self.engine) as conn:
                keys = [(int(r.id), int(r.version)) for r in conn.execute(query)]
                found = {key: self._cache.get(key) for key in keys}
                missing = [pk for (pk, _), item in found.items() if item is None]
                for chunk in range(0, len(missing), 500):
                    rows = conn.execute(
                        select(orders.c.id, orders.c.version, orders.c.item_json).where(
                            orders.c.id.in_(missing[chunk : chunk + 500])
                        )
                    )
                    for row in rows:
                        self._remember(found, int(row.id), int(row.version), row.item_json)
        except (OperationalError, DBAPIError) as exc:
            raise _unavailable(exc) from exc
        for pk, version in keys:
            item = found.get((pk, version))
            if item is None:
                # Changed between the two reads: the newer version, if we have it.
                item = next((v for (p, _), v in found.items() if p == pk and v), None)
            if item is not None:
                yield item

    def _remember(
        self, found: dict[tuple[int, int], WorklistItem | None], pk: int, version: int, raw: str
    ) -> None:
        key = (pk, version)
        item = item_from_json(json.loads(raw))
        found[key] = item
        with self._lock:
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[key] = item


T = TypeVar("T")


class SqlMppsRepository(Generic[T]):
    """``worklist.ports.MppsRepository`` in the ``mpps`` table, with compare-and-set saves.

    Parameters
    ----------
    index : SqlIndex
        The index whose engine and write queue this repository shares.
    restore : callable
        ``restore(sop_instance_uid, status, attributes, version)`` rebuilds a step
        (``worklist.mpps.restore_step``); saved steps need ``sop_instance_uid``,
        ``status``, ``attributes`` (a pydicom Dataset) and ``version``.
    """

    def __init__(self, index: SqlIndex, restore: Callable[[str, str, Dataset, int], T]) -> None:
        self.index = index
        self.engine = index.engine
        self.restore = restore

    def get(self, sop_instance_uid: str) -> T | None:
        try:
            with read_only(self.engine) as conn:
                row = conn.execute(
                    select(mpps.c.status, mpps.c.version, mpps.c.attributes_json).where(
                        mpps.c.sop_instance_uid == sop_instance_uid
                    )
                ).first()
        except (OperationalError, DBAPIError) as exc:
            raise _unavailable(exc) from exc
        if row is None:
            return None
        attributes = Dataset.from_json(row.attributes_json)
        return self.restore(sop_instance_uid, row.status, attributes, int(row.version))

    def save(self, step: Any) -> None:
        uid = str(step.sop_instance_uid)
        now = _now()
        body = json.dumps(step.attributes.to_json_dict(), ensure_ascii=False)
        try:
            with self.index.write() as conn:
                if step.version == 1:
                    try:
                        conn.execute(
                            mpps.insert().values(
                                sop_instance_uid=uid,
                                status=str(step.status),
                                version=1,
                                attributes_json=body,
                                created_at=now,
                                updated_at=now,
                            )
                        )
                    except IntegrityError as exc:
                        raise DuplicateError(f"MPPS {uid} exists") from exc
                    return
                result = conn.execute(
                    update(mpps)
                    .where(and_(mpps.c.sop_instance_uid == uid, mpps.c.version == step.version - 1))
                    .values(
                        status=str(step.status),
                        version=step.version,
                        attributes_json=body,
                        updated_at=now,
                    )
                )
                if not result.rowcount:
                    raise ProcedureStepStateError(f"MPPS {uid} changed concurrently")
        except (OperationalError, DBAPIError) as exc:
            if isinstance(exc, IntegrityError):
                raise DuplicateError(f"MPPS {uid} exists") from exc
            raise _unavailable(exc) from exc
