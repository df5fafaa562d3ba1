"""The metadata index over SQLAlchemy 2: one query builder for SQLite and PostgreSQL.

Dialect quirks (engine set-up, upsert construct, job-claim locking) live in
``sqlite.py`` and ``postgres.py``, as in Orthanc's ``ISqlLookupFormatter``.
Database errors that mean "cannot store now" (locked, unreachable, disk full)
become :class:`~core.errors.OutOfResourcesError`, which C-STORE answers with 0xA700.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from sqlalchemy import (
    Connection,
    Engine,
    and_,
    bindparam,
    case,
    exists,
    func,
    literal_column,
    not_,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import DBAPIError, OperationalError

from core.errors import InvalidQueryError, NotFoundError, OutOfResourcesError
from core.person_name import name_words, person_name_key
from core.rejection import RETENTION_EXPIRED
from core.settings import IndexSettings
from storage._flush import SharedFlush
from storage.abc import AddOutcome, Job, NewInstance, StoredInstance
from storage.index import postgres as _pg
from storage.index import sqlite as _sqlite
from storage.index.direct import DirectStatement
from storage.index.pir_tables import patient_links
from storage.index.queries import (
    Query,
    after_key_query,
    count_query,
    find_query,
    metadata_query,
    modality_values_query,
    modality_wildcards,
    newest_floor_query,
    newest_window,
)
from storage.index.schema import (
    index_counters,
    instances,
    jobs,
    journal_marks,
    patient_name_words,
    patients,
    rejections,
    series,
    studies,
    study_modalities,
    study_versions,
)

__all__ = ["MetadataRow", "SqlIndex", "pack_metadata", "set_name_words", "unpack_metadata"]

logger = logging.getLogger(__name__)


#: PS3.16 CID 7011 "Data Retention Policy Expired" (core.rejection.RETENTION_EXPIRED).
_RETENTION_EXPIRED = RETENTION_EXPIRED

#: Tries of one write transaction that a concurrent writer made fail (PostgreSQL).
_ATTEMPTS = 5


def _now() -> datetime:
    return datetime.now(UTC)


_PATIENT_KEYS = ["patient_id", "issuer", "name", "name_key", "birth_date", "sex", "updated_at"]
_STUDY_KEYS = [
    "study_instance_uid",
    "patient_pk",
    "study_date",
    "study_time",
    "accession_number",
    "study_id",
    "description",
    "referring_physician_name",
    "institution_name",
    "created_at",
    "updated_at",
]
_SERIES_KEYS = [
    "series_instance_uid",
    "study_pk",
    "modality",
    "series_number",
    "description",
    "series_date",
    "series_time",
    "body_part_examined",
    "laterality",
    "station_name",
    "pps_start_date",
    "pps_start_time",
    "updated_at",
]


def _patient_values(rec: Any, now: datetime) -> dict[str, Any]:
    pid = rec.patient_id
    return {
        "patient_id": pid,
        # An empty Patient ID (Type 2) must not merge unrelated patients into one row.
        "issuer": rec.issuer_of_patient_id if pid else f"study:{rec.study_instance_uid}",
        "name": rec.patient_name,
        "name_key": person_name_key(rec.patient_name),
        "birth_date": rec.patient_birth_date[:8],
        "sex": rec.patient_sex[:16],
        "updated_at": now,
    }


def _study_values(rec: Any, patient_pk: int, now: datetime) -> dict[str, Any]:
    return {
        "study_instance_uid": rec.study_instance_uid,
        "patient_pk": patient_pk,
        "study_date": rec.study_date[:8],
        "study_time": rec.study_time[:16],
        "accession_number": rec.accession_number[:16],
        "study_id": rec.study_id[:16],
        "description": rec.study_description[:64],
        "referring_physician_name": rec.referring_physician_name,
        "institution_name": rec.institution_name[:64],
        "created_at": now,
        "updated_at": now,
    }


def _series_values(rec: Any, study_pk: int, now: datetime) -> dict[str, Any]:
    return {
        "series_instance_uid": rec.series_instance_uid,
        "study_pk": study_pk,
        "modality": rec.modality[:16],
        "series_number": rec.series_number,
        "description": rec.series_description[:64],
        "series_date": rec.series_date[:8],
        "series_time": rec.series_time[:16],
        "body_part_examined": rec.body_part_examined[:16],
        "laterality": rec.laterality[:16],
        "station_name": rec.station_name[:16],
        "pps_start_date": rec.performed_procedure_step_start_date[:8],
        "pps_start_time": rec.performed_procedure_step_start_time[:16],
        "updated_at": now,
    }


#: Study attributes a re-sent instance may correct (issue 17.2; ``study_versions``).
_STUDY_CORRECTABLE = (
    "study_date",
    "study_time",
    "accession_number",
    "study_id",
    "description",
    "referring_physician_name",
    "institution_name",
)

_INSTANCE_KEYS = [
    "sop_instance_uid",
    "series_pk",
    "sop_class_uid",
    "transfer_syntax_uid",
    "instance_number",
    "rows",
    "columns",
    "number_of_frames",
    "bits_allocated",
    "photometric_interpretation",
    "blob_key",
    "size",
    "version",
    "is_current",
    "calling_ae",
    "received_at",
    "metadata_json",
    "metadata_z",
]
_NEW_JOB_KEYS = ["kind", "target", "status", "correlation_id", "created_at", "updated_at"]

#: Marks whose journal record readers may still need (storage/journal.py): a location
#: kept (not dropped by a delete) and an instance still referencing the original.
_LOCATED_AND_REFERENCED = and_(
    journal_marks.c.location != "",
    exists().where(instances.c.blob_key == journal_marks.c.blob_key),
)


#: DICOM JSON shorter than this is stored as text (compression would not pay).
_COMPRESS_FROM = 256


def pack_metadata(text: str) -> tuple[str, bytes | None]:
    """``(metadata_json, metadata_z)`` for storing a header's DICOM JSON.

    zlib at level 1: a header's JSON shrinks 4-6 times for ~20 µs, which keeps the
    index near a quarter of its former size (issue 21: 4.6 KB per instance, over half
    of it this JSON).
    """
    if len(text) < _COMPRESS_FROM:
        return text, None
    return "", zlib.compress(text.encode("utf-8"), 1)


def unpack_metadata(text: str | None, packed: bytes | None) -> str:
    """The DICOM JSON stored by :func:`pack_metadata` (or as text by older versions)."""
    if packed is not None:
        return zlib.decompress(packed).decode("utf-8")
    return text or "{}"


def _instance_values(item: NewInstance, series_pk: int, version: int) -> dict[str, Any]:
    rec = item.record
    meta, packed = pack_metadata(item.metadata_json)
    return {
        "sop_instance_uid": rec.sop_instance_uid,
        "series_pk": series_pk,
        "sop_class_uid": rec.sop_class_uid,
        "transfer_syntax_uid": rec.transfer_syntax_uid,
        "instance_number": rec.instance_number,
        "rows": rec.rows,
        "columns": rec.columns,
        "number_of_frames": rec.number_of_frames,
        "bits_allocated": rec.bits_allocated,
        "photometric_interpretation": rec.photometric_interpretation[:16],
        "blob_key": item.blob_key,
        "size": item.size,
        "version": version,
        "is_current": True,
        "calling_ae": item.calling_ae,
        "received_at": item.received_at,
        "metadata_json": meta,
        "metadata_z": packed,
    }


def set_name_words(conn: Connection, patient_pk: int, name_key: str) -> None:
    """Replace a patient's rows of ``patient_name_words`` (for writers of ``patients``
    other than the receiver, e.g. order reconciliation)."""
    conn.execute(patient_name_words.delete().where(patient_name_words.c.patient_pk == patient_pk))
    words = name_words(name_key)
    if words:
        conn.execute(
            patient_name_words.insert(),
            [{"word": w, "patient_pk": patient_pk} for w in words],
        )


@dataclass(frozen=True, slots=True)
class MetadataRow:
    """One current instance as WADO-RS ``/metadata`` needs it (PS3.18 10.4.1.1.2)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    blob_key: str
    metadata_json: str


class _ChangeCounter(Protocol):
    """A number that moves when work for the job worker may have been committed."""

    def read(self) -> int | None: ...

    def close(self) -> None: ...


class SqlIndex:
    """:class:`storage.abc.MetadataIndex` on SQLAlchemy (SQLite by default)."""

    def __init__(self, settings: IndexSettings) -> None:
        self.url = settings.url
        self.is_sqlite = settings.url.startswith("sqlite")
        dialect = _sqlite if self.is_sqlite else _pg
        if self.is_sqlite and settings.url.startswith("sqlite:///"):
            from pathlib import Path

            Path(settings.url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self._upsert = dialect.upsert
        self._lock_keys = dialect.lock_keys
        self._is_retryable = dialect.is_retryable
        # SQLite: WAL checkpoints off the write path (see storage/index/sqlite.py).
        self._checkpoints = _sqlite.checkpointer(settings.url) if self.is_sqlite else None
        self.engine: Engine = (
            _sqlite.make_engine(
                settings.url,
                busy_timeout_s=settings.busy_timeout_s,
                checkpoints=self._checkpoints,
            )
            if self.is_sqlite
            else _pg.make_engine(settings.url, busy_timeout_s=settings.busy_timeout_s)
        )
        # What the idle worker polls instead of the job queue (see data_version()):
        # SQLite's commit counter, PostgreSQL's notifications (migration 0012).
        self._data_version: _ChangeCounter | None = (
            _sqlite.data_version(settings.url)
            if self.is_sqlite
            else _pg.WorkListener(self.engine, connect_timeout_s=settings.busy_timeout_s)
        )
        self._write_lock = dialect.write_lock(settings.url)
        self._settings = settings
        # (engine, WAL file) that add_instances uses, settled on its first call.
        self._ingest_setup: tuple[Engine, str | None] | None = (
            None if self.is_sqlite else (self.engine, None)
        )
        self._ingest_lock = threading.Lock()
        self._wal_flush = SharedFlush(self._sync_wal)
        self._series_cache: dict[str, int] = {}
        self._prepare_statements()
        if settings.migrate:
            from storage.index.migrate import upgrade

            upgrade(self.engine)

    def _queued(self) -> contextlib.AbstractContextManager[None]:
        """Held while writing: queues this writer behind the others (``sqlite.WriteLock``)."""
        return self._write_lock.held() if self._write_lock else contextlib.nullcontext()

    @contextlib.contextmanager
    def _write(self, engine: Engine | None = None) -> Iterator[Connection]:
        """A write transaction, queued behind other writers (see ``sqlite.WriteLock``)."""
        with self._queued(), (engine or self.engine).begin() as conn:
            yield conn

    @contextlib.contextmanager
    def _raw_write(self, engine: Engine) -> Iterator[Any]:
        """A SQLite write transaction on the bare sqlite3 connection (receive path).

        What ``_write`` does, without SQLAlchemy's transaction and event machinery,
        which cost more CPU than the statements of a one-instance transaction and is
        spent holding the write lock. Driver errors are raised as SQLAlchemy's
        DBAPIError subclasses, as ``_write`` raises them.
        """
        error = engine.dialect.loaded_dbapi.Error
        with self._queued():
            pooled = engine.raw_connection()
            try:
                dbapi_conn = pooled.driver_connection
                assert dbapi_conn is not None
                try:
                    dbapi_conn.execute("BEGIN IMMEDIATE")
                    yield dbapi_conn
                    dbapi_conn.execute("COMMIT")
                    if self._checkpoints is not None:
                        self._checkpoints.wrote()
                except BaseException:
                    with contextlib.suppress(error):
                        dbapi_conn.execute("ROLLBACK")
                    raise
            except error as exc:
                raise DBAPIError.instance("BEGIN/COMMIT", None, exc, error) from exc
            finally:
                pooled.close()

    def write(self) -> contextlib.AbstractContextManager[Connection]:
        """A write transaction for the other stores of this index (``orders.py``)."""
        return self._write()

    # -- writes -----------------------------------------------------------------

    def _ingest(self) -> tuple[Engine, str | None]:
        """The engine instances are indexed with, and the WAL file to flush after.

        On SQLite in WAL mode: connections with ``synchronous=NORMAL`` that leave the
        WAL flush to :meth:`add_instances`, after the write lock is released (see
        storage/index/sqlite.py). Settled on first use, when the database exists and
        its journal mode is known, not while other processes may be creating it; if
        SQLite cannot be asked yet, this call uses the FULL engine and the next asks
        again.
        """
        if self._ingest_setup is not None:
            return self._ingest_setup
        with self._ingest_lock:
            if self._ingest_setup is None:
                try:
                    wal = _sqlite.wal_path(self.engine)
                except (OperationalError, DBAPIError):
                    return self.engine, None
                engine = (
                    _sqlite.make_engine(
                        self._settings.url,
                        busy_timeout_s=self._settings.busy_timeout_s,
                        synchronous="NORMAL",
                        checkpoints=self._checkpoints,
                    )
                    if wal
                    else self.engine
                )
                self._ingest_setup = (engine, wal)
            return self._ingest_setup

    def prepare_ingest(self) -> None:
        """Settle the engine instances are indexed with and open its first connection
        now (a receiver process at start), not inside the first acknowledgement: the
        engine, its pool and the connection's set-up were ~6 % of a receiver's samples
        in the first second of a transfer (py-spy, four associations; issue 19)."""
        engine, _ = self._ingest()
        with contextlib.suppress(OperationalError, DBAPIError):
            engine.raw_connection().close()  # (back into the pool, open)

    def add_instances(
        self, items: Sequence[NewInstance], *, sync: bool = True
    ) -> list[AddOutcome]:
        """Index ``items`` in one transaction; durable on return unless ``sync`` is
        False, and then once :meth:`sync_instances` has returned."""
        if not items:
            return []
        engine, wal = self._ingest()
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                if wal:
                    with self._raw_write(engine) as dbapi_conn:
                        outcomes, added = self._add(dbapi_conn, items)
                else:
                    with self._write(engine) as conn:
                        self._lock_keys(conn, (i.record.sop_instance_uid for i in items))
                        outcomes, added = self._add(conn.connection.dbapi_connection, items)
                break
            except (OperationalError, DBAPIError) as exc:
                if attempt < _ATTEMPTS and self._is_retryable(exc):
                    # Another receiver's transaction on the same rows won; ours sees
                    # its result on the next try (a duplicate, or the next version).
                    logger.info("index write retried after %s", type(exc.orig).__name__)
                    time.sleep(0.01 * attempt)
                    continue
                logger.error(
                    "index write failed: %s", type(exc.orig).__name__ if exc.orig else exc
                )
                raise OutOfResourcesError("index unavailable") from exc
        if len(self._series_cache) > 10_000:
            self._series_cache.clear()
        self._series_cache.update(added)
        if sync:
            self.sync_instances()
        return outcomes

    def sync_instances(self) -> None:
        """Make every ``add_instances`` committed before this call durable.

        On SQLite in WAL mode, their commits left the WAL unflushed (see
        storage/index/sqlite.py): one ``fdatasync`` of it, shared by the receiving
        threads that ask together (:class:`storage._flush.SharedFlush`). Elsewhere the
        commit itself was durable: nothing to do.

        Raises
        ------
        OutOfResourcesError
            The flush failed: the commits are not known to be durable.
        """
        setup = self._ingest_setup
        if setup is not None and setup[1]:
            self._wal_flush()

    def _sync_wal(self) -> None:
        setup = self._ingest_setup
        assert setup is not None and setup[1]
        try:
            _sqlite.sync_wal(setup[1])
        except OSError as exc:
            # Committed but not known durable: the sender is not told "stored" and
            # sends again, which finds the same bytes already indexed.
            logger.error("index WAL flush failed: %s", exc.strerror)
            raise OutOfResourcesError("index not durable") from exc

    def _prepare_statements(self) -> None:
        """Build the write statements once: constructing an upsert per call costs more
        than executing it (SQLAlchemy then reuses the compiled form)."""

        dialect = self.engine.dialect

        def upsert_stmt(
            table: Any, keys: list[str], conflict: list[str], update_cols: list[str]
        ) -> DirectStatement:
            stmt = self._upsert(table).values({k: bindparam(k) for k in keys})
            return DirectStatement(
                stmt.on_conflict_do_update(
                    index_elements=conflict, set_={k: stmt.excluded[k] for k in update_cols}
                ).returning(table.c.id),
                dialect,
            )

        # Demographics the record system set (HL7 ADT, FHIR Patient; issue 17) are not
        # overwritten by a modality's header: the row keeps them, and says so.
        stmt = self._upsert(patients).values({k: bindparam(k) for k in _PATIENT_KEYS})
        # A literal, not a bind parameter: DirectStatement binds only the row's values.
        recorded = patients.c.demographics_source == literal_column("'record'")
        self._patient_upsert = DirectStatement(
            stmt.on_conflict_do_update(
                index_elements=["patient_id", "issuer"],
                set_={
                    **{
                        k: case((recorded, patients.c[k]), else_=stmt.excluded[k])
                        for k in ("name", "name_key", "birth_date", "sex")
                    },
                    "updated_at": stmt.excluded["updated_at"],
                },
            ).returning(patients.c.id, patients.c.demographics_source),
            dialect,
        )
        self._study_upsert = upsert_stmt(
            studies, _STUDY_KEYS, ["study_instance_uid"], ["updated_at"]
        )
        self._series_upsert = upsert_stmt(
            series, _SERIES_KEYS, ["series_instance_uid"], ["updated_at"]
        )
        self._words_delete = DirectStatement(
            patient_name_words.delete().where(patient_name_words.c.patient_pk == bindparam("pk")),
            dialect,
        )
        self._words_insert = DirectStatement(
            self._upsert(patient_name_words)
            .values(word=bindparam("word"), patient_pk=bindparam("patient_pk"))
            .on_conflict_do_nothing(),
            dialect,
        )
        self._merged_into = DirectStatement(
            select(patient_links.c.surviving_pk).where(
                patient_links.c.obsolete_pk == bindparam("pk")
            ),
            dialect,
        )
        self._study_modality = DirectStatement(
            self._upsert(study_modalities)
            .values(study_pk=bindparam("study_pk"), modality=bindparam("modality"))
            .on_conflict_do_nothing(),
            dialect,
        )
        # One indexed UPDATE per series and transaction: what the roll-up reads.
        self._series_received = DirectStatement(
            update(series)
            .where(series.c.id == bindparam("pk"))
            .values(
                rollup_due_at=bindparam("at"),
                num_instances=series.c.num_instances + bindparam("added"),
            ),
            dialect,
        )
        # The statements of the receive path go straight to the driver (see
        # storage/index/direct.py); a batch looks its instances up one by one (an
        # expanding IN would be rendered anew on every execution).
        existing = select(instances.c.sop_instance_uid, instances.c.blob_key, instances.c.version)
        self._existing_one = DirectStatement(
            existing.where(instances.c.sop_instance_uid == bindparam("uid")), dialect
        )
        # IHE IOCM: a rejected SOP Instance is refused when sent again, unless it was
        # rejected because its retention ended; then it is restored (one primary-key
        # lookup per instance, in the same transaction as the insert: no race with
        # a rejection being applied).
        self._rejection_one = DirectStatement(
            select(rejections.c.code).where(rejections.c.sop_instance_uid == bindparam("uid")),
            dialect,
        )
        self._unreject = DirectStatement(
            rejections.delete().where(rejections.c.sop_instance_uid == bindparam("uid")), dialect
        )
        self._restore = DirectStatement(
            update(instances)
            .where(
                and_(
                    instances.c.sop_instance_uid == bindparam("uid"),
                    instances.c.blob_key == bindparam("key"),
                )
            )
            .values(is_current=bindparam("current")),
            dialect,
        )
        # Attribute corrections by re-send (a new version): the study row takes the new
        # values, the old ones go to study_versions first (issue 17.2).
        self._study_now = DirectStatement(
            select(studies.c.id, *(studies.c[k] for k in _STUDY_CORRECTABLE)).where(
                studies.c.study_instance_uid == bindparam("uid")
            ),
            dialect,
        )
        self._study_versions_n = DirectStatement(
            select(func.count(study_versions.c.id)).where(
                study_versions.c.study_instance_uid == bindparam("uid")
            ),
            dialect,
        )
        self._study_version_insert = DirectStatement(
            study_versions.insert().values(
                study_instance_uid=bindparam("uid"),
                version=bindparam("n"),
                previous_json=bindparam("previous"),
                cause=bindparam("cause"),
                cause_uid=bindparam("cause_uid"),
                changed_at=bindparam("at"),
            ),
            dialect,
        )
        self._study_correct = DirectStatement(
            update(studies)
            .where(studies.c.id == bindparam("pk"))
            .values(
                {**{k: bindparam(f"v_{k}") for k in _STUDY_CORRECTABLE},
                 "updated_at": bindparam("at")}
            ),
            dialect,
        )
        # The series' modality back in ModalitiesInStudy (a rejection may have removed
        # it, and the series row may be cached, so the per-series insert is skipped).
        self._restore_modality = DirectStatement(
            self._upsert(study_modalities)
            .from_select(
                ["study_pk", "modality"],
                select(series.c.study_pk, series.c.modality).where(
                    # A literal, not a bind: DirectStatement binds only named rows.
                    and_(series.c.id == bindparam("pk"), series.c.modality != literal_column("''"))
                ),
            )
            .on_conflict_do_nothing(),
            dialect,
        )
        self._supersede = DirectStatement(
            update(instances)
            .where(instances.c.sop_instance_uid == bindparam("uid"))
            .values(is_current=bindparam("current")),
            dialect,
        )
        self._insert_instance = DirectStatement(
            instances.insert().values({k: bindparam(k) for k in _INSTANCE_KEYS}), dialect
        )
        self._insert_job = DirectStatement(
            jobs.insert().values({k: bindparam(k) for k in _NEW_JOB_KEYS}), dialect
        )
        self._insert_mark = DirectStatement(
            journal_marks.insert().values(
                journal=bindparam("journal"), seq=bindparam("seq"),
                blob_key=bindparam("key"), location=bindparam("location"),
            ),
            dialect,
        )

    def _add(
        self, conn: Any, items: Sequence[NewInstance]
    ) -> tuple[list[AddOutcome], dict[str, int]]:
        """Index ``items`` on the DBAPI connection ``conn``, in its open transaction.

        On PostgreSQL the caller has taken the instances' advisory locks first, so
        that concurrent receivers of the same instance queue before any row lock
        (see storage/index/postgres.py); SQLite's writers are serialised already.
        """
        now = _now()
        series_pk: dict[str, int] = {}
        # Patient/study/series rows are written once per series: a series this process
        # has already indexed needs no upsert at all (its pk is cached), which keeps a
        # single-instance transaction to two INSERTs. Sorted, so that two transactions
        # take the row locks of the same series in the same order.
        for item in sorted(items, key=lambda i: i.record.series_instance_uid):
            rec = item.record
            uid = rec.series_instance_uid
            if uid in series_pk:
                continue
            cached = self._series_cache.get(uid)
            if cached is not None:
                series_pk[uid] = cached
                continue
            patient = _patient_values(rec, now)
            ((patient_pk, source),) = self._patient_upsert.execute(conn, [patient])
            if source != "record":
                # The name's words, for "starts with any part" searches; once per series
                # new to this process, like the patient upsert itself.
                self._words_delete.execute(conn, [{"pk": patient_pk}])
                words = name_words(patient["name_key"])
                self._words_insert.execute(
                    conn, [{"word": w, "patient_pk": patient_pk} for w in words]
                )
            # Images arriving under an identifier merged into another (IHE PIR A40,
            # issue 17) belong to the surviving patient; one key lookup per new series.
            merged = self._merged_into.execute(conn, [{"pk": patient_pk}])
            if merged:
                patient_pk = merged[0][0]
            study_pk = self._study_upsert.one(conn, _study_values(rec, patient_pk, now))
            pk = int(self._series_upsert.one(conn, _series_values(rec, study_pk, now)))
            series_pk[uid] = pk
            if rec.modality:
                # ModalitiesInStudy as a set per study (issue 21), once per new series.
                self._study_modality.execute(
                    conn, [{"study_pk": study_pk, "modality": rec.modality[:16]}]
                )
        uids = list({i.record.sop_instance_uid for i in items})
        existing: dict[str, list[tuple[str, int]]] = {}
        found = [r for uid in uids for r in self._existing_one.execute(conn, [{"uid": uid}])]
        for sop_instance_uid, blob_key, version in found:
            existing.setdefault(sop_instance_uid, []).append((blob_key, int(version)))
        rejected: dict[str, str] = {}
        for uid in uids:
            for (code,) in self._rejection_one.execute(conn, [{"uid": uid}]):
                rejected[uid] = str(code)

        outcomes: list[AddOutcome] = []
        received: dict[int, datetime] = {}
        added: dict[int, int] = {}
        rows: list[dict[str, Any]] = []
        job_rows: list[dict[str, Any]] = []
        replaced: list[str] = []
        corrections: list[NewInstance] = []
        for item in items:
            rec = item.record
            versions = existing.setdefault(rec.sop_instance_uid, [])
            code = rejected.get(rec.sop_instance_uid)
            if code is not None and code != _RETENTION_EXPIRED:
                outcomes.append(AddOutcome(rec.sop_instance_uid, "refused", 0, reason=code))
                continue
            same = [v for key, v in versions if key == item.blob_key]
            pk = series_pk[rec.series_instance_uid]
            if code is not None:
                # Rejected because its retention ended, and sent again: current again
                # (IHE RAD TF-2 4.66.4.1.3), this version or the same bytes' one.
                del rejected[rec.sop_instance_uid]
                self._unreject.execute(conn, [{"uid": rec.sop_instance_uid}])
                self._restore_modality.execute(conn, [{"pk": pk}])
                added[pk] = added.get(pk, 0) + 1
                received[pk] = max(received.get(pk, item.received_at), item.received_at)
                if same:
                    self._restore.execute(
                        conn, [{"uid": rec.sop_instance_uid, "key": item.blob_key,
                                "current": True}]
                    )
                    outcomes.append(AddOutcome(rec.sop_instance_uid, "restored", same[0]))
                    continue
            if same:
                outcomes.append(AddOutcome(rec.sop_instance_uid, "duplicate", same[0]))
                continue
            version = max((v for _, v in versions), default=0) + 1
            versions.append((item.blob_key, version))
            if version > 1:
                replaced.append(rec.sop_instance_uid)
                corrections.append(item)
            status: Literal["stored", "replaced", "restored"] = (
                "restored" if code is not None else "replaced" if version > 1 else "stored"
            )
            outcomes.append(AddOutcome(rec.sop_instance_uid, status, version))
            rows.append(_instance_values(item, pk, version))
            received[pk] = max(received.get(pk, item.received_at), item.received_at)
            if version == 1 and code is None:
                # A new version replaces a current one: count unchanged.
                added[pk] = added.get(pk, 0) + 1
            job_rows.append(
                {
                    "kind": "instance",
                    "target": rec.sop_instance_uid,
                    "status": "pending",
                    "correlation_id": item.correlation_id,
                    "created_at": now,
                    "updated_at": now,
                }
            )
        if replaced:
            self._supersede.execute(conn, [{"uid": uid, "current": False} for uid in replaced])
        if rows:
            self._insert_instance.execute(conn, rows)
            self._insert_job.execute(conn, job_rows)
            self._series_received.execute(
                conn,
                [
                    {"pk": pk, "at": at, "added": added.get(pk, 0)}
                    for pk, at in sorted(received.items())
                ],
            )
        for item in corrections:
            self._correct_study(conn, item, now)
        marks = [{"journal": i.journal_mark[0], "seq": i.journal_mark[1], "key": i.blob_key,
                  "location": i.journal_mark[2]}
                 for i in items if i.journal_mark is not None]
        if marks:  # whatever the outcome: the index has decided (storage/journal.py)
            self._insert_mark.execute(conn, marks)
        # The caller caches series_pk only once the transaction committed.
        return outcomes, series_pk

    def _correct_study(self, conn: Any, item: NewInstance, now: datetime) -> None:
        """A re-sent version's study attributes, if they differ: recorded, then current.

        Only attributes the new version carries (non-empty) change the row: a re-send
        that omits one corrects nothing (as dcm4chee-arc's default "supplement" policy).
        """
        rec = item.record
        found = self._study_now.execute(conn, [{"uid": rec.study_instance_uid}])
        if not found:
            return
        pk, *old = found[0]
        before = dict(zip(_STUDY_CORRECTABLE, (str(v or "") for v in old), strict=True))
        sent = _study_values(rec, 0, now)
        after = {k: (str(sent[k]) or before[k]) for k in _STUDY_CORRECTABLE}
        if after == before:
            return
        (n,) = self._study_versions_n.execute(conn, [{"uid": rec.study_instance_uid}])[0]
        self._study_version_insert.execute(conn, [{
            "uid": rec.study_instance_uid, "n": int(n) + 1,
            "previous": json.dumps(before, sort_keys=True), "cause": "resend",
            "cause_uid": rec.sop_instance_uid, "at": now,
        }])
        self._study_correct.execute(
            conn, [{"pk": pk, "at": now, **{f"v_{k}": v for k, v in after.items()}}]
        )
        logger.info("study %s corrected by a re-sent instance (%s): %s", rec.study_instance_uid,
                    rec.sop_instance_uid, ", ".join(k for k in after if after[k] != before[k]))

    # -- reads ------------------------------------------------------------------

    def _instance_select(self) -> Any:
        return select(
            instances.c.sop_instance_uid,
            instances.c.sop_class_uid,
            series.c.series_instance_uid,
            studies.c.study_instance_uid,
            instances.c.transfer_syntax_uid,
            instances.c.blob_key,
            instances.c.size,
            instances.c.version,
            instances.c.is_current,
            instances.c.received_at,
            instances.c.instance_number,
            instances.c.metadata_json,
            instances.c.metadata_z,
        ).select_from(
            instances.join(series, instances.c.series_pk == series.c.id).join(
                studies, series.c.study_pk == studies.c.id
            )
        )

    @staticmethod
    def _stored(row: Any) -> StoredInstance:
        values = row._asdict()
        values["metadata_json"] = unpack_metadata(
            values["metadata_json"], values.pop("metadata_z")
        )
        return StoredInstance(**values)

    def get_instance(self, sop_instance_uid: str) -> StoredInstance:
        with self._read() as conn:
            row = conn.execute(
                self._instance_select().where(
                    and_(instances.c.sop_instance_uid == sop_instance_uid, instances.c.is_current)
                )
            ).first()
        if row is None:
            raise NotFoundError(f"no instance {sop_instance_uid}")
        return self._stored(row)

    def instance_versions(self, sop_instance_uid: str) -> list[StoredInstance]:
        with self._read() as conn:
            rows = conn.execute(
                self._instance_select()
                .where(instances.c.sop_instance_uid == sop_instance_uid)
                .order_by(instances.c.version)
            ).all()
        return [self._stored(r) for r in rows]

    def series_instances(self, series_instance_uid: str) -> list[StoredInstance]:
        with self._read() as conn:
            rows = conn.execute(
                self._instance_select()
                .where(
                    and_(
                        series.c.series_instance_uid == series_instance_uid, instances.c.is_current
                    )
                )
                .order_by(instances.c.instance_number, instances.c.id)
            ).all()
        return [self._stored(r) for r in rows]

    def iter_instances(self) -> Iterator[StoredInstance]:
        with self._read() as conn:
            for row in conn.execute(self._instance_select().order_by(instances.c.id)):
                yield self._stored(row)

    def counts(self) -> dict[str, int]:
        """Rows per table and jobs per status, from the counters the triggers of
        migration 0006 keep (a few rows read, whatever the archive's size)."""
        out = dict.fromkeys(
            ("patients", "studies", "series", "instances", "instances_current"), 0
        )
        out.update(dict.fromkeys(("jobs_pending", "jobs_running", "jobs_done", "jobs_failed"), 0))
        query = select(index_counters.c.name, func.sum(index_counters.c.value)).group_by(
            index_counters.c.name
        )
        with self._read() as conn:
            for name, value in conn.execute(query):
                out[name] = int(value or 0)
        return out

    # -- jobs -------------------------------------------------------------------

    def claim_jobs(
        self,
        worker: str,
        *,
        kind: str | None = None,
        limit: int = 1,
        defer_arriving_s: float = 0.0,
        defer_busy_s: float = 0.0,
    ) -> list[Job]:
        """Claim up to ``limit`` pending jobs; a job tried before is claimed alone.

        Why alone: a job whose worker died under it may be what kills workers (a
        decoder crash, an out-of-memory kill). Run on its own, its ``attempts`` count
        its own runs, so :meth:`requeue_worker_jobs` can give it up without taking the
        jobs claimed beside it down too.

        With ``defer_arriving_s``, the ``instance`` jobs of a series that received an
        instance in the last ``defer_arriving_s`` seconds are left pending (issue 19):
        their work waits for the sender's pause instead of competing with the
        receivers for the CPU and the write lock, and then runs as one batch per series.
        With ``defer_busy_s`` (at least ``defer_arriving_s``), they also wait while any
        other series is arriving, up to ``defer_busy_s`` after their own series' last
        instance: the worker's reading and writing slowed the receivers of the next
        transfer by 20-28 % (issue 19, measured with the worker stopped and running), so
        it runs in the pauses between transfers, or when the wait is over. Deferred,
        never dropped: the job row was committed with the instance.
        """
        now = _now()
        cond = and_(jobs.c.status == "pending", jobs.c.not_before <= time.time())
        if kind is not None:
            cond = and_(cond, jobs.c.kind == kind)
        if defer_arriving_s > 0:
            clock = time.time()
            cutoff = datetime.fromtimestamp(clock - defer_arriving_s, UTC)
            waiting = series.c.rollup_due_at > cutoff
            if defer_busy_s > defer_arriving_s:
                # Its own series within the busy wait while any series arrives (its own
                # within ``defer_arriving_s`` is one): one index range each, the second
                # not correlated, so read once per statement.
                other = series.alias("other")
                waiting = and_(
                    series.c.rollup_due_at
                    > datetime.fromtimestamp(clock - defer_busy_s, UTC),
                    exists(select(other.c.id).where(other.c.rollup_due_at > cutoff)),
                )
            arriving = exists(
                select(instances.c.id)
                .select_from(instances.join(series, instances.c.series_pk == series.c.id))
                .where(and_(instances.c.sop_instance_uid == jobs.c.target, waiting))
            )
            cond = and_(cond, or_(jobs.c.kind != "instance", not_(arriving)))
        retried = select(jobs).where(and_(cond, jobs.c.attempts > 0)).order_by(jobs.c.id)
        fresh = select(jobs).where(and_(cond, jobs.c.attempts == 0)).order_by(jobs.c.id)
        if not self.is_sqlite:
            # Several workers on several machines share one queue (issue #8).
            retried = retried.with_for_update(skip_locked=True)
            fresh = fresh.with_for_update(skip_locked=True)
        # An idle worker polls twice a second: it looks in a read-only transaction
        # first, so an empty queue never takes the write lock (nor row locks) that
        # receivers' commits would queue behind (issue 21).
        with self._read() as conn:
            if conn.execute(select(jobs.c.id).where(cond).limit(1)).first() is None:
                return []
        with self._write() as conn:
            rows = conn.execute(retried.limit(1)).all()
            if not rows:
                rows = conn.execute(fresh.limit(limit)).all()
            if not rows:
                return []
            ids = [r.id for r in rows]
            conn.execute(
                update(jobs)
                .where(jobs.c.id.in_(ids))
                .values(
                    status="running",
                    claimed_by=worker,
                    claimed_at=now,
                    updated_at=now,
                    attempts=jobs.c.attempts + 1,
                )
            )
        return [
            Job(
                id=r.id,
                kind=r.kind,
                target=r.target,
                status="running",
                attempts=r.attempts + 1,
                correlation_id=r.correlation_id,
            )
            for r in rows
        ]

    def add_job(
        self, kind: str, target: str, *, correlation_id: str = "", delay_s: float = 0.0
    ) -> None:
        """Queue a job unless an unfinished one for the same target exists."""
        now = _now()
        with self._write() as conn:
            # Two workers' roll-ups must not both queue the same series (PostgreSQL).
            self._lock_keys(conn, [f"job:{kind}:{target}"])
            pending = conn.execute(
                select(jobs.c.id).where(
                    and_(
                        jobs.c.kind == kind,
                        jobs.c.target == target,
                        jobs.c.status.in_(("pending", "running")),
                    )
                )
            ).first()
            if kind == "series":
                # The roll-up is owed no more: this job will read every instance
                # committed so far; one received later sets the column again.
                conn.execute(
                    update(series)
                    .where(series.c.series_instance_uid == target)
                    .values(rollup_due_at=None)
                )
            if pending is None:
                conn.execute(
                    jobs.insert().values(
                        kind=kind,
                        target=target,
                        status="pending",
                        correlation_id=correlation_id,
                        not_before=time.time() + delay_s,
                        created_at=now,
                        updated_at=now,
                    )
                )

    def finish_job(self, job_id: int, *, result: dict[str, Any] | None = None) -> None:
        self.finish_jobs([(job_id, result or {})])

    def finish_jobs(self, done: Sequence[tuple[int, dict[str, Any]]]) -> None:
        """Mark several jobs done in one transaction (one WAL fsync, not one per job)."""
        if not done:
            return
        now = _now()
        with self._write() as conn:
            for job_id, result in done:
                conn.execute(
                    update(jobs)
                    .where(jobs.c.id == job_id)
                    .values(status="done", error="", updated_at=now, result_json=json.dumps(result))
                )

    def fail_job(self, job_id: int, error: str, *, retry_in_s: float | None = None) -> None:
        self.fail_jobs([(job_id, error, retry_in_s)])

    def fail_jobs(self, failed: Sequence[tuple[int, str, float | None]]) -> None:
        """Record several failed runs ``(job id, error, retry in s or None for failed
        for good)`` in one transaction, as :meth:`finish_jobs` does: a batch of
        instance jobs that fails (their files unreadable) wrote one transaction per
        job, each holding the write lock through a WAL fsync (issue 21)."""
        if not failed:
            return
        now = _now()
        with self._write() as conn:
            for job_id, error, retry_in_s in failed:
                values: dict[str, Any] = {"error": error[:2000], "updated_at": now}
                if retry_in_s is None:
                    values["status"] = "failed"
                else:
                    values.update(status="pending", not_before=time.time() + retry_in_s)
                conn.execute(update(jobs).where(jobs.c.id == job_id).values(**values))

    def prune_jobs(self, older_than_s: float, *, limit: int = 1000) -> int:
        """Delete up to ``limit`` finished instance jobs done ``older_than_s`` ago.

        The jobs table otherwise keeps one row per instance ever received (issue 21).
        Only ``instance`` jobs: a series job's result says where its pyramid is
        (:meth:`latest_job`), and failed jobs stay visible. Reads the oldest ``limit``
        done instance jobs through ``ix_jobs_status_kind``, never the whole table.
        """
        cutoff = datetime.fromtimestamp(time.time() - older_than_s, UTC)
        oldest = (
            select(jobs.c.id, jobs.c.updated_at)
            .where(and_(jobs.c.status == "done", jobs.c.kind == "instance"))
            .order_by(jobs.c.id)
            .limit(limit)
            .subquery()
        )
        # The comparison in SQL: each dialect compares its own stored timestamps.
        old_enough = select(oldest.c.id).where(oldest.c.updated_at <= cutoff)
        with self._read() as conn:
            ids = [r.id for r in conn.execute(old_enough)]
        if not ids:
            return 0
        with self._write() as conn:
            result = conn.execute(
                jobs.delete().where(and_(jobs.c.id.in_(ids), jobs.c.status == "done"))
            )
        return int(result.rowcount or 0)

    def get_jobs(self, *, target: str | None = None) -> list[Job]:
        query = select(jobs).order_by(jobs.c.id)
        if target is not None:
            query = query.where(jobs.c.target == target)
        with self._read() as conn:
            return [
                Job(
                    id=r.id,
                    kind=r.kind,
                    target=r.target,
                    status=r.status,
                    attempts=r.attempts,
                    correlation_id=r.correlation_id,
                    error=r.error,
                    result=json.loads(r.result_json or "{}"),
                )
                for r in conn.execute(query)
            ]

    def requeue_worker_jobs(self, worker: str, *, give_up_after: int = 0) -> int:
        """Jobs a worker of this name left running: it died, they go back to pending.

        With ``give_up_after``, a job already claimed that many times is ``failed``
        instead: its worker died under it again and again, so it is most likely what
        kills them (a poison input must not keep the queue in a crash loop).
        """
        return self._requeue(
            and_(jobs.c.status == "running", jobs.c.claimed_by == worker), give_up_after
        )

    def renew_jobs(self, worker: str, job_ids: Sequence[int]) -> int:
        if not job_ids:
            return 0
        with self._write() as conn:
            result = conn.execute(
                update(jobs)
                .where(
                    and_(
                        jobs.c.id.in_(list(job_ids)),
                        jobs.c.status == "running",
                        jobs.c.claimed_by == worker,
                    )
                )
                .values(claimed_at=_now())
            )
        return int(result.rowcount or 0)

    def requeue_stale_jobs(self, older_than_s: float, *, give_up_after: int = 0) -> int:
        cutoff = datetime.fromtimestamp(time.time() - older_than_s, UTC)
        return self._requeue(
            and_(jobs.c.status == "running", jobs.c.claimed_at < cutoff), give_up_after
        )

    def _requeue(self, cond: Any, give_up_after: int) -> int:
        now = _now()
        with self._write() as conn:
            if give_up_after:
                given_up = conn.execute(
                    update(jobs)
                    .where(and_(cond, jobs.c.attempts >= give_up_after))
                    .values(
                        status="failed",
                        updated_at=now,
                        error=f"its worker stopped while running it {give_up_after} times: "
                        "not retried, it may be what stops them",
                    )
                )
                if given_up.rowcount:
                    logger.error(
                        "%d jobs failed: their workers died under them %d times",
                        given_up.rowcount,
                        give_up_after,
                    )
            result = conn.execute(update(jobs).where(cond).values(status="pending", updated_at=now))
        return int(result.rowcount or 0)

    def set_metadata_json(self, sop_instance_uid: str, blob_key: str, metadata: str) -> None:
        """Store the DICOM JSON of one version (computed by the instance job)."""
        with self._write() as conn:
            conn.execute(
                update(instances)
                .where(
                    and_(
                        instances.c.sop_instance_uid == sop_instance_uid,
                        instances.c.blob_key == blob_key,
                    )
                )
                .values(dict(zip(("metadata_json", "metadata_z"), pack_metadata(metadata),
                                 strict=True)))
            )

    def set_metadata_many(self, items: Sequence[tuple[str, str, str]]) -> None:
        """Store the DICOM JSON of several versions, ``(sop_instance_uid, blob_key,
        metadata)`` each, in one transaction (a batch of instance jobs: one fsync)."""
        if not items:
            return
        stmt = (
            update(instances)
            .where(
                and_(
                    instances.c.sop_instance_uid == bindparam("uid"),
                    instances.c.blob_key == bindparam("key"),
                )
            )
            .values(metadata_json=bindparam("text"), metadata_z=bindparam("packed"))
        )
        rows = []
        for uid, key, metadata in items:
            packed_text, packed = pack_metadata(metadata)
            rows.append({"uid": uid, "key": key, "text": packed_text, "packed": packed})
        with self._write() as conn:
            conn.execute(stmt, rows)

    def series_arriving(self) -> bool:
        """True while any series has instances its roll-up has not taken yet (a
        transfer in progress, or just finished): idle-time work such as the scrub of
        originals waits for it. One read of ``ix_series_rollup_due_at``."""
        query = select(series.c.id).where(series.c.rollup_due_at.is_not(None)).limit(1)
        with self._read() as conn:
            return conn.execute(query).first() is not None

    def instances_after(
        self, after_id: int, *, limit: int = 100
    ) -> list[tuple[int, StoredInstance]]:
        """Up to ``limit`` instance versions with a row id above ``after_id``, in id
        order, with their ids: a cursor for walks over the archive in small steps."""
        query = (
            self._instance_select()
            .add_columns(instances.c.id.label("_row_id"))
            .where(instances.c.id > after_id)
            .order_by(instances.c.id)
            .limit(limit)
        )
        with self._read() as conn:
            rows = conn.execute(query).all()
        out = []
        for row in rows:
            values = row._asdict()
            row_id = int(values.pop("_row_id"))
            values["metadata_json"] = unpack_metadata(
                values["metadata_json"], values.pop("metadata_z")
            )
            out.append((row_id, StoredInstance(**values)))
        return out

    def series_due(self, quiet_s: float, *, limit: int = 50) -> list[str]:
        """Series quiet for ``quiet_s`` with instances newer than their last series job.

        The roll-up rule of issue #3: a series is complete when no instance arrived for
        the quiet period; a later instance (or a re-sent version) makes it due again.
        The receiver sets ``series.rollup_due_at`` with each instance and
        :meth:`add_job` clears it, so this is a range of ``ix_series_rollup_due_at``
        read in a read-only transaction: its cost follows what changed, not the
        archive (issue 21).
        """
        cutoff = datetime.fromtimestamp(time.time() - quiet_s, UTC)
        query = (
            select(series.c.series_instance_uid)
            .where(series.c.rollup_due_at <= cutoff)
            .order_by(series.c.rollup_due_at)
            .limit(limit)
        )
        with self._read() as conn:
            return [r.series_instance_uid for r in conn.execute(query)]

    def data_version(self) -> int | None:
        """A number that moves when someone may have committed work for the job worker,
        read without a query; None where there is no such signal (an in-memory
        database, a PostgreSQL listener not connected): the caller then reads the tables.

        SQLite: ``PRAGMA data_version``, which moves on every commit of another
        connection (read from the WAL index, a few microseconds). PostgreSQL: the
        notifications received on a listening connection of its own
        (:class:`storage.index.postgres.WorkListener`), which the triggers of migration
        0012 send from each transaction that creates or re-queues a pending job or adds
        instances; it moves once more after the listener reconnects, as notifications
        sent meanwhile are lost. The idle worker polls it instead of the job queue
        (issue 21): unchanged, no job was added or made claimable by a commit since
        its last look.
        """
        return self._data_version.read() if self._data_version is not None else None

    def next_due(self, waits: Sequence[float] = ()) -> float | None:
        """When time alone, with no commit, next makes work due (epoch seconds); None
        if nothing will: the earliest future ``not_before`` of a pending job (a retry's
        back-off, a delayed job), and for each of ``waits`` (a series' quiet period,
        the deferral of its instance jobs) the moment the next series whose roll-up is
        owed passes it. Two ranges of ``ix_series_rollup_due_at``; the pending jobs by
        ``ix_jobs_status_kind`` (few when the worker is idle, which is when it asks).
        """
        now = time.time()
        out: list[float] = []
        with self._read() as conn:
            for wait in waits:
                cutoff = datetime.fromtimestamp(now - wait, UTC)
                first = conn.execute(
                    select(func.min(series.c.rollup_due_at)).where(
                        series.c.rollup_due_at > cutoff
                    )
                ).scalar()
                if first is not None:
                    if first.tzinfo is None:
                        first = first.replace(tzinfo=UTC)
                    out.append(first.timestamp() + wait)
            retry = conn.execute(
                select(func.min(jobs.c.not_before)).where(
                    and_(jobs.c.status == "pending", jobs.c.not_before > now)
                )
            ).scalar()
            if retry is not None:
                out.append(float(retry))
        return min(out, default=None)

    def latest_job(self, kind: str, target: str, *, status: str = "done") -> Job | None:
        """The newest job of a kind for a target, e.g. where a series' pyramid is."""
        query = (select(jobs).where(and_(jobs.c.kind == kind, jobs.c.target == target,
                                         jobs.c.status == status))
                 .order_by(jobs.c.id.desc()).limit(1))
        with self._read() as conn:
            r = conn.execute(query).first()
        if r is None:
            return None
        return Job(id=r.id, kind=r.kind, target=r.target, status=r.status, attempts=r.attempts,
                   correlation_id=r.correlation_id, error=r.error,
                   result=json.loads(r.result_json or "{}"))

    def journal_marks(self, journal: str) -> set[int]:
        with self._read() as conn:
            return {
                int(seq)
                for (seq,) in conn.execute(
                    select(journal_marks.c.seq).where(journal_marks.c.journal == journal)
                )
            }

    def journal_locations(self, blob_key: str) -> list[str]:
        with self._read() as conn:
            return [
                str(loc)
                for (loc,) in conn.execute(
                    select(journal_marks.c.location)
                    .where(journal_marks.c.blob_key == blob_key, _LOCATED_AND_REFERENCED)
                    .order_by(journal_marks.c.seq.desc())
                )
            ]

    def pending_originals(self) -> list[tuple[str, str]]:
        with self._read() as conn:
            return [
                (str(key), str(loc))
                for key, loc in conn.execute(
                    select(journal_marks.c.blob_key, journal_marks.c.location)
                    .where(_LOCATED_AND_REFERENCED)
                    .order_by(journal_marks.c.seq)
                )
            ]

    def drop_journal_locations(self, blob_key: str) -> None:
        with self._write() as conn:
            conn.execute(
                update(journal_marks)
                .where(journal_marks.c.blob_key == blob_key, journal_marks.c.location != "")
                .values(location="")
            )

    def forget_journal_marks(self, journal: str, upto: int | None = None) -> None:
        condition = journal_marks.c.journal == journal
        if upto is not None:
            condition = and_(condition, journal_marks.c.seq < upto)
        with self._write() as conn:
            conn.execute(journal_marks.delete().where(condition))

    def blob_referenced(self, key: str) -> bool:
        with self._read() as conn:
            return (
                conn.execute(
                    select(instances.c.id).where(instances.c.blob_key == key).limit(1)
                ).first()
                is not None
            )

    # -- queries (QIDO-RS, WADO-RS metadata, FHIR search; see queries.py) ------------

    def _read(self) -> Connection:
        """A connection for read-only queries (a deferred BEGIN on SQLite)."""
        return self.engine.connect().execution_options(**{_sqlite.READ_ONLY: True})

    @staticmethod
    def _resolve(conn: Connection, query: Query) -> Query | None:
        """``query`` with its ModalitiesInStudy wildcards resolved into the archive's
        matching modalities (``Query.modality_values``), and its keyset anchor
        (``Query.after``) into its order key; None when a wildcard matches none.

        Raises
        ------
        InvalidQueryError
            ``after`` on a search other than of studies, or naming no study.
        """
        if query.after is not None:
            if query.level != "study":
                raise InvalidQueryError("after pages study searches only")
            anchor = conn.execute(after_key_query(query)).first()
            if anchor is None:
                raise InvalidQueryError("after names no study")
            query = replace(query, after_key=tuple(anchor))
        patterns = modality_wildcards(query)
        if not patterns:
            return query
        resolved = tuple(
            (p, tuple(conn.execute(modality_values_query(p)).scalars())) for p in patterns
        )
        if not all(values for _p, values in resolved):
            return None
        return replace(query, modality_values=resolved)

    def find(self, query: Query) -> list[dict[str, Any]]:
        """Rows matching ``query``, keyed by DICOM keyword (plus ``patient_pk`` …)."""
        with self._read() as conn:
            resolved = self._resolve(conn, query)
            if resolved is None:
                return []
            rows: list[dict[str, Any]] | None = None
            window = newest_window(resolved)
            if window is not None:
                floor = conn.execute(newest_floor_query(window)).scalar()
                if floor is not None:
                    rows = self._rows(conn, replace(resolved, newer_than_pk=int(floor)))
                    if len(rows) < (resolved.limit or 0):
                        rows = None  # not a full page: only the whole archive tells
            if rows is None:
                rows = self._rows(conn, resolved)
        for row in rows:
            if "metadata_z" in row:
                row["metadata_json"] = unpack_metadata(
                    row.get("metadata_json"), row.pop("metadata_z")
                )
        return rows

    @staticmethod
    def _rows(conn: Connection, query: Query) -> list[dict[str, Any]]:
        result = conn.execute(find_query(query))
        keys = list(result.keys())  # once, not a mapping view per row
        return [dict(zip(keys, row, strict=True)) for row in result]

    def count(self, query: Query, at_most: int | None = None) -> int:
        """How many rows ``query`` matches without its limit and offset; with
        ``at_most``, the count stops at ``at_most + 1``."""
        with self._read() as conn:
            resolved = self._resolve(conn, query)
            if resolved is None:
                return 0
            return int(conn.execute(count_query(resolved, at_most)).scalar_one())

    def instance_metadata(
        self,
        study_instance_uid: str,
        series_instance_uid: str | None = None,
        sop_instance_uid: str | None = None,
    ) -> list[MetadataRow]:
        """Current instances of a study, series or instance, in one query."""
        stmt = metadata_query(study_instance_uid, series_instance_uid, sop_instance_uid)
        with self._read() as conn:
            return [
                MetadataRow(
                    row[0], row[1], row[2], row[3], row[4], row[5], unpack_metadata(row[6], row[7])
                )
                for row in conn.execute(stmt)
            ]

    def read(self) -> Connection:
        """A read-only connection for the other readers of this index (the viewer)."""
        return self._read()

    def ping(self) -> bool:
        try:
            with self._read() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception:
            return False

    def close(self) -> None:
        if self._checkpoints is not None:
            self._checkpoints.close()
        if self._data_version is not None:
            self._data_version.close()
        if self._ingest_setup is not None and self._ingest_setup[0] is not self.engine:
            self._ingest_setup[0].dispose()
        self.engine.dispose()
        if self._write_lock is not None:
            self._write_lock.close()
