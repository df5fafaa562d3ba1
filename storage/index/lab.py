"""Lab results in the SQL index (tables ``lab_files``, ``lab_reports``, ``lab_results``).

:class:`SqlLabStore` implements :class:`storage.lab.LabResultStore` on the engine of
a :class:`~storage.index.sql.SqlIndex`, sharing its write queue (SQLite's ``flock``
+ ``BEGIN IMMEDIATE``, see ``sqlite.py``), so lab ingest and DICOM ingest never
fight for the lock.

Crash safety of the inbox rests on one rule: a file's hash is journaled in the same
transaction as its results (:meth:`SqlLabStore.ingest_file`). Either both are
committed or neither is; a file that is still in the inbox after a crash is then
either unknown (ingest it) or journaled (only move it).

Versions: for each incoming result the current row of its ``observation_id`` (if
any) stops being current and the new row gets ``version + 1`` and ``supersedes_pk``
(FHIR R4 §3.1.0.1.5 ``_history``; HL7 v2.5.1 OBX-11 ``C`` corrections). Rows are
never updated in place except for ``is_current``, order links and review states.

Patients: each result's patient (Patient ID + issuer) is a row of the ``patients``
table imaging uses (unique ``(patient_id, issuer)``), so the FHIR ``Patient/<pk>`` of
a lab result is the one of the same patient's images. A new row takes the lab
message's demographics; an existing row is never changed by a lab message (identity
changes are explicit and audited elsewhere).

Identity includes the patient: a result whose series (specimen + test) or group
(order / specimen) already belongs to *another* patient is never a new version of
that patient's result. It is stored as a series of its own (``observation_id``
derived from the series and the patient), with ``review = "conflict"``: held, listed
by :meth:`SqlLabStore.conflicts`, until :meth:`SqlLabStore.resolve` accepts or
discards it. A result without a patient (many analyzers send only the barcode)
continues the series as before.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Select,
    and_,
    false,
    func,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from core.errors import DuplicateError, InvalidQueryError, NotFoundError, OutOfResourcesError
from storage.index.pir_tables import patient_links
from storage.index.queries import bounded_count, total_from_page
from storage.index.schema import lab_files, lab_reports, lab_results, orders, patients
from storage.index.sql import SqlIndex
from storage.index.sqlite import read_only
from storage.lab import (
    REVIEW_CHOICES,
    DateBound,
    LabFileState,
    LabIngestOutcome,
    LabReportQuery,
    LabResolution,
    LabResultQuery,
    NewLabFile,
    NewLabReport,
    NewLabResult,
    OrderLookup,
    StoredLabReport,
    StoredLabResult,
    report_status,
)

__all__ = ["SqlLabStore"]

logger = logging.getLogger(__name__)


def _now() -> datetime:
    return datetime.now(UTC)


def _utc(value: datetime | None) -> datetime | None:
    """Store and compare instants in UTC: SQLite keeps no offset, so mixing zones
    in one column would compare wrongly. Naive values are taken as UTC already."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def held_id(series_id: str, issuer: str, patient_id: str) -> str:
    """The id of a series held for another patient: the series plus the patient.

    A FHIR id (R4 §2.24.0.1, 32 hex digits), stable across re-sends, so a second
    result for the same specimen, test and (other) patient continues the held series.
    """
    key = f"{series_id}|patient|{issuer}|{patient_id}"
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]


def _fhir_birth_date(value: str) -> str:
    """ISO ``YYYY-MM-DD`` (as lab results keep it) to DICOM DA ``YYYYMMDD`` (``patients``)."""
    digits = value.replace("-", "")
    return digits if len(digits) == 8 and digits.isdigit() else ""


def _person_name(name: str) -> str:
    """HL7 XPN / ASTM P.6 (family^given^middle^suffix^prefix) as a DICOM PN
    (family^given^middle^prefix^suffix, PS3.5 6.2), the form ``patients.name`` keeps."""
    parts = name.split("^")[:5]
    if len(parts) >= 4:
        parts = [*parts[:3], parts[4] if len(parts) > 4 else "", parts[3]]
    return "^".join(parts).rstrip("^")


def _find_order(conn: Connection, report: NewLabReport, issuer: str) -> str:
    """``ServiceRequest/<id>`` of the order this group answers, or ``""``.

    The order must carry the group's placer (HL7 OBR-2/ORC-2) or filler (OBR-3)
    order number *and* be for the same patient: Patient ID, and the same issuer
    unless the order names none. An order number alone could be another patient's.
    """
    numbers = []
    if report.placer_order_id:
        numbers.append(orders.c.placer_order_number == report.placer_order_id)
    if report.filler_order_id:
        numbers.append(orders.c.filler_order_number == report.filler_order_id)
    if not numbers or not report.patient_id:
        return ""
    public_id = conn.execute(
        select(orders.c.public_id)
        .where(
            and_(
                or_(*numbers),
                orders.c.patient_id == report.patient_id,
                or_(orders.c.issuer == issuer, orders.c.issuer == ""),
            )
        )
        .order_by(orders.c.id)
        .limit(1)
    ).scalar_one_or_none()
    return f"ServiceRequest/{public_id}" if public_id else ""


def _refresh_report_status(conn: Connection, report_pks: list[int]) -> None:
    """Store each group's DiagnosticReport.status (:func:`storage.lab.report_status`)."""
    if not report_pks:
        return
    c = lab_results.c
    rows = conn.execute(
        select(c.report_pk, c.status, c.review).where(
            and_(c.report_pk.in_(set(report_pks)), c.is_current == true())
        )
    ).all()
    found: dict[int, list[tuple[str, str]]] = {pk: [] for pk in report_pks}
    for row in rows:
        found[row.report_pk].append((row.status, row.review))
    for pk, members in found.items():
        status = report_status(
            (s for s, _ in members), held=any(r == "conflict" for _, r in members)
        )
        conn.execute(update(lab_reports).where(lab_reports.c.id == pk).values(status=status))


def _latest(conn: Connection, observation_id: str) -> Any:
    """The newest version of a series (``id``, ``version``, ``is_current``, ``review``,
    ``patient_pk``), or ``None``."""
    c = lab_results.c
    return conn.execute(
        select(c.id, c.version, c.is_current, c.review, c.patient_pk)
        .where(c.observation_id == observation_id)
        .order_by(c.version.desc())
        .limit(1)
    ).first()


def _linkable(conn: Connection, report_pks: list[int], order_ref: str) -> list[int]:
    """The groups that may take ``order_ref``: never a held group (its patient is in
    question), and for one of our orders (``ServiceRequest/<id>``) only groups of the
    order's patient (Patient ID, and issuer unless the order names none)."""
    if not report_pks:
        return []
    r = lab_reports.c
    held = (
        select(lab_results.c.id)
        .where(
            and_(
                lab_results.c.report_pk == r.id,
                lab_results.c.is_current == true(),
                lab_results.c.review == "conflict",
            )
        )
        .exists()
    )
    cond: list[ColumnElement[bool]] = [r.id.in_(report_pks), ~held]
    if order_ref.startswith("ServiceRequest/"):
        order = conn.execute(
            select(orders.c.patient_id, orders.c.issuer).where(
                orders.c.public_id == order_ref.removeprefix("ServiceRequest/")
            )
        ).first()
        if order is not None:
            cond.append(r.patient_id == order.patient_id)
            if order.issuer:
                cond.append(r.patient_issuer == order.issuer)
    return list(conn.execute(select(r.id).where(and_(*cond))).scalars())


class SqlLabStore:
    """:class:`storage.lab.LabResultStore` over the index database.

    Parameters
    ----------
    index : SqlIndex
        Its engine and write queue are shared; its schema must be at head.
    default_issuer : str
        Issuer of Patient IDs that come without one (ASTM, exports, HL7 without
        PID-3.4): the hospital's own assigning authority (``lab.patient_issuer``).
    """

    def __init__(self, index: SqlIndex, *, default_issuer: str = "") -> None:
        self.index = index
        self.engine = index.engine
        self.default_issuer = default_issuer

    # -- journal -------------------------------------------------------------

    def file_state(self, sha256: str) -> LabFileState | None:
        with read_only(self.engine) as conn:
            row = conn.execute(select(lab_files).where(lab_files.c.sha256 == sha256)).first()
        if row is None:
            return None
        return LabFileState(
            sha256=row.sha256,
            name=row.name,
            profile=row.profile,
            status=row.status,
            result_count=row.result_count,
            duplicates=row.duplicates,
            summary_json=row.summary_json,
        )

    def unfiled(self, profile: str) -> list[LabFileState]:
        """Journal entries of ``profile`` committed but not yet marked filed."""
        with read_only(self.engine) as conn:
            rows = conn.execute(
                select(lab_files.c.sha256).where(
                    and_(lab_files.c.profile == profile, lab_files.c.status == "ingested")
                )
            ).all()
        states = [self.file_state(row.sha256) for row in rows]
        return [s for s in states if s is not None]

    def mark_filed(self, sha256: str) -> None:
        with self._write() as conn:
            conn.execute(
                update(lab_files)
                .where(lab_files.c.sha256 == sha256)
                .values(status="filed", filed_at=_now())
            )

    def record_duplicate(self, sha256: str) -> int:
        with self._write() as conn:
            conn.execute(
                update(lab_files)
                .where(lab_files.c.sha256 == sha256)
                .values(duplicates=lab_files.c.duplicates + 1)
            )
            count = conn.execute(
                select(lab_files.c.duplicates).where(lab_files.c.sha256 == sha256)
            ).scalar_one_or_none()
        return int(count or 0)

    # -- ingest --------------------------------------------------------------

    def ingest_file(
        self,
        file: NewLabFile,
        results: Sequence[NewLabResult],
        *,
        order_lookup: OrderLookup | None = None,
    ) -> LabIngestOutcome:
        """Journal ``file`` and store ``results`` in one transaction.

        Returns ``LabIngestOutcome(duplicate=True)`` and writes nothing when the hash
        is already journaled (also when another process won the race).

        Raises
        ------
        OutOfResourcesError
            When the database cannot be written now (locked, unreachable, full).
        """
        try:
            with self._write() as conn:
                exists = conn.execute(
                    select(lab_files.c.id).where(lab_files.c.sha256 == file.sha256)
                ).first()
                if exists is not None:
                    return LabIngestOutcome(duplicate=True)
                return self._ingest(conn, file, results, order_lookup)
        except IntegrityError:
            # Two watchers raced on one hash: the unique constraint decided.
            if self.file_state(file.sha256) is not None:
                return LabIngestOutcome(duplicate=True)
            raise
        except (OperationalError, DBAPIError) as exc:
            logger.error("lab index write failed: %s", type(exc.orig).__name__ if exc.orig else exc)
            raise OutOfResourcesError("index unavailable") from exc

    def _ingest(
        self,
        conn: Connection,
        file: NewLabFile,
        results: Sequence[NewLabResult],
        order_lookup: OrderLookup | None,
    ) -> LabIngestOutcome:
        now = _now()
        file_pk = conn.execute(
            lab_files.insert()
            .values(
                sha256=file.sha256,
                name=file.name[:255],
                profile=file.profile,
                format=file.format,
                status="ingested",
                message_count=file.message_count,
                result_count=len(results),
                summary_json=file.summary_json,
                received_at=_utc(file.received_at),
            )
            .returning(lab_files.c.id)
        ).scalar_one()
        reports: dict[tuple[str, int | None], tuple[int, str, int | None]] = {}
        patient_rows: dict[tuple[str, str], int] = {}
        critical_pks: list[int] = []
        conflict_pks: list[int] = []
        new_versions = 0
        merged: dict[tuple[str, str], tuple[str, str] | None] = {}
        for result in results:
            # A merged identifier (issue 17): the survivor's result.
            result = self._surviving(conn, result, merged)
            patient_pk, issuer = self._patient(conn, result, now, patient_rows)
            key = (result.report.report_id, patient_pk)
            if key not in reports:
                reports[key] = self._report(
                    conn, result.report, patient_pk, issuer, now, order_lookup
                )
            report_pk, order_ref, report_owner = reports[key]
            latest = _latest(conn, result.observation_id)
            series_owner = None
            if (
                latest is not None
                and latest.is_current
                and patient_pk is not None
                and latest.patient_pk is not None
                and latest.patient_pk != patient_pk
            ):
                series_owner = int(latest.patient_pk)
            observation_id, review, conflict_with = result.observation_id, "", ""
            other = series_owner if series_owner is not None else report_owner
            if other is not None:
                # Another patient's specimen/test (or order): never a version of theirs.
                observation_id = held_id(result.observation_id, issuer, result.patient_id)
                conflict_with = result.observation_id if series_owner is not None else ""
                review = "conflict"
                latest = _latest(conn, observation_id)
            # The current version is always the newest one (resolutions add versions).
            current = latest if latest is not None and latest.is_current else None
            if review and current is not None and current.review == "accepted":
                review = "accepted"  # a re-send of a result already confirmed as this patient's
            version, supersedes = 1, None
            if latest is not None:
                version = latest.version + 1
            if current is not None:
                supersedes = current.id
                new_versions += 1
                conn.execute(
                    update(lab_results)
                    .where(lab_results.c.id == current.id)
                    .values(is_current=False)
                )
            values = _result_values(result, file_pk, report_pk, order_ref, now) | {
                "observation_id": observation_id,
                "version": version,
                "supersedes_pk": supersedes,
                "patient_pk": patient_pk,
                "patient_issuer": issuer,
                "review": review,
                "conflict_with": conflict_with,
                "conflict_patient_pk": other if review == "conflict" else None,
            }
            pk = conn.execute(
                lab_results.insert().values(values).returning(lab_results.c.id)
            ).scalar_one()
            if result.is_critical:
                critical_pks.append(pk)
            if review == "conflict":
                conflict_pks.append(pk)
                logger.warning(
                    "lab result Observation/%s held: its specimen/test belongs to another patient",
                    observation_id,
                )
        _refresh_report_status(conn, [pk for pk, _ref, _owner in reports.values()])
        return LabIngestOutcome(
            duplicate=False,
            results=len(results),
            new_versions=new_versions,
            critical=self._rows(conn, critical_pks),
            conflicts=self._rows(conn, conflict_pks),
        )

    @staticmethod
    def _rows(conn: Connection, pks: list[int]) -> tuple[StoredLabResult, ...]:
        if not pks:
            return ()
        rows = conn.execute(
            _result_select().where(lab_results.c.id.in_(pks)).order_by(lab_results.c.id)
        ).all()
        return tuple(_stored_result(r) for r in rows)

    def _surviving(
        self,
        conn: Connection,
        result: NewLabResult,
        cache: dict[tuple[str, str], tuple[str, str] | None],
    ) -> NewLabResult:
        """``result`` as the surviving patient's when its identifier was merged into
        another (IHE PIR A40, issue 17): lab results sent later under the obsolete
        identifier follow the merge, as images do."""
        if result.is_qc or not result.patient_id:
            return result
        key = (result.patient_id[:64], (result.patient_issuer or self.default_issuer)[:64])
        if key not in cache:
            old, surv = patients.alias("old"), patients.alias("surv")
            row = conn.execute(
                select(surv.c.patient_id, surv.c.issuer)
                .select_from(
                    old.join(patient_links, patient_links.c.obsolete_pk == old.c.id).join(
                        surv, surv.c.id == patient_links.c.surviving_pk
                    )
                )
                .where(and_(old.c.patient_id == key[0], old.c.issuer == key[1]))
            ).first()
            cache[key] = None if row is None else (str(row[0]), str(row[1]))
        survivor = cache[key]
        if survivor is None:
            return result
        pid, issuer = survivor
        report = replace(result.report, patient_id=pid, patient_issuer=issuer)
        return replace(result, patient_id=pid, patient_issuer=issuer, report=report)

    def _patient(
        self,
        conn: Connection,
        result: NewLabResult,
        now: datetime,
        cache: dict[tuple[str, str], int],
    ) -> tuple[int | None, str]:
        """The ``patients`` row of a result's patient (created if new), and its issuer.

        Same identity rule as imaging (``storage/index/sql.py``): Patient ID and
        issuer (PS3.3 C.7.1.1). An existing row keeps its demographics: a lab message
        does not rename a patient (that is an explicit, audited identity change).
        """
        if result.is_qc or not result.patient_id:
            return None, ""
        issuer = (result.patient_issuer or self.default_issuer)[:64]
        patient_id = result.patient_id[:64]
        known = cache.get((patient_id, issuer))
        if known is not None:
            return known, issuer
        stmt = (
            self.index._upsert(patients)
            .values(
                patient_id=patient_id,
                issuer=issuer,
                name=_person_name(result.patient_name)[:324],
                birth_date=_fhir_birth_date(result.patient_birth_date),
                sex=result.patient_sex[:16],
                updated_at=now,
            )
            .on_conflict_do_nothing(index_elements=["patient_id", "issuer"])
        )
        conn.execute(stmt)
        pk = int(
            conn.execute(
                select(patients.c.id).where(
                    and_(patients.c.patient_id == patient_id, patients.c.issuer == issuer)
                )
            ).scalar_one()
        )
        cache[(patient_id, issuer)] = pk
        return pk, issuer

    def _report(
        self,
        conn: Connection,
        report: NewLabReport,
        patient_pk: int | None,
        issuer: str,
        now: datetime,
        order_lookup: OrderLookup | None,
    ) -> tuple[int, str, int | None]:
        """The group's row, created if new: ``(pk, order reference, other patient)``.

        A group (order, else specimen) that belongs to another patient is not
        joined: the result goes to a group of its own for its patient, and the other
        patient's pk is returned so the result is held.
        """
        report_id = report.report_id
        owner: int | None = None
        row = conn.execute(
            select(
                lab_reports.c.id,
                lab_reports.c.order_ref,
                lab_reports.c.patient_id,
                lab_reports.c.patient_pk,
            ).where(lab_reports.c.report_id == report_id)
        ).first()
        if (
            row is not None
            and patient_pk is not None
            and row.patient_pk is not None
            and row.patient_pk != patient_pk
        ):
            owner = int(row.patient_pk)
            report_id = held_id(report.report_id, issuer, report.patient_id)
            row = conn.execute(
                select(
                    lab_reports.c.id,
                    lab_reports.c.order_ref,
                    lab_reports.c.patient_id,
                    lab_reports.c.patient_pk,
                ).where(lab_reports.c.report_id == report_id)
            ).first()
        if row is not None:
            values: dict[str, Any] = {"updated_at": now}
            if row.patient_pk is None and patient_pk is not None and not report.is_qc:
                values.update(
                    patient_id=report.patient_id[:64],
                    patient_name=report.patient_name[:324],
                    patient_pk=patient_pk,
                    patient_issuer=issuer,
                )
            conn.execute(update(lab_reports).where(lab_reports.c.id == row.id).values(**values))
            return int(row.id), str(row.order_ref), owner
        order_ref = ""
        if order_lookup is not None:
            order_ref = (
                order_lookup(report.specimen_id, report.placer_order_id, report.filler_order_id)
                or ""
            )
        elif patient_pk is not None:
            order_ref = _find_order(conn, report, issuer)
        pk = conn.execute(
            lab_reports.insert()
            .values(
                report_id=report_id,
                specimen_id=report.specimen_id[:64],
                placer_order_id=report.placer_order_id[:64],
                filler_order_id=report.filler_order_id[:64],
                # QC material belongs to no patient, whatever the message says.
                patient_id="" if report.is_qc else report.patient_id[:64],
                patient_name="" if report.is_qc else report.patient_name[:324],
                patient_pk=None if report.is_qc else patient_pk,
                patient_issuer="" if report.is_qc else issuer,
                is_qc=report.is_qc,
                analyzer=report.analyzer[:64],
                order_code=report.order_code[:64],
                order_system=report.order_system[:64],
                order_display=report.order_display[:255],
                unmatched=not order_ref,
                order_ref=order_ref,
                created_at=now,
                updated_at=now,
            )
            .returning(lab_reports.c.id)
        ).scalar_one()
        return int(pk), order_ref, owner

    # -- review ------------------------------------------------------------------

    def conflicts(self, *, limit: int = 100, offset: int = 0) -> tuple[list[StoredLabResult], int]:
        """Held results (``review == "conflict"``), oldest first: the needs-review list."""
        return self.search_results(
            LabResultQuery(reviews=("conflict",), qc=None, offset=offset, limit=limit)
        )

    def resolve(self, observation_id: str, choice: str) -> LabResolution:
        """Accept or discard a held result; every change is a new version (FHIR history).

        ``accept``: the held result becomes an ordinary result of its patient
        (``review = "accepted"``), and the other patient's current result of the same
        specimen and test gets a version ``entered-in-error`` (``review = "moved"``):
        the specimen was theirs by mistake. ``discard``: the held result gets a
        version ``entered-in-error`` (``review = "discarded"``); the other patient's
        result is untouched. The versions stay current so that a ``_lastUpdated``
        feed carries the withdrawal (FHIR R4 Observation.status ``entered-in-error``).
        """
        if choice not in REVIEW_CHOICES:
            raise InvalidQueryError(f"choice must be one of {', '.join(REVIEW_CHOICES)}")
        try:
            return self._resolve(observation_id, choice)
        except IntegrityError as exc:
            # Another reviewer settled it first (same next version number): one wins.
            raise DuplicateError(f"held lab result {observation_id} was just resolved") from exc
        except (OperationalError, DBAPIError) as exc:
            raise OutOfResourcesError("index unavailable") from exc

    def _resolve(self, observation_id: str, choice: str) -> LabResolution:
        with self._write() as conn:
            held = conn.execute(
                select(lab_results).where(
                    and_(
                        lab_results.c.observation_id == observation_id,
                        lab_results.c.is_current == true(),
                        lab_results.c.review == "conflict",
                    )
                )
            ).first()
            if held is None:
                raise NotFoundError(f"no held lab result {observation_id}")
            now = _now()
            held_before = self._rows(conn, [held.id])[0]
            if choice == "discard":
                new_pk = self._new_version(
                    conn, held, now, review="discarded", status="entered-in-error"
                )
                _refresh_report_status(conn, [held.report_pk])
                return LabResolution(
                    choice=choice,
                    held_before=held_before,
                    held_after=self._rows(conn, [new_pk])[0],
                )
            new_pk = self._new_version(conn, held, now, review="accepted")
            retired_before = retired_after = None
            if held.conflict_with:
                other = conn.execute(
                    select(lab_results).where(
                        and_(
                            lab_results.c.observation_id == held.conflict_with,
                            lab_results.c.is_current == true(),
                        )
                    )
                ).first()
                if other is not None and other.patient_pk == held.conflict_patient_pk:
                    retired_before = self._rows(conn, [other.id])[0]
                    retired_pk = self._new_version(
                        conn, other, now, review="moved", status="entered-in-error"
                    )
                    retired_after = self._rows(conn, [retired_pk])[0]
            _refresh_report_status(
                conn, [held.report_pk] + ([other.report_pk] if retired_after else [])
            )
            return LabResolution(
                choice=choice,
                held_before=held_before,
                held_after=self._rows(conn, [new_pk])[0],
                retired_before=retired_before,
                retired_after=retired_after,
            )

    @staticmethod
    def _new_version(
        conn: Connection, row: Any, now: datetime, *, review: str, status: str | None = None
    ) -> int:
        """Copy ``row`` as the series' next current version with a new review state."""
        values = dict(row._mapping)
        values.pop("id")
        values.update(
            version=row.version + 1,
            supersedes_pk=row.id,
            is_current=True,
            review=review,
            created_at=now,
            updated_at=now,
        )
        if status is not None:
            values["status"] = status
        conn.execute(update(lab_results).where(lab_results.c.id == row.id).values(is_current=False))
        return int(
            conn.execute(
                lab_results.insert().values(values).returning(lab_results.c.id)
            ).scalar_one()
        )

    # -- order links -----------------------------------------------------------

    def link_results(self, order_ref: str, *, specimen_id: str = "", order_id: str = "") -> int:
        """Attach unmatched result groups of ``specimen_id`` or accession ``order_id``.

        Returns the number of results linked (all versions).
        """
        if not specimen_id and not order_id:
            raise ValueError("link_results needs a specimen_id or an order_id")
        cond = []
        if specimen_id:
            cond.append(lab_reports.c.specimen_id == specimen_id)
        if order_id:
            cond.append(lab_reports.c.placer_order_id == order_id)
            cond.append(lab_reports.c.filler_order_id == order_id)
        with self._write() as conn:
            pks = list(
                conn.execute(
                    select(lab_reports.c.id).where(
                        and_(or_(*cond), lab_reports.c.unmatched == true())
                    )
                ).scalars()
            )
            return self._link(conn, pks, order_ref)

    def link_unmatched(self, lookup: OrderLookup, *, limit: int = 1000) -> int:
        """Ask ``lookup`` about each unmatched result group (oldest first)."""
        with read_only(self.engine) as conn:
            rows = conn.execute(
                select(
                    lab_reports.c.id,
                    lab_reports.c.specimen_id,
                    lab_reports.c.placer_order_id,
                    lab_reports.c.filler_order_id,
                )
                .where(lab_reports.c.unmatched == true())
                .order_by(lab_reports.c.id)
                .limit(limit)
            ).all()
        linked = 0
        for row in rows:
            ref = lookup(row.specimen_id, row.placer_order_id, row.filler_order_id)
            if ref:
                with self._write() as conn:
                    linked += self._link(conn, [row.id], ref)
        return linked

    def _link(self, conn: Connection, report_pks: list[int], order_ref: str) -> int:
        report_pks = _linkable(conn, report_pks, order_ref)
        if not report_pks:
            return 0
        now = _now()
        conn.execute(
            update(lab_reports)
            .where(lab_reports.c.id.in_(report_pks))
            .values(unmatched=False, order_ref=order_ref, updated_at=now)
        )
        result = conn.execute(
            update(lab_results)
            .where(lab_results.c.report_pk.in_(report_pks))
            .values(unmatched=False, order_ref=order_ref)
        )
        return int(result.rowcount or 0)

    # -- reads -----------------------------------------------------------------

    def search_results(self, query: LabResultQuery) -> tuple[list[StoredLabResult], int]:
        cond = _result_conditions(query)
        orders: dict[str, list[Any]] = {
            "id": [lab_results.c.id],
            "updated": [lab_results.c.updated_at, lab_results.c.id],
            "-updated": [lab_results.c.updated_at.desc(), lab_results.c.id.desc()],
            "performed": [lab_results.c.performed_at, lab_results.c.id],
            "-performed": [lab_results.c.performed_at.desc(), lab_results.c.id.desc()],
        }
        order = orders[query.sort]
        with read_only(self.engine) as conn:
            rows = conn.execute(
                _result_select()
                .where(and_(true(), *cond))
                .order_by(*order)
                .offset(query.offset)
                .limit(query.limit)
            ).all()
            matching = select(lab_results.c.id).select_from(_joined()).where(
                and_(true(), *cond))
            total = _total(conn, matching, len(rows), query.offset, query.limit,
                           query.total_at_most)
        return [_stored_result(r) for r in rows], total

    def result_history(self, observation_id: str) -> list[StoredLabResult]:
        with read_only(self.engine) as conn:
            rows = conn.execute(
                _result_select()
                .where(lab_results.c.observation_id == observation_id)
                .order_by(lab_results.c.version.desc())
            ).all()
        return [_stored_result(r) for r in rows]

    def search_reports(self, query: LabReportQuery) -> tuple[list[StoredLabReport], int]:
        cond: list[ColumnElement[bool]] = []
        r = lab_reports.c
        if query.report_ids:
            cond.append(r.report_id.in_(query.report_ids))
        if query.patient_ids:
            cond.append(r.patient_id.in_(query.patient_ids))
        cond.extend(_patient_conditions(r.patient_pk, query.patient_pks, query.patient_identifiers))
        if query.based_on:
            cond.append(r.order_ref.in_(_order_refs(query.based_on)))
        if query.statuses:
            cond.append(r.status.in_(query.statuses))
        if query.categories and "LAB" not in query.categories:
            cond.append(false())  # every lab report is v2-0074 "LAB"
        if query.specimen_ids:
            cond.append(r.specimen_id.in_(query.specimen_ids))
        if query.identifiers:
            ids = query.identifiers
            cond.append(
                or_(r.specimen_id.in_(ids), r.placer_order_id.in_(ids), r.filler_order_id.in_(ids))
            )
        if query.qc is not None:
            cond.append(r.is_qc == (true() if query.qc else false()))
        cond.extend(_bounds(r.updated_at, query.updated))
        if query.codes:
            # DiagnosticReport.code is the ordered panel; a result's code also finds it.
            sub = [
                lab_results.c.report_pk == r.id,
                lab_results.c.is_current == true(),
                _code_condition(query.codes),
            ]
            cond.append(
                or_(
                    _panel_condition(query.codes),
                    select(lab_results.c.id).where(and_(*sub)).exists(),
                )
            )
        if query.performed:
            sub = [lab_results.c.report_pk == r.id, lab_results.c.is_current == true()]
            sub.extend(_bounds(lab_results.c.performed_at, query.performed))
            cond.append(select(lab_results.c.id).where(and_(*sub)).exists())
        orders: dict[str, list[Any]] = {
            "id": [r.id],
            "updated": [r.updated_at, r.id],
            "-updated": [r.updated_at.desc(), r.id.desc()],
        }
        order = orders[query.sort]
        with read_only(self.engine) as conn:
            rows = conn.execute(
                select(lab_reports)
                .where(and_(true(), *cond))
                .order_by(*order)
                .offset(query.offset)
                .limit(query.limit)
            ).all()
            matching = select(r.id).where(and_(true(), *cond))
            total = _total(conn, matching, len(rows), query.offset, query.limit,
                           query.total_at_most)
        return [_stored_report(row) for row in rows], total

    def count_results(self) -> dict[str, int]:
        """Result rows (all versions) per file hash: the crash test's ledger."""
        with read_only(self.engine) as conn:
            rows = conn.execute(
                select(lab_files.c.sha256, func.count(lab_results.c.id))
                .select_from(
                    lab_files.outerjoin(lab_results, lab_results.c.file_pk == lab_files.c.id)
                )
                .group_by(lab_files.c.sha256)
            ).all()
        return {row[0]: int(row[1]) for row in rows}

    def _write(self) -> Any:
        return self.index._write()


# -- row mapping ------------------------------------------------------------------


def _result_values(
    result: NewLabResult, file_pk: int, report_pk: int, order_ref: str, now: datetime
) -> dict[str, Any]:
    qc = result.is_qc
    return {
        "observation_id": result.observation_id,
        "is_current": True,
        "file_pk": file_pk,
        "report_pk": report_pk,
        "location": result.location[:255],
        "message_index": result.message_index,
        "position": result.position,
        "control_id": result.control_id[:64],
        "format": result.format[:16],
        "analyzer": result.analyzer[:64],
        "instrument_id": result.instrument_id[:64],
        "test_code": result.test_code[:64],
        "test_system": result.test_system[:64],
        "test_display": result.test_display[:255],
        "loinc": result.loinc[:16],
        "loinc_display": result.loinc_display[:255],
        "test_raw": result.test_raw,
        "sub_id": result.sub_id[:32],
        "value_type": result.value_type[:8],
        "raw_value": result.raw_value,
        "value_text": result.value_text,
        "value": result.value,
        "comparator": result.comparator[:2],
        "coded_value": result.coded_value,
        "unit": result.unit[:64],
        "ucum_unit": result.ucum_unit[:64],
        "reference_range": result.reference_range[:64],
        "reference_low": result.reference_low,
        "reference_high": result.reference_high,
        "flags_json": json.dumps(list(result.flags)),
        "status": result.status[:16],
        "status_code": result.status_code[:8],
        "specimen_id": result.specimen_id[:64],
        "placer_order_id": result.placer_order_id[:64],
        "filler_order_id": result.filler_order_id[:64],
        "performed_at": _utc(result.performed_at),
        "is_qc": qc,
        # QC results never attach to patients (issue 5), whatever the message says.
        "patient_id": "" if qc else result.patient_id[:64],
        "patient_name": "" if qc else result.patient_name[:324],
        "patient_birth_date": "" if qc else result.patient_birth_date[:10],
        "patient_sex": "" if qc else result.patient_sex[:16],
        "comments_json": json.dumps(list(result.comments), ensure_ascii=False),
        "is_critical": result.is_critical,
        "critical_reason": result.critical_reason[:64],
        "unmatched": not order_ref,
        "order_ref": order_ref,
        "created_at": now,
        "updated_at": now,
    }


def _total(conn: Connection, matching: Select[Any], page: int, offset: int, limit: int,
           at_most: int | None) -> int:
    """The total of a search whose page held ``page`` rows: the page itself when it is
    not full (nor past the end), else ``matching``'s rows counted, at most
    ``at_most + 1`` of them (FHIR ``_total``; issue 21: a full page of a common name
    counted every result of it)."""
    known = total_from_page(page, offset, limit)
    if known is not None:
        return known
    return int(conn.execute(bounded_count(matching, at_most)).scalar_one())


def _joined() -> Any:
    return lab_results.join(lab_files, lab_results.c.file_pk == lab_files.c.id).join(
        lab_reports, lab_results.c.report_pk == lab_reports.c.id
    )


def _result_select() -> Any:
    return select(
        lab_results,
        lab_files.c.sha256.label("file_sha256"),
        lab_files.c.name.label("file_name"),
        lab_reports.c.report_id.label("report_id"),
    ).select_from(_joined())


def _code_condition(codes: tuple[tuple[str | None, str], ...]) -> ColumnElement[bool]:
    c = lab_results.c
    alternatives: list[ColumnElement[bool]] = []
    for system, code in codes:
        if system is None:
            alternatives.append(or_(c.test_code == code, c.loinc == code))
        elif system == "LN":
            alternatives.append(
                or_(c.loinc == code, and_(c.test_system == "LN", c.test_code == code))
            )
        else:
            alternatives.append(and_(c.test_system == system, c.test_code == code))
    return or_(*alternatives)


def _status_condition(statuses: tuple[str, ...]) -> ColumnElement[bool]:
    """FHIR Observation.status as served: a held result reads ``preliminary`` whatever
    the sender said (its patient is unverified), an empty status ``unknown``."""
    c = lab_results.c
    stored = [s for s in statuses if s != "unknown"] + ([""] if "unknown" in statuses else [])
    alternatives = [and_(c.review != "conflict", c.status.in_(stored))]
    if "preliminary" in statuses:
        alternatives.append(c.review == "conflict")
    return or_(*alternatives)


def _panel_condition(codes: tuple[tuple[str | None, str], ...]) -> ColumnElement[bool]:
    r = lab_reports.c
    return or_(
        *(
            and_(r.order_code == code, true() if system is None else r.order_system == system)
            for system, code in codes
        )
    )


def _patient_conditions(
    column: Any,
    pks: tuple[int, ...],
    identifiers: tuple[tuple[str | None, str], ...],
) -> list[ColumnElement[bool]]:
    """``patient=Patient/<pk>`` and ``patient.identifier=[system|]value`` on ``patients``."""
    out: list[ColumnElement[bool]] = []
    if pks:
        out.append(column.in_(pks))
    if identifiers:
        p = patients.c
        alternatives = [
            and_(p.patient_id == value, true() if issuer is None else p.issuer == issuer)
            for issuer, value in identifiers
        ]
        out.append(column.in_(select(p.id).where(or_(*alternatives))))
    return out


def _order_refs(based_on: tuple[str, ...]) -> list[str]:
    """``ServiceRequest/<id>`` for each id (a bare id or the reference itself)."""
    return [v if v.startswith("ServiceRequest/") else f"ServiceRequest/{v}" for v in based_on]


def _bounds(column: Any, bounds: tuple[DateBound, ...]) -> list[ColumnElement[bool]]:
    out: list[ColumnElement[bool]] = []
    for op, instant in bounds:
        value = _utc(instant)
        out.append(
            {
                "ge": column >= value,
                "gt": column > value,
                "le": column <= value,
                "lt": column < value,
            }[op]
        )
    return out


def _result_conditions(query: LabResultQuery) -> list[ColumnElement[bool]]:
    c = lab_results.c
    cond: list[ColumnElement[bool]] = []
    if query.current_only:
        cond.append(c.is_current == true())
    if query.observation_ids:
        cond.append(c.observation_id.in_(query.observation_ids))
    if query.patient_ids:
        cond.append(c.patient_id.in_(query.patient_ids))
    cond.extend(_patient_conditions(c.patient_pk, query.patient_pks, query.patient_identifiers))
    if query.based_on:
        cond.append(c.order_ref.in_(_order_refs(query.based_on)))
    if query.categories and "laboratory" not in query.categories:
        cond.append(false())  # every lab result is category "laboratory"
    if query.reviews:
        cond.append(c.review.in_(query.reviews))
    if query.specimen_ids:
        cond.append(c.specimen_id.in_(query.specimen_ids))
    if query.order_ids:
        ids = query.order_ids
        cond.append(or_(c.placer_order_id.in_(ids), c.filler_order_id.in_(ids)))
    if query.codes:
        cond.append(_code_condition(query.codes))
    if query.report_ids:
        cond.append(lab_reports.c.report_id.in_(query.report_ids))
    if query.statuses:
        cond.append(_status_condition(query.statuses))
    if query.critical is not None:
        cond.append(c.is_critical == (true() if query.critical else false()))
    if query.qc is not None:
        cond.append(c.is_qc == (true() if query.qc else false()))
    if query.unmatched is not None:
        cond.append(c.unmatched == (true() if query.unmatched else false()))
    cond.extend(_bounds(c.performed_at, query.performed))
    cond.extend(_bounds(c.updated_at, query.updated))
    return cond


def _stored_result(row: Any) -> StoredLabResult:
    m = row._mapping
    created = _aware(m["created_at"])
    updated = _aware(m["updated_at"])
    assert created is not None and updated is not None
    return StoredLabResult(
        pk=m["id"],
        observation_id=m["observation_id"],
        version=m["version"],
        is_current=bool(m["is_current"]),
        supersedes_pk=m["supersedes_pk"],
        report_id=m["report_id"],
        file_sha256=m["file_sha256"],
        file_name=m["file_name"],
        location=m["location"],
        message_index=m["message_index"],
        position=m["position"],
        control_id=m["control_id"],
        format=m["format"],
        analyzer=m["analyzer"],
        instrument_id=m["instrument_id"],
        test_code=m["test_code"],
        test_system=m["test_system"],
        test_display=m["test_display"],
        loinc=m["loinc"],
        loinc_display=m["loinc_display"],
        test_raw=m["test_raw"],
        sub_id=m["sub_id"],
        value_type=m["value_type"],
        raw_value=m["raw_value"],
        value_text=m["value_text"],
        value=m["value"],
        comparator=m["comparator"],
        coded_value=m["coded_value"],
        unit=m["unit"],
        ucum_unit=m["ucum_unit"],
        reference_range=m["reference_range"],
        reference_low=m["reference_low"],
        reference_high=m["reference_high"],
        flags=tuple(json.loads(m["flags_json"] or "[]")),
        status=m["status"],
        status_code=m["status_code"],
        specimen_id=m["specimen_id"],
        placer_order_id=m["placer_order_id"],
        filler_order_id=m["filler_order_id"],
        performed_at=_aware(m["performed_at"]),
        is_qc=bool(m["is_qc"]),
        patient_id=m["patient_id"],
        patient_name=m["patient_name"],
        patient_birth_date=m["patient_birth_date"],
        patient_sex=m["patient_sex"],
        comments=tuple(json.loads(m["comments_json"] or "[]")),
        is_critical=bool(m["is_critical"]),
        critical_reason=m["critical_reason"],
        unmatched=bool(m["unmatched"]),
        order_ref=m["order_ref"],
        created_at=created,
        updated_at=updated,
        patient_pk=m["patient_pk"],
        patient_issuer=m["patient_issuer"],
        review=m["review"],
        conflict_with=m["conflict_with"],
        conflict_patient_pk=m["conflict_patient_pk"],
    )


def _stored_report(row: Any) -> StoredLabReport:
    created = _aware(row.created_at)
    updated = _aware(row.updated_at)
    assert created is not None and updated is not None
    return StoredLabReport(
        report_id=row.report_id,
        specimen_id=row.specimen_id,
        placer_order_id=row.placer_order_id,
        filler_order_id=row.filler_order_id,
        patient_id=row.patient_id,
        patient_name=row.patient_name,
        is_qc=bool(row.is_qc),
        analyzer=row.analyzer,
        unmatched=bool(row.unmatched),
        order_ref=row.order_ref,
        created_at=created,
        updated_at=updated,
        patient_pk=row.patient_pk,
        patient_issuer=row.patient_issuer,
        order_code=row.order_code,
        order_system=row.order_system,
        order_display=row.order_display,
        status=row.status,
    )
