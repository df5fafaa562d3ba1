"""Tables of the metadata index (SQLAlchemy Core), one definition for SQLite and PostgreSQL.

Patient → study → series → instance mirrors the DICOM information model (PS3.3 A.1.2).
Counts per series and per study are derived by per-study queries. Whole-table counts
(``/metrics``) are kept in ``index_counters`` by triggers (migration 0006), sharded by
connection on PostgreSQL, so parallel receivers do not queue on one counter row and no
request counts a table. Nothing periodic reads a table whole (issue 21): the worker's
roll-up finds quiet series through ``series.rollup_due_at``, searches by person name
and modality go through indexed keys (``patients.name_key``, ``study_modalities``).

Every version of an instance is a row: a re-sent SOP Instance UID with other bytes
adds a version and keeps the old one (``is_current`` marks the newest). An instance
rejected by IHE IOCM has no current version (``rejections`` says why).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

__all__ = [
    "index_counters",
    "instances",
    "jobs",
    "journal_marks",
    "lab_files",
    "lab_reports",
    "lab_results",
    "metadata",
    "mpps",
    "order_versions",
    "orders",
    "patient_name_words",
    "patients",
    "rejections",
    "scheduled_steps",
    "series",
    "shares",
    "studies",
    "study_links",
    "study_modalities",
    "study_versions",
]

# Deterministic constraint names keep Alembic migrations identical on both dialects.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

UID = String(64)  # PS3.5 9.1: a UID is at most 64 characters

# Search keys compare byte-wise (code point order) on both dialects: SQLite's BINARY
# collation is the default, PostgreSQL needs "C" so that a prefix range and LIKE 'x%'
# use the B-tree index whatever the database's locale (PostgreSQL 11.9 "Operator
# Classes and Operator Families").
SEARCH_KEY = String(512).with_variant(String(512, collation="C"), "postgresql")

patients = Table(
    "patients",
    metadata,
    Column("id", Integer, primary_key=True),
    # PatientID is unique only together with its issuer (PS3.3 C.7.1.1 Issuer of Patient ID).
    Column("patient_id", String(64), nullable=False),
    Column("issuer", String(64), nullable=False, server_default=""),
    Column("name", String(324), nullable=False, server_default=""),
    Column("birth_date", String(8), nullable=False, server_default=""),
    Column("sex", String(16), nullable=False, server_default=""),
    # core.person_name.person_name_key(name): case- and accent-folded, indexed, so
    # PatientName=TRẦN* is a range scan that also finds "Trần" and "TRAN".
    Column("name_key", SEARCH_KEY, nullable=False, server_default=""),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # Migration 0008_pir: "record" once the record system set the demographics (HL7
    # ADT, FHIR Patient; issue 17): images received later no longer overwrite them.
    Column("demographics_source", String(16), nullable=False, server_default=""),
    UniqueConstraint("patient_id", "issuer", name="uq_patients_patient_id_issuer"),
    Index("ix_patients_name_key", "name_key"),
)

studies = Table(
    "studies",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("study_instance_uid", UID, nullable=False, unique=True),
    Column("patient_pk", ForeignKey("patients.id"), nullable=False, index=True),
    Column("study_date", String(8), nullable=False, server_default="", index=True),
    Column("study_time", String(16), nullable=False, server_default=""),
    Column("accession_number", String(16), nullable=False, server_default="", index=True),
    Column("study_id", String(16), nullable=False, server_default=""),
    Column("description", String(64), nullable=False, server_default=""),
    Column("referring_physician_name", String(324), nullable=False, server_default=""),
    Column("institution_name", String(64), nullable=False, server_default=""),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, index=True),
)

series = Table(
    "series",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("series_instance_uid", UID, nullable=False, unique=True),
    Column("study_pk", ForeignKey("studies.id"), nullable=False, index=True),
    Column("modality", String(16), nullable=False, server_default="", index=True),
    Column("series_number", Integer),
    Column("description", String(64), nullable=False, server_default=""),
    Column("series_date", String(8), nullable=False, server_default=""),
    Column("series_time", String(16), nullable=False, server_default=""),
    Column("body_part_examined", String(16), nullable=False, server_default=""),
    Column("laterality", String(16), nullable=False, server_default=""),
    Column("station_name", String(16), nullable=False, server_default=""),
    Column("pps_start_date", String(8), nullable=False, server_default=""),
    Column("pps_start_time", String(16), nullable=False, server_default=""),
    Column("updated_at", DateTime(timezone=True), nullable=False, index=True),
    # When the newest instance arrived, while the series' roll-up is owed: set by the
    # receiver with each instance, cleared when the series job is queued. The worker's
    # roll-up reads only the rows past their quiet period (an index range), not every
    # instance's received_at.
    Column("rollup_due_at", DateTime(timezone=True), index=True),
    # Current instances of the series, kept by the receiver in the same UPDATE:
    # per-study counts then read the study's few series rows, not its instances.
    Column("num_instances", Integer, nullable=False, server_default="0"),
)

# Each word of a patient's folded name (components, groups, words of name_key), for
# "starts with any part" searches (QIDO fuzzymatching, FHIR Patient?name=): a prefix
# range of this index instead of a LIKE '%…' over every name. Written with the
# patient row by the receiver and the order reconciliation (storage.index.sql).
patient_name_words = Table(
    "patient_name_words",
    metadata,
    Column("word", SEARCH_KEY, primary_key=True),
    Column("patient_pk", ForeignKey("patients.id"), primary_key=True),
    Index("ix_patient_name_words_patient_pk", "patient_pk"),
)

# ModalitiesInStudy (PS3.18 Table 10.6.1-5) as a per-study set, written by the
# receiver with a new series; indexed by modality so ModalitiesInStudy=CT is a range.
study_modalities = Table(
    "study_modalities",
    metadata,
    Column("study_pk", ForeignKey("studies.id"), primary_key=True),
    Column("modality", String(16), primary_key=True),
    Index("ix_study_modalities_modality", "modality", "study_pk"),
)

# Row counts kept by triggers (migration 0006): ``name`` is a table ("instances") or
# a job status ("jobs_done"); PostgreSQL spreads a name over shards by backend pid.
index_counters = Table(
    "index_counters",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("shard", Integer, primary_key=True, autoincrement=False),
    Column("value", BigInteger, nullable=False, server_default="0"),
)

instances = Table(
    "instances",
    metadata,
    Column("id", Integer, primary_key=True),
    # Looked up through uq_instances_sop_blob and ix_instances_current (their leading
    # columns): single-column indexes on these would only cost the receiver an extra
    # B-tree insert per instance (dropped in 0006).
    Column("sop_instance_uid", UID, nullable=False),
    Column("series_pk", ForeignKey("series.id"), nullable=False),
    Column("sop_class_uid", UID, nullable=False),
    Column("transfer_syntax_uid", UID, nullable=False),
    Column("instance_number", Integer),
    Column("rows", Integer),
    Column("columns", Integer),
    Column("number_of_frames", Integer),
    Column("bits_allocated", Integer),
    Column("photometric_interpretation", String(16), nullable=False, server_default=""),
    # SHA-256 of the data set as received: the original's key in the store.
    Column("blob_key", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("version", Integer, nullable=False),
    Column("is_current", Boolean, nullable=False),
    Column("calling_ae", String(16), nullable=False, server_default=""),
    Column("received_at", DateTime(timezone=True), nullable=False),
    # DICOM JSON of the header (PS3.18 F.2) so /metadata is one query, no file reads.
    # Since 0006 written zlib-compressed to metadata_z (metadata_json then ""): it
    # was over half of the index's bytes. Rows of older versions keep the text.
    Column("metadata_json", Text, nullable=False, server_default="{}"),
    Column("metadata_z", LargeBinary),
    UniqueConstraint("sop_instance_uid", "blob_key", name="uq_instances_sop_blob"),
    Index("ix_instances_current", "series_pk", "is_current"),
    # "Is this original still used?" (a failed receive's undo, retention) was a scan.
    Index("ix_instances_blob_key", "blob_key"),
)

# The original journal's marks (storage/journal.py, migration 0015): one row per
# journaled instance, committed with its index row without flushing the WAL. After a
# power cut, a record of the journal with no mark here is replayed. Kept only until the
# record's segment is written out.
journal_marks = Table(
    "journal_marks",
    metadata,
    Column("journal", String(32), primary_key=True),
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    # The original's content key and where its record is: how readers find an original
    # not written out yet (storage/originals.py).
    Column("blob_key", String(64), nullable=False, index=True),
    Column("location", String(160), nullable=False),
)

# IHE IOCM (migration 0008): one row per rejected SOP Instance UID, the authority for
# "was this rejected, why". The rejected versions themselves stay in ``instances`` with
# ``is_current`` false, which is what hides them from every read (queries.py, sql.py),
# until an explicit purge deletes them (``purged_at``). The row outlives the purge so a
# later C-STORE of the same UID is still refused (storage/index/rejection.py).
rejections = Table(
    "rejections",
    metadata,
    Column("sop_instance_uid", UID, primary_key=True),
    Column("study_instance_uid", UID, nullable=False, index=True),
    Column("series_instance_uid", UID, nullable=False, server_default=""),
    Column("code", String(16), nullable=False),  # PS3.16 CID 7011
    Column("source", String(16), nullable=False),  # kos | api
    # The rejection note's SOP Instance UID ("" for the API).
    Column("note_uid", String(64), nullable=False, server_default=""),
    Column("rejected_by", String(128), nullable=False, server_default=""),
    Column("rejected_at", DateTime(timezone=True), nullable=False),
    Column("purged_at", DateTime(timezone=True)),
)

# Attribute corrections of a study (issue 17.2, migration 0008): when a re-sent
# instance (a new version, ``instances.version`` > 1) carries other study attributes,
# the ``studies`` row takes the new values (QIDO-RS, C-FIND and FHIR answer with them)
# and the values it had are kept here, one row per change: never an overwrite without
# a record. The instance versions themselves all stay (``instances``).
study_versions = Table(
    "study_versions",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("study_instance_uid", UID, nullable=False, index=True),
    Column("version", Integer, nullable=False),
    # The study's attributes before this change (sql.py ``_STUDY_CORRECTABLE``), JSON.
    Column("previous_json", Text, nullable=False),
    Column("cause", String(16), nullable=False),  # resend
    Column("cause_uid", String(64), nullable=False, server_default=""),  # SOP Instance UID
    Column("changed_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("study_instance_uid", "version", name="uq_study_versions_study_version"),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("kind", String(16), nullable=False),  # "instance" | "series"
    Column("target", UID, nullable=False),  # SOP Instance UID or Series Instance UID
    Column("status", String(16), nullable=False),  # pending | running | done | failed
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("error", Text, nullable=False, server_default=""),
    Column("correlation_id", String(32), nullable=False, server_default=""),
    Column("claimed_by", String(64), nullable=False, server_default=""),
    Column("claimed_at", DateTime(timezone=True)),
    Column("not_before", Float, nullable=False, server_default="0"),
    Column("result_json", Text, nullable=False, server_default="{}"),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Index("ix_jobs_status_kind", "status", "kind"),
    # Pattern ops on PostgreSQL: kind LIKE 'fwd:%' uses it under any collation (0013).
    Index("ix_jobs_target", "kind", "target", postgresql_ops={"kind": "varchar_pattern_ops"}),
)


# ----------------------------------------------------------------- orders (issue #4)
#
# An order is one Requested Procedure (PS3.3 C.4.11-C.4.12) as placed by the record
# system. ``orders`` holds the current version, with the identifiers and the
# demographics as ordered in columns (searchable) and the whole worklist item as JSON
# (what C-FIND answers from); every version is kept in ``order_versions``, which is
# also the change feed (FHIR ``_lastUpdated``). ``scheduled_steps`` has one row per
# Scheduled Procedure Step, indexed the way modalities poll: "my station, today"
# (see ``worklist/ports.py``).

orders = Table(
    "orders",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("public_id", String(64), nullable=False, unique=True),  # FHIR ServiceRequest.id
    Column("placer_order_number", String(64), nullable=False, server_default="", index=True),
    Column("filler_order_number", String(64), nullable=False, server_default=""),
    # Assigned at scheduling; NULL only inside the creating transaction.
    Column("accession_number", String(16), unique=True),
    Column("requested_procedure_id", String(16), nullable=False, server_default=""),
    Column("study_instance_uid", UID, unique=True),
    Column("status", String(16), nullable=False, index=True),
    Column("version", Integer, nullable=False),
    Column("source", String(16), nullable=False, server_default=""),
    # Patient as ordered (PS3.3 C.2.2): the reference when images are reconciled.
    Column("patient_id", String(64), nullable=False, server_default="", index=True),
    Column("issuer", String(64), nullable=False, server_default=""),
    Column("patient_name", String(324), nullable=False, server_default=""),
    Column("birth_date", String(8), nullable=False, server_default=""),
    Column("sex", String(16), nullable=False, server_default=""),
    Column("item_json", Text, nullable=False),
    Column("linked_study_uid", UID, nullable=False, server_default=""),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, index=True),
)

order_versions = Table(
    "order_versions",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("order_pk", ForeignKey("orders.id"), nullable=False),
    Column("version", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    # placed | changed | cancelled | step | images | linked
    Column("event", String(16), nullable=False),
    Column("source", String(16), nullable=False, server_default=""),
    Column("item_json", Text, nullable=False),
    Column("changed_at", DateTime(timezone=True), nullable=False, index=True),
    UniqueConstraint("order_pk", "version", name="uq_order_versions_order_version"),
)

# Steps a modality may still pick (worklist.model.OFFERED), for the partial index.
_OFFERED_SQL = text("status IN ('SCHEDULED', 'ARRIVED')")

scheduled_steps = Table(
    "scheduled_steps",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("order_pk", ForeignKey("orders.id"), nullable=False, index=True),
    Column("step_id", String(16), nullable=False),
    Column("station_ae_title", String(16), nullable=False, server_default=""),
    Column("modality", String(16), nullable=False, server_default=""),
    # Local wall-clock time, as DICOM DA/TM carry it (no offset).
    Column("start_at", DateTime(timezone=False), nullable=False),
    Column("status", String(16), nullable=False),
    UniqueConstraint("order_pk", "step_id", name="uq_scheduled_steps_order_step"),
    Index("ix_sps_station_start", "station_ae_title", "start_at"),
    Index("ix_sps_modality_start", "modality", "start_at"),
    Index("ix_sps_start", "start_at"),
    Index(
        "ix_sps_offered_start",
        "start_at",
        sqlite_where=_OFFERED_SQL,
        postgresql_where=_OFFERED_SQL,
    ),
)

# Modality Performed Procedure Steps (PS3.4 F.7): attributes as DICOM JSON (PS3.18 F.2).
mpps = Table(
    "mpps",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("sop_instance_uid", UID, nullable=False, unique=True),
    Column("status", String(16), nullable=False),
    Column("version", Integer, nullable=False),
    Column("attributes_json", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

# Reconciliation: one row per received study. ``order_pk`` NULL means "unmatched"
# (listed by the API until someone links it). ``original_json`` keeps the
# modality's patient/study values that the order's replaced.
study_links = Table(
    "study_links",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("study_instance_uid", UID, nullable=False, unique=True),
    Column("order_pk", ForeignKey("orders.id"), index=True),
    Column("matched_by", String(32), nullable=False, server_default=""),
    Column("accession_number", String(16), nullable=False, server_default=""),
    Column("requested_procedure_id", String(16), nullable=False, server_default=""),
    Column("original_json", Text, nullable=False, server_default="{}"),
    Column("first_seen_at", DateTime(timezone=True), nullable=False),
    Column("linked_at", DateTime(timezone=True)),
)


# -- lab results (issue 5; migration 0003) ------------------------------------------
# A file's hash is journaled in the same transaction as its results (``status``
# "ingested"), then "filed" once moved out of the inbox: after a crash a file whose
# hash is journaled is only moved, never ingested twice.
lab_files = Table(
    "lab_files",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("sha256", String(64), nullable=False, unique=True),
    Column("name", String(255), nullable=False),
    Column("profile", String(64), nullable=False),
    Column("format", String(16), nullable=False),
    Column("status", String(16), nullable=False),  # ingested | filed
    Column("message_count", Integer, nullable=False),
    Column("result_count", Integer, nullable=False),
    Column("duplicates", Integer, nullable=False, server_default="0"),
    Column("summary_json", Text, nullable=False, server_default="{}"),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("filed_at", DateTime(timezone=True)),
)

# One row per order / specimen: what a FHIR DiagnosticReport groups.
lab_reports = Table(
    "lab_reports",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("report_id", String(64), nullable=False, unique=True),
    Column("specimen_id", String(64), nullable=False, server_default="", index=True),
    Column("placer_order_id", String(64), nullable=False, server_default="", index=True),
    Column("filler_order_id", String(64), nullable=False, server_default="", index=True),
    Column("patient_id", String(64), nullable=False, server_default="", index=True),
    Column("patient_name", String(324), nullable=False, server_default=""),
    Column("is_qc", Boolean, nullable=False),
    Column("analyzer", String(64), nullable=False, server_default=""),
    # Migration 0005: the patient as a row of ``patients`` (the Patient id space imaging
    # uses), its issuer as sent, and the ordered panel (HL7 OBR-4, ASTM O.5).
    Column("patient_pk", ForeignKey("patients.id"), index=True),
    Column("patient_issuer", String(64), nullable=False, server_default=""),
    Column("order_code", String(64), nullable=False, server_default=""),
    Column("order_system", String(64), nullable=False, server_default=""),
    Column("order_display", String(255), nullable=False, server_default=""),
    # DiagnosticReport.status of its current results (storage.lab.report_status),
    # kept at every ingest and resolution so that it is searchable.
    Column("status", String(24), nullable=False, server_default="", index=True),
    # No order known yet: the "unmatched" queue. order_ref names the order once linked.
    Column("unmatched", Boolean, nullable=False),
    Column("order_ref", String(64), nullable=False, server_default=""),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, index=True),
)

# Every version of every result. observation_id is the logical result (its series:
# specimen + test + sub-ID); a correction or re-send adds a version, keeping the old.
lab_results = Table(
    "lab_results",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("observation_id", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("is_current", Boolean, nullable=False),
    Column("supersedes_pk", Integer),
    Column("file_pk", ForeignKey("lab_files.id"), nullable=False, index=True),
    Column("report_pk", ForeignKey("lab_reports.id"), nullable=False, index=True),
    Column("location", String(255), nullable=False, server_default=""),
    Column("message_index", Integer, nullable=False),
    Column("position", Integer, nullable=False),
    Column("control_id", String(64), nullable=False, server_default=""),
    Column("format", String(16), nullable=False, server_default=""),
    Column("analyzer", String(64), nullable=False, server_default=""),
    Column("instrument_id", String(64), nullable=False, server_default=""),
    Column("test_code", String(64), nullable=False, index=True),
    Column("test_system", String(64), nullable=False, server_default=""),
    Column("test_display", String(255), nullable=False, server_default=""),
    Column("loinc", String(16), nullable=False, server_default="", index=True),
    Column("loinc_display", String(255), nullable=False, server_default=""),
    Column("test_raw", Text, nullable=False, server_default=""),
    Column("sub_id", String(32), nullable=False, server_default=""),
    Column("value_type", String(8), nullable=False, server_default=""),
    Column("raw_value", Text, nullable=False, server_default=""),
    Column("value_text", Text, nullable=False, server_default=""),
    Column("value", Float),
    Column("comparator", String(2), nullable=False, server_default=""),
    Column("coded_value", Text, nullable=False, server_default=""),
    Column("unit", String(64), nullable=False, server_default=""),
    Column("ucum_unit", String(64), nullable=False, server_default=""),
    Column("reference_range", String(64), nullable=False, server_default=""),
    Column("reference_low", Float),
    Column("reference_high", Float),
    Column("flags_json", Text, nullable=False, server_default="[]"),
    Column("status", String(16), nullable=False, server_default=""),
    Column("status_code", String(8), nullable=False, server_default=""),
    Column("specimen_id", String(64), nullable=False, server_default="", index=True),
    Column("placer_order_id", String(64), nullable=False, server_default="", index=True),
    Column("filler_order_id", String(64), nullable=False, server_default="", index=True),
    Column("performed_at", DateTime(timezone=True), index=True),
    Column("is_qc", Boolean, nullable=False),
    Column("patient_id", String(64), nullable=False, server_default="", index=True),
    Column("patient_name", String(324), nullable=False, server_default=""),
    Column("patient_birth_date", String(10), nullable=False, server_default=""),
    Column("patient_sex", String(16), nullable=False, server_default=""),
    Column("comments_json", Text, nullable=False, server_default="[]"),
    Column("is_critical", Boolean, nullable=False),
    Column("critical_reason", String(64), nullable=False, server_default=""),
    Column("unmatched", Boolean, nullable=False),
    Column("order_ref", String(64), nullable=False, server_default="", index=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, index=True),
    # Migration 0005: the patient row, and the review state of a result whose
    # specimen/test was reported for another patient first ("conflict": held, not
    # made current over the other patient's result; see storage/index/lab.py).
    Column("patient_pk", ForeignKey("patients.id"), index=True),
    Column("patient_issuer", String(64), nullable=False, server_default=""),
    Column("review", String(16), nullable=False, server_default="", index=True),
    Column("conflict_with", String(64), nullable=False, server_default=""),
    Column("conflict_patient_pk", Integer),
    UniqueConstraint("observation_id", "version", name="uq_lab_results_observation_version"),
    Index("ix_lab_results_current", "observation_id", "is_current"),
)

#: Share links (issue 17 item 4, migration 0008): one study, until ``expires_at``, to
#: whoever holds the token; only the token's SHA-256 is kept (core/sharing.py).
shares = Table(
    "shares",
    metadata,
    Column("share_id", String(16), primary_key=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("study_instance_uid", UID, nullable=False, index=True),
    Column("note", String(200), nullable=False, server_default=""),
    Column("created_by", String(128), nullable=False, server_default=""),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True)),
    Column("revoked_by", String(128), nullable=False, server_default=""),
)
