"""The one Settings object (STYLE.md §4): pydantic-settings, prefix ``PACSLAB_``, ``__`` nesting.

Built once per process by the composition root (``pacslab/``) and handed to each
component as its own section. There is deliberately no module-level instance.

Sources, highest priority first: constructor arguments, environment variables
(``PACSLAB_DICOM__PORT=11112``), an optional config file named by ``PACSLAB_CONFIG``
(``.toml``, ``.yaml``/``.yml``), then the defaults below.
"""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

__all__ = [
    "NON_SETTING_VARIABLES",
    "AnalyzerSettings",
    "AtnaSettings",
    "AuditSettings",
    "AuthSettings",
    "DaskSettings",
    "DicomSettings",
    "ForwardingDestination",
    "ForwardingRule",
    "ForwardingSettings",
    "HttpSettings",
    "IndexSettings",
    "IngestSettings",
    "LabCriticalLimit",
    "LabDelimitedSettings",
    "LabProfileSettings",
    "LabSettings",
    "LogSettings",
    "OhifSettings",
    "OrdersSettings",
    "ProcessingSettings",
    "QueryRetrieveSettings",
    "RemoteAE",
    "RetentionRule",
    "RetentionSettings",
    "Settings",
    "SigningSettings",
    "StorageSettings",
    "UnknownSettingError",
    "WorklistSettings",
    "check_unknown_settings",
    "known_setting_names",
]


class IndexSettings(BaseModel):
    """Metadata index location: any SQLAlchemy URL.

    Empty means ``sqlite:///<data_dir>/index.db`` (filled in by :class:`Settings`).
    """

    url: str = ""
    #: Seconds a writer waits for SQLite's lock before giving up with 0xA700.
    busy_timeout_s: float = 30.0
    #: Run Alembic migrations on start-up.
    migrate: bool = True


class StorageSettings(BaseModel):
    """Where originals and Zarr pyramids live. Empty means under ``data_dir``.

    Both may be object storage: ``originals_url`` / ``zarr_url`` as fsspec URLs
    (``s3://bucket/prefix``), with ``storage_options`` handed to fsspec (for S3:
    ``endpoint_url``, ``client_kwargs``…; credentials come from the usual
    ``AWS_*`` environment variables, not from here). The local file system stays the
    embedded default; received files are staged under ``originals_dir`` either way.
    """

    originals_dir: Path | None = None
    #: ``s3://bucket/originals`` (any fsspec URL) to keep originals in object storage.
    originals_url: str = ""
    zarr_url: str = ""
    #: fsspec options for object-store URLs, e.g. ``{"endpoint_url": "http://…:9000"}``.
    storage_options: dict[str, Any] = Field(default_factory=dict)
    quarantine_dir: Path | None = None
    #: fsync every acknowledged file. Only tests of throughput without it turn it off.
    fsync: bool = True
    #: MiB of original journal per receiving process (storage/journal.py): a burst of
    #: instances up to this size is made durable with one data flush each, and written
    #: out as ordinary files once the receiver is idle. Zero-filled at start (this much
    #: disk per receiver process, and per HTTP process for STOW-RS, while running); 0 off.
    journal_mb: int = Field(default=512, ge=0, le=65536)

    @field_validator("originals_url", "zarr_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        # A typo such as "s3:/bucket" would otherwise become a local directory.
        scheme, sep, rest = value.partition("://")
        if sep and (not scheme.isidentifier() or not rest.strip("/")):
            raise ValueError(f"not a storage URL: {value!r}")
        if value and not sep and value.startswith(("s3:", "gs:", "az:")):
            raise ValueError(f"storage URL needs '://': {value!r}")
        return value


def _ip_networks(value: list[str], where: str) -> list[str]:
    """A source allow-list: each entry an IP address or CIDR network."""
    import ipaddress

    for item in value:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError as exc:
            raise ValueError(f"{where}: {item!r} is not an IP or CIDR network") from exc
    return value


class DicomSettings(BaseModel):
    """The DICOM receiver (PS3.8 upper layer, PS3.7 DIMSE)."""

    ae_title: str = "PACSLAB"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=0, le=65535)
    #: Calling AE titles allowed to associate; empty allows any (PS3.8 A-ASSOCIATE-RJ 3).
    allowed_calling_aes: list[str] = Field(default_factory=list)
    #: Our Maximum Length Received (PS3.8 D.1). Large PDUs mean far fewer Python calls
    #: per instance; 0 would mean unlimited, which some SCUs mishandle.
    max_pdu: int = Field(4_194_304, ge=0)
    #: Receiver processes sharing the listening socket (0: :func:`receiver_count`, two
    #: per CPU core).
    workers: int = Field(0, ge=0)
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    #: Seconds an established association may stay silent before we close it; also
    #: pynetdicom's network timeout. Idle associations hold slots a modality needs.
    network_timeout_s: float = Field(30.0, gt=0)
    #: ARTIM (PS3.8 9.1.5): seconds a new connection has to send its whole
    #: A-ASSOCIATE-RQ before it is closed.
    artim_timeout_s: float = Field(10.0, gt=0)
    #: Connections per process, counted from accept (negotiating ones included).
    max_associations: int = Field(32, ge=1)
    #: Most of those one calling AE title (or one IP address before its A-ASSOCIATE-RQ
    #: is read) may hold; 0: half of ``max_associations``. So one peer that floods or
    #: leaks associations cannot lock the other modalities out.
    max_associations_per_ae: int = Field(0, ge=0)
    #: The A-ASSOCIATE-RQ is a few KiB (PS3.8 9.3.2); a longer one is rejected unread.
    max_associate_rq_bytes: int = Field(65536, ge=1024)
    #: A DIMSE command set is a few hundred bytes (PS3.7 9.3); fragments of one past
    #: this abort the association instead of being buffered.
    max_command_bytes: int = Field(65536, ge=1024)
    #: Largest data set of one C-STORE (as received; streamed to disk, never held in
    #: memory). A larger one aborts the association.
    max_dataset_bytes: int = Field(4 << 30, ge=1 << 20)
    #: Deflated Explicit VR Little Endian (PS3.5 A.5): most bytes one data set may
    #: inflate to, and most inflated bytes per received byte (zlib tops out near
    #: 1032:1, real data sets compress far less). Beyond either: refused, 0xC000.
    max_inflated_bytes: int = Field(4 << 30, ge=1 << 20)
    max_inflate_ratio: int = Field(200, ge=2)
    #: Refuse to start while ``allowed_calling_aes`` (and the worklist's list) is empty,
    #: i.e. while any calling AE title would be served.
    require_ae_allow_list: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None

    @field_validator("ae_title")
    @classmethod
    def _check_ae_title(cls, value: str) -> str:
        # PS3.5 6.2: AE is 1-16 chars of the default repertoire, no backslash/control.
        stripped = value.strip()
        if not 1 <= len(stripped) <= 16 or "\\" in stripped or not stripped.isprintable():
            raise ValueError("AE title must be 1-16 printable characters without backslash")
        return stripped

    @model_validator(mode="after")
    def _check_tls(self) -> DicomSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("dicom.tls_cert and dicom.tls_key must be set together")
        if self.require_ae_allow_list and not self.allowed_calling_aes:
            raise ValueError(
                "dicom.require_ae_allow_list is set but dicom.allowed_calling_aes is empty"
            )
        return self

    @property
    def per_ae_limit(self) -> int:
        """Associations one calling AE (or IP address) may hold at once."""
        return self.max_associations_per_ae or max(1, self.max_associations // 2)


class HttpSettings(BaseModel):
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=0, le=65535)
    #: Who may show /viewer in a frame: CSP ``frame-ancestors`` sources (CSP Level 3
    #: §7.7.3). ``'self'`` by default; add the EMR's origin (``https://emr.example``) to
    #: let it embed the viewer, or ``'none'`` to forbid framing.
    viewer_frame_ancestors: list[str] = Field(default_factory=lambda: ["'self'"])

    @field_validator("viewer_frame_ancestors")
    @classmethod
    def _check_frame_ancestors(cls, value: list[str]) -> list[str]:
        # Each entry goes verbatim into a header: no spaces, semicolons or commas.
        source = re.compile(r"'self'|'none'|https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?|"
                            r"https://\*\.[A-Za-z0-9.-]+")
        bad = [v for v in value if not source.fullmatch(v)]
        if bad or not value:
            raise ValueError("http.viewer_frame_ancestors: 'self', 'none' or http(s) origins")
        if "'none'" in value and len(value) > 1:
            raise ValueError("http.viewer_frame_ancestors: 'none' stands alone")
        return value

    #: The URL clients reach the API at (``https://pacs.example.org``, behind a
    #: proxy), used for every absolute URL the API writes (RetrieveURL, BulkDataURI,
    #: FHIR fullUrl). Empty: the scheme and local address the request arrived on;
    #: never the ``Host`` header, which any client can forge (issue 14.9).
    public_url: str = ""
    #: Origins whose browser pages may call the API (CORS, Fetch standard): a JSON
    #: list such as ``["https://viewer.example.org"]``; ``["*"]`` allows any origin.
    #: Empty: same-origin only (no ``Access-Control-*`` headers are sent).
    cors_origins: list[str] = Field(default_factory=list)

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str) -> str:
        from urllib.parse import urlsplit

        if not value:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("http.public_url must be an absolute http(s) URL")
        if parts.query or parts.fragment or "@" in parts.netloc:
            raise ValueError("http.public_url takes no credentials, query or fragment")
        return value.rstrip("/")

    @field_validator("cors_origins")
    @classmethod
    def _check_origins(cls, value: list[str]) -> list[str]:
        from urllib.parse import urlsplit

        out = []
        for origin in value:
            if origin == "*":
                out.append(origin)
                continue
            parts = urlsplit(origin)
            # An origin is scheme://host[:port] (RFC 6454 6.2): a path would never match.
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path.strip("/"):
                raise ValueError(f"http.cors_origins: {origin!r} is not scheme://host[:port]")
            out.append(f"{parts.scheme}://{parts.netloc}".lower())
        return out
    #: Seconds a client has, from connecting (or the first byte of a later request on
    #: the connection), to send the whole request head; then 408 and closed (slowloris).
    header_timeout_s: float = Field(10.0, gt=0)
    #: Seconds an idle kept-alive connection stays open between requests.
    keep_alive_s: int = Field(5, ge=1)


class DaskSettings(BaseModel):
    #: ``tcp://host:8786`` for a distributed cluster; empty runs a local threaded scheduler.
    scheduler: str = ""
    workers: int = Field(0, ge=0)


class ProcessingSettings(BaseModel):
    #: Seconds without a new instance before a series is considered complete.
    series_quiet_s: float = Field(10.0, ge=0)
    poll_interval_s: float = Field(0.5, gt=0)
    #: Seconds a series must go without a new instance before its instance jobs
    #: (DICOM JSON, forwarding, order reconciliation) run, as one batch per series:
    #: during a transfer the worker leaves the CPU and the index's write lock to the
    #: receivers (issue 19). Capped at ``series_quiet_s``; 0 runs them at once.
    instance_defer_s: float = Field(2.0, ge=0)
    #: While any other series is arriving, a series' instance jobs wait up to this
    #: long after its last instance (capped at ``series_quiet_s``): the next transfer
    #: is received at full speed and the jobs run in its pause (issue 19). At or below
    #: ``instance_defer_s``: only the series' own arrivals defer them.
    instance_defer_busy_s: float = Field(10.0, ge=0)
    #: Jobs the worker claims at once (instance jobs of one series share one metadata
    #: transaction and one header read per study for the order reconciliation).
    batch: int = Field(64, ge=1, le=1000)
    #: Stored originals re-hashed against their content key per idle turn of the
    #: worker, when no series is arriving (the scrub; 0 turns it off).
    scrub_per_idle: int = Field(8, ge=0, le=1000)
    #: Share of one core the scrub may use, in percent (issue 21): after a turn that
    #: took t seconds of CPU it waits t * (100 / scrub_cpu_pct - 1), as RAID and ZFS
    #: scrubs are throttled. 1 % re-hashes about 5-10 MB of originals a second here.
    scrub_cpu_pct: float = Field(1.0, gt=0, le=100)
    #: Nice value of the worker's threads (Linux: per thread, inherited by the Dask
    #: threads they start). 10 gives a receiver at 0 about nine tenths of a contended
    #: core; 19 would also starve the pyramids behind any unrelated load on the host.
    nice: int = Field(10, ge=0, le=19)
    max_attempts: int = Field(3, ge=1)
    #: Seconds after its claim that a ``running`` job counts as abandoned by a worker
    #: that died and did not come back under its name; any worker then requeues it.
    #: Longer than the slowest job (a large series conversion), or it would run twice.
    lease_s: float = Field(600.0, gt=0)
    #: Seconds a finished instance job is kept before the worker deletes it (issue 21:
    #: the jobs table kept one row per instance forever). Series jobs and failed jobs
    #: are kept. 0 keeps them all.
    done_job_retention_s: float = Field(86400.0, ge=0)
    #: The name of a ``pacslab worker`` process (its claims carry ``<host>-<name>``);
    #: several worker processes on one host each need their own, or one restarting
    #: would take back the jobs the others are running.
    worker_name: str = Field("worker", min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_.-]+$")

    @field_validator("worker_name")
    @classmethod
    def _not_embedded(cls, value: str) -> str:
        if value == "embedded":
            raise ValueError("'embedded' is the worker of pacslab serve; choose another name")
        return value


class IngestSettings(BaseModel):
    #: Seconds a dropped lab file must keep the same size and mtime before it is read.
    lab_stable_s: float = Field(1.0, ge=0)
    lab_rescan_s: float = Field(5.0, gt=0)
    #: Largest lab file read (bytes); larger ones are rejected unread. A profile may
    #: set its own (``LabProfileSettings.max_bytes``). Parsing takes a few times this
    #: in memory, so it bounds the watcher's memory too (issue 14.2).
    lab_max_bytes: int = Field(64 * 1024 * 1024, gt=0)
    #: Seconds a quiet lab file may stay incomplete (no ASTM L record / EOT, no HL7
    #: BTS/FTS, still open for writing) before it is rejected with its reason.
    lab_incomplete_s: float = Field(900.0, gt=0)
    #: Seconds a temporary name (``.x``, ``x.tmp``) may stay untouched before it is
    #: set aside as abandoned (a writer that died before its rename).
    lab_abandoned_s: float = Field(3600.0, gt=0)


class LabDelimitedSettings(BaseModel):
    """A declarative vendor export layout (``ingest.labs.parsers.delimited.DelimitedProfile``).

    Kept as plain data here because ``core`` imports nothing of ours; the lab watcher
    turns it into a ``DelimitedProfile`` (and that class validates the column names).
    """

    columns: dict[str, str]
    delimiter: str = ";"
    quotechar: str | None = '"'
    encoding: str = "utf-8"
    decimal_comma: bool = False
    header_row: int = Field(0, ge=0)
    date_format: str = "%Y%m%d"
    time_format: str | None = None
    birth_date_format: str = "%Y%m%d"
    exponent_base: int = 10
    #: Vendor test code → ``"code"`` or ``"code^display^system"`` (``system`` ``LN``
    #: for LOINC, HL7 table 0396), added as an alternate coding.
    test_code_map: dict[str, str] = Field(default_factory=dict)
    test_system: str = "local"
    instrument_id: str = ""
    flag_separator: str | None = None
    qc_specimen_prefixes: list[str] = Field(default_factory=list)


class LabProfileSettings(BaseModel):
    """One analyzer inbox: ``<data_dir>/inbox/lab/<name>/`` (issue 5).

    ``format`` is ``auto`` (ASTM E1394/E1381 or HL7 v2 told apart by the first
    bytes), ``delimited`` (then ``delimited`` describes the layout), or the name of a
    registered parser (``astm``, ``hl7v2``, ``cobas_c111``).
    """

    format: str = "auto"
    #: Character set of ASTM record text; empty tries UTF-8 and falls back to
    #: Latin-1 (ASTM E1394 §6.1 says ASCII; analyzers send either). HL7 v2 uses MSH-18.
    encoding: str = ""
    #: In HL7 batch files, leave out orders/ACKs mixed with results (each is named in
    #: the summary); a file with no result message at all is still rejected.
    skip_non_results: bool = True
    #: Analyzer name recorded when the message names none (ASTM H.5, HL7 MSH-3).
    analyzer: str = ""
    #: Decimal mark of ASTM/HL7 values (issue 18): ``auto`` reads a comma as the
    #: decimal mark where unambiguous (``7,85`` yes, ``1,234`` no), ``comma`` always,
    #: ``point`` never (a comma makes the value text). Delimited profiles use
    #: ``delimited.decimal_comma``.
    decimal_mark: Literal["auto", "point", "comma"] = "auto"
    delimited: LabDelimitedSettings | None = None
    #: Largest file of this inbox (bytes); None: ``IngestSettings.lab_max_bytes``.
    max_bytes: int | None = Field(None, gt=0)
    #: Issuer of the Patient IDs this analyzer sends when the message names none
    #: (ASTM P records carry no assigning authority); empty: ``lab.patient_issuer``.
    patient_issuer: str = Field("", max_length=64)

    @field_validator("patient_issuer")
    @classmethod
    def _check_issuer(cls, value: str) -> str:
        return value.strip().removeprefix("urn:oid:")  # as LabSettings.patient_issuer

    @model_validator(mode="after")
    def _check_delimited(self) -> LabProfileSettings:
        if (self.format == "delimited") != (self.delimited is not None):
            raise ValueError("a lab profile has a 'delimited' section iff format=delimited")
        return self


class LabCriticalLimit(BaseModel):
    """Critical (panic) limits of one test: a value below ``low`` or above ``high``."""

    low: float | None = None
    high: float | None = None


class LabSettings(BaseModel):
    """Lab result inboxes, critical values and their announcement (issue 5)."""

    #: Inbox name → profile. ``auto`` always exists so a first user can drop a file
    #: without configuring anything.
    profiles: dict[str, LabProfileSettings] = Field(
        default_factory=lambda: {"auto": LabProfileSettings()}
    )
    #: Test code (the sender's code or LOINC) → critical limits. Flags ``HH``/``LL``
    #: (HL7 table 0078 "panic" limits) from the analyzer also mark a value critical.
    critical: dict[str, LabCriticalLimit] = Field(default_factory=dict)
    #: POSTed a small JSON notice for each new critical result and each result held
    #: as a patient conflict (issue 14); empty for none. Failures are logged and never
    #: hold up ingestion.
    critical_webhook_url: str = ""
    critical_webhook_timeout_s: float = Field(5.0, gt=0)
    #: Analyzer clocks without an offset are read in this zone (IANA name); FHIR R4
    #: dateTime needs a zone whenever it has a time (R4 §2.24.0.1 dateTime).
    local_timezone: str = "UTC"
    #: Watch the inboxes in ``pacslab serve``.
    watch: bool = True
    #: Issuer of Patient ID (assigning authority) of lab patients whose message names
    #: none (ASTM P records, exports, HL7 without PID-3.4): the hospital's own system.
    #: Empty keeps "no issuer", the value imaging uses when Issuer of Patient ID is absent.
    patient_issuer: str = Field("", max_length=64)

    @field_validator("profiles")
    @classmethod
    def _check_profiles(cls, value: dict[str, LabProfileSettings]) -> dict[str, LabProfileSettings]:
        value = dict(value)
        value.setdefault("auto", LabProfileSettings())
        for name in value:
            # The name is a folder: refuse anything that could leave the inbox.
            if (
                not name
                or name.startswith(".")
                or "/" in name
                or "\\" in name
                or name
                in {
                    "processed",
                    "rejected",
                }
            ):
                raise ValueError(f"lab profile name {name!r} cannot be an inbox folder name")
        return value

    @field_validator("local_timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"lab.local_timezone {value!r} is not an IANA time zone") from exc
        return value

    @field_validator("patient_issuer")
    @classmethod
    def _check_issuer(cls, value: str) -> str:
        # Kept as Issuer of Patient ID keeps an OID (bare digits), so that the FHIR
        # system urn:oid:<oid> searches it (api.fhir.imaging.issuer_for_system).
        return value.strip().removeprefix("urn:oid:")

    @field_validator("critical_webhook_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("lab.critical_webhook_url must be an http(s) URL")
        return value


class WorklistSettings(BaseModel):
    """Modality Worklist (PS3.4 Annex K) and MPPS (Annex F) behaviour.

    The PN options are what PS3.4 C.2.2.2.1.1 lets an SCP choose; the conformance
    statement must say which were chosen.
    """

    #: Match Person Name keys insensitive to case (PS3.4 C.2.2.2.1.1).
    pn_case_insensitive: bool = True
    #: Match Person Name keys insensitive to accents, so ``NGUYEN^VAN AN`` finds
    #: ``NGUYỄN^VĂN AN`` (PS3.4 C.2.2.2.1.1 and its Note 1).
    pn_accent_insensitive: bool = True
    #: Most C-FIND responses per query; one more match ends with 0xA700.
    max_results: int = Field(500, ge=1)
    #: Calling AE titles whose Modality Worklist C-FIND and MPPS we serve; empty
    #: serves any (a WARNING at start-up says so). Checked per request, on top of
    #: ``dicom.allowed_calling_aes`` (which gates every association).
    allowed_calling_aes: list[str] = Field(default_factory=list)


class OrdersSettings(BaseModel):
    """Orders from the record system: HL7 v2 inbox and MLLP, scheduling, reconciliation.

    ``PACSLAB_ORDERS__MLLP_PORT=2575`` etc. The inbox folder is
    ``<data_dir>/inbox/orders`` (:attr:`Settings.orders_inbox`).
    """

    #: MLLP listener for ORM^O01 / OMI^O23 (HL7 v2.5.1 Appendix C); 0 turns it off.
    mllp_port: int = Field(2575, ge=0, le=65535)
    mllp_host: str = "0.0.0.0"
    #: Seconds a dropped order file must keep the same size and mtime before it is read.
    stable_s: float = Field(1.0, ge=0)
    #: Seconds between full rescans of the inbox (watchdog events can be lost).
    rescan_s: float = Field(5.0, gt=0)
    #: Largest order file read (bytes); larger ones are rejected unread.
    inbox_max_bytes: int = Field(16 * 1024 * 1024, gt=0)
    #: Seconds a quiet order file may stay incomplete (HL7 batch without BTS/FTS,
    #: still open for writing) before it is rejected with its reason.
    incomplete_s: float = Field(900.0, gt=0)
    #: Seconds a temporary name may stay untouched before it is set aside.
    abandoned_s: float = Field(3600.0, gt=0)
    #: Largest MLLP message (bytes); a larger one is answered MSA-1 ``AR`` and
    #: drained (up to ``mllp_drain_bytes``), never silently dropped (issue 13.11).
    mllp_max_message_bytes: int = Field(16 * 1024 * 1024, gt=0)
    #: Bytes of an oversize message read and discarded to find its end block;
    #: past it the connection is closed after the AR.
    mllp_drain_bytes: int = Field(256 * 1024 * 1024, gt=0)
    #: A connection silent this long between messages is closed.
    mllp_idle_timeout_s: float = Field(300.0, gt=0)
    #: A message must arrive whole within this many seconds of its first byte
    #: (slowloris senders are cut off).
    mllp_message_timeout_s: float = Field(60.0, gt=0)
    #: Connections served at once; more are closed at once.
    mllp_max_connections: int = Field(32, ge=1)
    #: IPs or CIDR networks allowed to connect (JSON list:
    #: ``PACSLAB_ORDERS__MLLP_ALLOWED_SOURCES='["10.1.2.0/24"]'``); empty: anyone,
    #: with a warning at start (issue 14.9).
    mllp_allowed_sources: list[str] = Field(default_factory=list)

    @field_validator("mllp_allowed_sources")
    @classmethod
    def _check_sources(cls, value: list[str]) -> list[str]:
        return _ip_networks(value, "orders.mllp_allowed_sources")
    #: Modality of a step when the order names none (OBR-24 empty; FHIR without code).
    default_modality: str = "OT"
    #: Scheduled Station AE Title per modality, when the order names no station.
    station_by_modality: dict[str, str] = Field(default_factory=dict)
    #: Prefix of the Accession Numbers we assign (SH: 16 characters in all).
    accession_prefix: str = Field("A", max_length=6)
    #: UID root of generated Study Instance UIDs; empty uses pydicom's root.
    uid_root: str = ""
    #: On reconciliation the order's patient demographics replace the modality's
    #: (the modality's are kept beside the link).
    demographics_from_order: bool = True
    #: POST a small JSON to this URL on every order status change; empty: no webhook.
    webhook_url: str = ""
    webhook_timeout_s: float = Field(5.0, gt=0)

    @field_validator("uid_root")
    @classmethod
    def _check_uid_root(cls, value: str) -> str:
        # PS3.5 9.1: digits and dots; pydicom wants the prefix to end with a dot.
        if value and (not value.endswith(".") or not value.replace(".", "").isdigit()):
            raise ValueError("orders.uid_root must be digits and dots, ending with a dot")
        if len(value) > 40:
            raise ValueError("orders.uid_root leaves too little room for a UID (64 chars)")
        return value


class AuthSettings(BaseModel):
    """HTTP authentication: OAuth2 bearer JWTs (RFC 6750, RFC 7519) and device API keys.

    With neither ``jwks_path`` nor ``jwks_url`` the service is its own issuer: an ES256
    key is created under ``<data_dir>/keys`` on first run and ``pacslab token`` signs
    tokens with it (the embedded default). Tests of other components turn the whole
    check off with ``enabled=False`` (``PACSLAB_AUTH__ENABLED=false``); nothing else does.
    """

    enabled: bool = True
    #: Expected ``iss`` (RFC 7519 4.1.1). Empty: ``urn:pacslab:local`` (embedded issuer).
    issuer: str = ""
    #: Expected ``aud`` (RFC 7519 4.1.3).
    audience: str = "pacslab"
    #: JWK Set (RFC 7517 5) of the identity provider, as a file or an https URL.
    jwks_path: Path | None = None
    jwks_url: str = ""
    jwks_cache_s: float = Field(default=300.0, ge=0)
    #: Accepted ``alg`` values (RFC 7518 3.1); ``none`` and HMAC are never accepted.
    algorithms: list[Literal["RS256", "ES256"]] = Field(
        default_factory=lambda: ["RS256", "ES256"]  # type: ignore[arg-type]
    )
    #: Clock skew tolerated on ``exp``/``nbf`` (RFC 7519 4.1.4).
    leeway_s: int = Field(default=30, ge=0, le=300)
    #: Paths served without credentials: exact paths, or prefixes ending in ``/``.
    public_paths: list[str] = Field(
        default_factory=lambda: [
            "/health",
            "/docs",
            "/docs/oauth2-redirect",
            "/redoc",
            "/openapi.json",
            # The viewer page and its scripts hold no patient data; /viewer/api/ does.
            "/viewer",
            # Deep links an EMR opens (the same page; the token is in the #fragment).
            "/viewer/studies/",
            # A share link's page (issue 17); its token is in the fragment too.
            "/viewer/shared",
            "/static/",
            # OHIF Viewer (issue 20): its page, bundles and codecs hold no patient data;
            # what it fetches from /dicomweb needs the token.
            "/ohif",
            "/ohif/",
            # FHIR R4 3.1.0.4 / SMART App Launch: clients read the CapabilityStatement
            # before they have a token (it holds no patient data).
            "/fhir/metadata",
            # SMART App Launch 2.0: discovery happens before a client has a token.
            "/fhir/.well-known/smart-configuration",
        ]
    )
    #: The embedded issuer's private key (PEM, P-256). Empty: ``<data_dir>/keys/token-es256.pem``.
    local_key: Path | None = None
    #: Lifetime of tokens ``pacslab token`` prints.
    token_ttl_s: int = Field(default=3600, ge=60)
    #: Wrong API keys one client address may send in a burst, and how many a second
    #: it gets back; beyond that it is answered 429 before any check (a flood of
    #: wrong keys must not buy scrypt time, RFC 7914). Behind a reverse proxy every
    #: client shares the proxy's address: raise these there.
    failed_auth_burst: int = Field(default=10, ge=1)
    failed_auth_per_s: float = Field(default=0.5, gt=0)
    #: The identity provider's OAuth2 token / authorization endpoints, advertised in the
    #: FHIR CapabilityStatement and SMART configuration. Empty (the embedded issuer has
    #: none: tokens come from ``pacslab token``): not advertised.
    token_endpoint: str = ""
    authorization_endpoint: str = ""

    @model_validator(mode="after")
    def _check_source(self) -> AuthSettings:
        if self.jwks_path is not None and self.jwks_url:
            raise ValueError("set auth.jwks_path or auth.jwks_url, not both")
        if self.jwks_url and not self.jwks_url.startswith(
            ("https://", "http://127.", "http://localhost")
        ):
            raise ValueError("auth.jwks_url must be https (or loopback http for tests)")
        return self

    @property
    def is_local(self) -> bool:
        """True when the service issues its own tokens (no identity provider configured)."""
        return self.jwks_path is None and not self.jwks_url


class AtnaSettings(BaseModel):
    """ATNA: every action-log entry also sent as a DICOM audit message over syslog.

    PS3.15 A.5 messages in RFC 5424 syslog to one collector (IHE ITI-20), besides the
    hash-chained log: ``tls://host:6514`` (RFC 5425, the IHE transport), ``tcp://host:601``
    (RFC 6587 octet counting) or ``udp://host:514`` (RFC 5426). Empty: not sent.
    Sending never delays a request: a bounded queue and one sender thread; when the
    collector is away the queue fills, then entries are dropped and counted
    (``pacslab_atna_dropped_total``); the hash-chained log keeps them all.
    """

    url: str = ""
    #: CA bundle (PEM) the collector's certificate must chain to (tls only); empty:
    #: the system's trust store.
    ca_file: Path | None = None
    #: Client certificate and key (PEM) for collectors that ask for one (tls only).
    client_cert: Path | None = None
    client_key: Path | None = None
    #: AuditSourceID (PS3.15 A.5.1) and AuditEnterpriseSiteID; empty source: the host name.
    source_id: str = Field("", max_length=64)
    enterprise_site: str = Field("", max_length=64)
    #: Messages waiting for the collector; beyond it new ones are dropped and counted.
    queue_max: int = Field(10_000, ge=1)
    connect_timeout_s: float = Field(5.0, gt=0)
    #: Reconnection waits double from 0.5 s up to this.
    backoff_max_s: float = Field(30.0, gt=0)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        from urllib.parse import urlsplit

        if not value:
            return value
        parts = urlsplit(value)
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError("audit.atna.url: bad port") from exc
        if parts.scheme not in ("tls", "tcp", "udp") or not parts.hostname or port is None:
            raise ValueError("audit.atna.url must be tls://host:port, tcp://host:port "
                             "or udp://host:port")
        if parts.path.strip("/") or parts.query or parts.username:
            raise ValueError("audit.atna.url takes only a scheme, host and port")
        return value

    @model_validator(mode="after")
    def _check_client(self) -> AtnaSettings:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("audit.atna.client_cert and client_key go together")
        return self


class AuditSettings(BaseModel):
    """The hash-chained action log (audit_events table, FHIR R4 AuditEvent export)."""

    enabled: bool = True
    #: A background thread writes what was queued at most this often (one transaction).
    flush_interval_s: float = Field(default=0.2, gt=0)
    batch_max: int = Field(default=1000, ge=1)
    #: Entries kept in memory while the database cannot take them; more are dropped
    #: with an ERROR (a C-STORE is never refused because the log is away, STYLE.md §5).
    max_pending: int = Field(default=100_000, ge=1)
    #: C-STORE is logged per association and study (PS3.15 A.5.3 DICOM Instances
    #: Transferred: the study, its SOP Classes and instance counts), written when the
    #: association ends or after this many seconds of an open transfer. 0: one entry
    #: per stored instance.
    store_summary_s: float = Field(default=5.0, ge=0, le=3600)
    #: Secret keying the patient reference (HMAC-SHA256 of issuer and Patient ID), so
    #: the log holds no patient identifier. Empty: ``<data_dir>/keys/audit-patient.key``.
    patient_key_file: Path | None = None
    #: Key of the chain's HMAC (kept outside the database, so whoever can write the
    #: database cannot recompute the chain). Empty: ``<data_dir>/keys/audit-chain.key``.
    chain_key_file: Path | None = None
    #: Append-only file of signed (seq, hash) checkpoints, outside the database, kept
    #: by ``pacslab backup``. Empty: ``<data_dir>/audit/checkpoints.jsonl``.
    checkpoint_file: Path | None = None
    #: A checkpoint is appended at most this often (and at start and close); a tail
    #: cut after the last checkpoint is caught only by the head row.
    checkpoint_interval_s: float = Field(default=60.0, gt=0)
    #: ATNA syslog copy of every entry (issue 17 item 5): ``PACSLAB_AUDIT__ATNA__URL``.
    atna: AtnaSettings = AtnaSettings()


class SigningSettings(BaseModel):
    """The hospital's signing certificate for results (RFC 7515 JWS with ``x5c``).

    Empty paths mean a self-signed certificate created under ``<data_dir>/keys`` on
    first run (embedded default, not a legal e-signature: configure the hospital's
    certificate from a licensed CA for production).
    """

    cert: Path | None = None
    key: Path | None = None
    organization: str = "pacslab hospital (self-signed)"


class RetentionRule(BaseModel):
    """One retention rule; every listed condition must hold. The longest matching period wins."""

    years: int = Field(ge=1, le=100)
    kind: Literal["any", "study", "result"] = "any"
    #: DICOM Modality (0008,0060) of any series, e.g. ``["MG"]``.
    modality: list[str] = Field(default_factory=list)
    #: Department / Institution Name (0008,0080), or the report's performer.
    department: list[str] = Field(default_factory=list)
    #: Report codes (DiagnosticReport.code/category codings), e.g. mental health panels.
    code: list[str] = Field(default_factory=list)
    #: Match only records of deceased patients (True) or of living ones (False).
    deceased: bool | None = None
    name: str = ""


class RetentionSettings(BaseModel):
    """Retention periods (Circular 13/2025/TT-BYT: 10 years; 20 for some; 30 after a death)."""

    default_years: int = Field(default=10, ge=1, le=100)
    rules: list[RetentionRule] = Field(
        default_factory=lambda: [RetentionRule(years=30, deceased=True, name="deceased")]
    )


class RemoteAE(BaseModel):
    """A peer DICOM application entity (PS3.8 7.1.1.5): where its AE title is reached."""

    host: str
    port: int = Field(..., ge=1, le=65535)


class QueryRetrieveSettings(BaseModel):
    """Query/Retrieve SCP (PS3.4 C), Storage Commitment (PS3.4 J), extra storage classes.

    Issue 16. ``PACSLAB_QR__DESTINATIONS='{"WS1": {"host": "10.0.0.5", "port": 104}}'``.
    """

    #: C-MOVE destinations by AE title; the admin API adds more (kept in the index).
    destinations: dict[str, RemoteAE] = Field(default_factory=dict)
    #: A C-FIND with more matches ends with 0xA700 after this many (a narrower query
    #: is asked for) rather than streaming the whole archive.
    max_find_results: int = Field(10_000, ge=1)
    #: C-MOVE / C-GET running at once in one receiver process; more get 0xA702.
    max_concurrent_retrieves: int = Field(4, ge=1)
    #: Serve Q/R C-FIND, C-MOVE and C-GET (with C-ECHO, C-CANCEL and storage on the
    #: same association) on the receiver's plain-socket path, with our own Storage SCU
    #: for C-MOVE sub-operations, when the association needs nothing pynetdicom-only
    #: (user identity, extended negotiation; SCP/SCU role selection is negotiated
    #: there for C-GET). pynetdicom's threads poll their queues with 1 ms sleeps
    #: (issue 16: C-FIND p99, retrieve rates). False hands every Q/R association to
    #: pynetdicom, as before (kept for comparison and as a fallback).
    plain_socket: bool = True
    #: Bytes of one C-FIND/C-MOVE identifier held in memory on the plain path; a
    #: longer one aborts the association (a real identifier is a few hundred bytes).
    max_identifier_bytes: int = Field(1 << 20, ge=1024)
    #: Sub-operations of one C-MOVE / C-GET (the response counters are US: 65535).
    max_retrieve_instances: int = Field(65_535, ge=1, le=65_535)
    #: Timeouts of our associations to move destinations / commitment SCUs (s).
    connect_timeout_s: float = Field(10.0, gt=0)
    #: Storage Commitment reports the receiver could not deliver are sent by the worker
    #: with this backoff (first retry after ``commit_retry_base_s``, doubling, capped at
    #: ``commit_retry_max_s``); after ``commit_max_attempts`` tries the report goes to the
    #: dead-letter list (``/admin/commitment/jobs?status=failed``, manual retry).
    commit_max_attempts: int = Field(20, ge=1)
    commit_retry_base_s: float = Field(30.0, gt=0)
    commit_retry_max_s: float = Field(3600.0, gt=0)
    #: Retired standard storage SOP classes (PS3.6 Table A-1, "Retired"), e.g. the
    #: old Ultrasound Image Storage 1.2.840.10008.5.1.4.1.1.6 still sent by devices.
    accept_retired_storage: bool = True
    #: Private storage SOP classes to accept (exact UIDs); others are refused.
    private_storage_classes: list[str] = Field(default_factory=list)

    @field_validator("destinations")
    @classmethod
    def _check_aes(cls, value: dict[str, RemoteAE]) -> dict[str, RemoteAE]:
        for ae in value:
            if not 1 <= len(ae.strip()) <= 16 or "\\" in ae or not ae.isprintable():
                raise ValueError(f"qr.destinations: {ae!r} is not an AE title")
        return {ae.strip(): dest for ae, dest in value.items()}

    @field_validator("private_storage_classes")
    @classmethod
    def _check_uids(cls, value: list[str]) -> list[str]:
        for uid in value:
            if not re.fullmatch(r"[0-9]+(\.[0-9]+)*", uid) or len(uid) > 64:
                raise ValueError(f"qr.private_storage_classes: {uid!r} is not a UID")
        return value


class ForwardingDestination(BaseModel):
    """Where forwarded instances go: a C-STORE SCP or a STOW-RS endpoint (PS3.18 10.5)."""

    kind: Literal["dicom", "stow"] = "dicom"
    ae_title: str = ""
    host: str = ""
    port: int = Field(104, ge=1, le=65535)
    url: str = ""
    #: ``Authorization`` header value for STOW-RS (e.g. ``Bearer …``, ``Basic …``).
    authorization: str = ""

    @model_validator(mode="after")
    def _check(self) -> ForwardingDestination:
        if self.kind == "dicom" and not (self.ae_title and self.host):
            raise ValueError("a dicom forwarding destination needs ae_title and host")
        if self.kind == "stow" and not self.url.startswith(("http://", "https://")):
            raise ValueError("a stow forwarding destination needs an http(s) url")
        return self


class ForwardingRule(BaseModel):
    """Forward what matches every given criterion (empty: any) to ``destinations``."""

    name: str
    destinations: list[str]
    calling_aes: list[str] = Field(default_factory=list)
    modalities: list[str] = Field(default_factory=list)
    sop_classes: list[str] = Field(default_factory=list)
    #: ``dicom`` (C-STORE) or ``stow`` (STOW-RS): how the instance arrived.
    sources: list[str] = Field(default_factory=list)
    #: Study attributes that must match (PS3.4 C.2.2.2 wildcards), e.g.
    #: ``{"InstitutionName": "SITE A*"}``.
    study: dict[str, str] = Field(default_factory=dict)


class ForwardingSettings(BaseModel):
    """Auto-routing of stored instances (issue 16 §4), run from the durable job queue."""

    destinations: dict[str, ForwardingDestination] = Field(default_factory=dict)
    rules: list[ForwardingRule] = Field(default_factory=list)
    #: Tries before an instance goes to the dead-letter list (manual retry from the API).
    max_attempts: int = Field(48, ge=1)
    #: Backoff: first retry after this, doubling, capped at ``retry_max_s``.
    retry_base_s: float = Field(5.0, gt=0)
    retry_max_s: float = Field(3600.0, gt=0)
    timeout_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _check_rules(self) -> ForwardingSettings:
        for name in self.destinations:
            # Jobs are of kind "fwd:<name>" in a 16-character column.
            if not re.fullmatch(r"[A-Za-z0-9_.-]{1,12}", name):
                raise ValueError(f"forwarding destination name {name!r}: 1-12 of A-Z a-z 0-9 _.-")
        for rule in self.rules:
            unknown = [d for d in rule.destinations if d not in self.destinations]
            if unknown:
                raise ValueError(f"forwarding rule {rule.name!r}: unknown destinations {unknown}")
        return self


class LogSettings(BaseModel):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = Field(False, alias="json")

    model_config = {"populate_by_name": True}


class AnalyzerSettings(BaseModel):
    """One analyzer connected live (issue 18): ASTM E1381/E1394 or HL7 over MLLP.

    ``link`` says who opens the connection: ``tcp-server`` (the analyzer connects to
    ``host:port`` of pacslab), ``tcp-client`` (pacslab connects to the analyzer's
    ``host:port``) or ``serial`` (RS-232 ``device``). Timers are those of E1381
    §6.5.2; tests shorten them.
    """

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    protocol: Literal["astm", "hl7-mllp"] = "astm"
    link: Literal["tcp-server", "tcp-client", "serial"] = "tcp-server"
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535)
    device: str = ""
    baudrate: int = Field(9600, gt=0)
    #: ASTM framing: E1381 (frames, checksums, ENQ/ACK). HL7 always uses MLLP.
    framing: Literal["e1381"] = "e1381"
    #: HL7 LAW: the analyzer's own MLLP listener, where OML^O33 order downloads go
    #: (0: no order download). ASTM sends orders on the link itself.
    order_host: str = "127.0.0.1"
    order_port: int = Field(0, ge=0, le=65535)
    #: Record character set: ascii, latin-1, utf-8, cp1258 or tcvn3 (core.charsets).
    encoding: str = "latin-1"
    decimal_mark: Literal["auto", "point", "comma"] = "auto"
    #: Analyzer test code → LOINC (or our code): results carry the LOINC too, and a
    #: host query answers an order for the LOINC with the analyzer's code.
    test_codes: dict[str, str] = Field(default_factory=dict)
    reply_timeout_s: float = Field(15.0, gt=0)  # E1381 sender: ACK after ENQ/frame
    frame_timeout_s: float = Field(30.0, gt=0)  # E1381 receiver: next frame or EOT
    busy_wait_s: float = Field(10.0, gt=0)  # after NAK to ENQ, before trying again
    retries: int = Field(6, ge=0, le=20)  # E1381 §6.5.1.2: a frame is resent 6 times
    reconnect_s: float = Field(5.0, gt=0)  # tcp-client/serial: wait before reconnecting
    #: tcp-server: a connection silent this long (no byte, link neutral) is closed,
    #: so a dead or hostile peer cannot hold the analyzer's link.
    idle_timeout_s: float = Field(600.0, gt=0)
    #: tcp-server: IPs / CIDR networks allowed to connect (the analyzer's); empty:
    #: anyone, with a warning at start. A newer allowed connection replaces the
    #: current one (an analyzer that reconnects after a power cut).
    allowed_sources: list[str] = Field(default_factory=list)

    @field_validator("allowed_sources")
    @classmethod
    def _check_sources(cls, value: list[str]) -> list[str]:
        return _ip_networks(value, "analyzers")

    @model_validator(mode="after")
    def _check_link(self) -> AnalyzerSettings:
        if self.link == "serial" and not self.device:
            raise ValueError(f"analyzer {self.name!r}: a serial link needs 'device'")
        if self.link == "tcp-client" and not self.port:
            raise ValueError(f"analyzer {self.name!r}: a tcp-client link needs 'port'")
        if self.protocol == "hl7-mllp" and self.link == "serial":
            raise ValueError(f"analyzer {self.name!r}: HL7 over MLLP needs a TCP link")
        if self.protocol == "hl7-mllp" and self.link != "tcp-server":
            raise ValueError(
                f"analyzer {self.name!r}: HL7 results arrive on a tcp-server link "
                "(orders go to order_host:order_port)"
            )
        return self


#: Where ``./run`` installs OHIF's built viewer (npm ``@ohif/app``, pinned there): the
#: project's ``.ohif/dist``, outside git. Relative to the sources, not the working
#: directory, so ``pacslab serve`` finds it from anywhere.
_OHIF_DEFAULT_DIST = Path(__file__).resolve().parent.parent / ".ohif" / "dist"


class OhifSettings(BaseModel):
    """OHIF Viewer v3 served under ``/ohif`` (issue 20).

    ``dist_dir`` is the package's ready-built ``dist/`` (``index.html``, bundles,
    WebAssembly codecs). ``oidc_authority``/``oidc_client_id``: when both are set,
    OHIF signs the user in at that OpenID Connect provider (code flow + PKCE) and
    sends its access token; otherwise it uses the token given as ``#token=``, kept per
    tab like the built-in viewer's.
    """

    enabled: bool = True
    dist_dir: Path = _OHIF_DEFAULT_DIST
    oidc_authority: str = ""
    oidc_client_id: str = ""
    #: Scopes OHIF asks the identity provider for (space separated).
    oidc_scope: str = "openid imaging.read"

    @model_validator(mode="after")
    def _check_oidc(self) -> OhifSettings:
        if bool(self.oidc_authority) != bool(self.oidc_client_id):
            raise ValueError("set both ohif.oidc_authority and ohif.oidc_client_id, or neither")
        if self.oidc_authority and not self.oidc_authority.startswith(
                ("https://", "http://127.", "http://localhost")):
            raise ValueError("ohif.oidc_authority must be https (or loopback http for tests)")
        return self


class Settings(BaseSettings):
    """All of pacslab's configuration; see the module docstring for sources."""

    model_config = SettingsConfigDict(
        env_prefix="PACSLAB_",
        env_nested_delimiter="__",
        extra="ignore",
    )

    data_dir: Path = Path("data")
    index: IndexSettings = IndexSettings()
    storage: StorageSettings = StorageSettings()
    dicom: DicomSettings = DicomSettings()
    http: HttpSettings = HttpSettings()
    dask: DaskSettings = DaskSettings()
    processing: ProcessingSettings = ProcessingSettings()
    ingest: IngestSettings = IngestSettings()
    worklist: WorklistSettings = WorklistSettings()
    orders: OrdersSettings = Field(default_factory=OrdersSettings)
    lab: LabSettings = LabSettings()
    #: Analyzers connected live (issue 18), one entry each; names are unique.
    analyzers: list[AnalyzerSettings] = Field(default_factory=list)
    log: LogSettings = LogSettings()
    auth: AuthSettings = AuthSettings()
    audit: AuditSettings = AuditSettings()
    signing: SigningSettings = SigningSettings()
    retention: RetentionSettings = RetentionSettings()
    ohif: OhifSettings = OhifSettings()
    qr: QueryRetrieveSettings = QueryRetrieveSettings()  # issue 16
    forwarding: ForwardingSettings = ForwardingSettings()  # issue 16

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        # A typo (PACSLAB_DICOM__PROT, a wrong section) would otherwise be ignored and
        # the default used: refuse it here, on every construction, naming the fix.
        check_unknown_settings(os.environ)
        config = os.environ.get("PACSLAB_CONFIG", "")
        if config:
            path = Path(config)
            if not path.is_file():
                raise ValueError(f"PACSLAB_CONFIG={config} is not a file")
            file_source: TomlConfigSettingsSource | YamlConfigSettingsSource
            if path.suffix == ".toml":
                file_source = TomlConfigSettingsSource(settings_cls, toml_file=path)
            elif path.suffix in {".yaml", ".yml"}:
                file_source = YamlConfigSettingsSource(settings_cls, yaml_file=path)
            else:
                raise ValueError("PACSLAB_CONFIG must end in .toml, .yaml or .yml")
            check_unknown_settings({}, file_data=file_source(), file_name=config)
            sources.append(file_source)
        return tuple(sources)

    @model_validator(mode="after")
    def _unique_analyzers(self) -> Settings:
        names = [a.name for a in self.analyzers]
        if len(names) != len(set(names)):
            raise ValueError("analyzer names must be unique")
        return self

    @model_validator(mode="after")
    def _fill_paths(self) -> Settings:
        # Derived locations follow data_dir unless set explicitly, so that
        # PACSLAB_DATA_DIR alone moves everything (the brief's interface).
        data = self.data_dir
        if not self.index.url:
            self.index.url = f"sqlite:///{(data / 'index.db').as_posix()}"
        if self.storage.originals_dir is None:
            self.storage.originals_dir = data / "originals"
        if self.storage.quarantine_dir is None:
            self.storage.quarantine_dir = data / "quarantine"
        if not self.storage.zarr_url:
            self.storage.zarr_url = (data / "zarr").as_posix()
        keys = self.keys_dir
        if self.auth.local_key is None:
            self.auth.local_key = keys / "token-es256.pem"
        if not self.auth.issuer and self.auth.is_local:
            self.auth.issuer = "urn:pacslab:local"
        if self.audit.patient_key_file is None:
            self.audit.patient_key_file = keys / "audit-patient.key"
        if self.audit.chain_key_file is None:
            self.audit.chain_key_file = keys / "audit-chain.key"
        if self.audit.checkpoint_file is None:
            self.audit.checkpoint_file = data / "audit" / "checkpoints.jsonl"
        if (self.signing.cert is None) != (self.signing.key is None):
            raise ValueError("signing.cert and signing.key must be set together")
        if self.signing.cert is None:
            self.signing.cert = keys / "hospital-cert.pem"
            self.signing.key = keys / "hospital-key.pem"
        return self

    @property
    def keys_dir(self) -> Path:
        """Private keys and secrets the embedded defaults create (mode 0700)."""
        return self.data_dir / "keys"

    @property
    def lab_inbox(self) -> Path:
        return self.data_dir / "inbox" / "lab"

    @property
    def orders_inbox(self) -> Path:
        return self.data_dir / "inbox" / "orders"


# -- Unknown names (issue 13 item 12) ---------------------------------------------

#: ``PACSLAB_*`` environment variables that are not settings, and so are not refused
#: as typos: the config file's name, a switch read outside Settings, and the knobs of
#: the test suite and benchmarks (names starting ``PACSLAB_TEST_`` are all such knobs).
NON_SETTING_VARIABLES: Final = frozenset({
    "PACSLAB_CONFIG",  # names the TOML/YAML file (read before Settings exists)
    "PACSLAB_ZARRS",  # processing/tiling.py: 0 keeps zarr-python's own codec pipeline
    "PACSLAB_FAULT_TRIALS",  # tests/faults: trials per fault-injection test
    "PACSLAB_LOAD_SECONDS",  # benchmarks/test_load.py: length of the load run
    "PACSLAB_PYTHON",  # ./run bench: use this interpreter as it is, no set-up
    "PACSLAB_BENCH_QUICK",  # ./run bench --quick: benchmarks shrink to smoke sizes
    "PACSLAB_BENCH_FIGURES",  # ./run bench: where benchmarks write their figures
    "PACSLAB_QR_BENCH_STUDIES",  # benchmarks/test_query_retrieve.py: studies in the archive
    "PACSLAB_QR_BENCH_INSTANCES",  # benchmarks/test_query_retrieve.py: instances per study
    "PACSLAB_QR_BENCH_ROUNDS",  # benchmarks/test_query_retrieve.py: C-MOVE/C-GET rounds
    "PACSLAB_QR_BENCH_CT_SLICES",  # benchmarks/test_query_retrieve.py: CT retrieved
    "PACSLAB_QR_BENCH_CACHE",  # benchmarks/test_query_retrieve.py: keep Orthanc's filled folder
    "PACSLAB_BENCH_SCALE_INSTANCES",  # benchmarks/test_archive_scale.py: archive size
    "PACSLAB_BENCH_SCALE_CACHE",  # benchmarks/test_archive_scale.py: keep filled SQLite files
})
_NON_SETTING_PREFIX: Final = "PACSLAB_TEST_"
_ENV_PREFIX: Final = "PACSLAB_"
_NESTED: Final = "__"


class UnknownSettingError(ValueError):
    """A ``PACSLAB_*`` variable or config-file key that names no setting."""


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel an annotation holds (also through ``X | None``), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _model_of(arg)
            if found is not None:
                return found
    return None


def _is_mapping(annotation: Any) -> bool:
    """True for ``dict[...]``-like fields (also through ``X | None``): free keys below."""
    origin = typing.get_origin(annotation)
    if origin in (dict, Mapping) or annotation is dict:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_is_mapping(arg) for arg in typing.get_args(annotation))
    return False


def _names(model: type[BaseModel]) -> dict[str, Any]:
    """Field name (and alias) -> annotation, lower case as pydantic-settings matches env."""
    out: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        out[name.lower()] = info.annotation
        if info.alias:
            out[info.alias.lower()] = info.annotation
    return out


def known_setting_names(model: type[BaseModel] | None = None) -> list[str]:
    """Every setting path of ``model`` (default :class:`Settings`), as ``a__b__c``.

    Derived from the model's fields, recursively, so a field added to any section is
    known without touching this function. Sections themselves are included (a whole
    section may be given as JSON).
    """
    root = model if model is not None else Settings
    out: list[str] = []

    def walk(m: type[BaseModel], prefix: str) -> None:
        for name, annotation in _names(m).items():
            path = f"{prefix}{name}"
            out.append(path)
            sub = _model_of(annotation)
            if sub is not None and not _is_mapping(annotation):
                walk(sub, f"{path}{_NESTED}")

    walk(root, "")
    return out


def _resolve(parts: list[str], model: type[BaseModel]) -> Literal["unknown", "free", "known"]:
    """What ``parts`` names in ``model`` (see :func:`_walk`)."""
    return _walk(parts, model)[0]


def _walk(
    parts: list[str], model: type[BaseModel]
) -> tuple[Literal["unknown", "free", "known"], int, list[str]]:
    """What ``parts`` (lower case) names in ``model``: nothing, a dict section, or a setting.

    ``free``: a ``dict`` field of plain values (``storage.storage_options`` …), whose
    keys below are data, not setting names. Also returns, for ``unknown``, the index of
    the first unknown part and the names that were possible there.
    """
    current: type[BaseModel] | None = model
    i = 0
    while i < len(parts):
        if current is None:
            return "unknown", i, []  # below a leaf
        fields = _names(current)
        if parts[i] not in fields:
            return "unknown", i, list(fields)
        annotation = fields[parts[i]]
        if _is_mapping(annotation):
            value_model = _mapping_value_model(annotation)
            if value_model is None:
                return "free", i, []
            # dict[str, Model] (lab.profiles, lab.critical): the key is data, what is
            # below it is the model's fields again.
            if i + 1 >= len(parts):
                return "known", i, []
            current, i = value_model, i + 2
            continue
        current = _model_of(annotation)
        i += 1
    return "known", i, []


def _mapping_value_model(annotation: Any) -> type[BaseModel] | None:
    """The value model of ``dict[str, Model]`` (also through ``| None``), else None."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if _is_mapping(arg):
                return _mapping_value_model(arg)
        return None
    args = typing.get_args(annotation)
    return _model_of(args[1]) if len(args) == 2 else None


def _closest(parts: list[str], model: type[BaseModel]) -> list[str] | None:
    """The setting path closest to the unknown ``parts`` (difflib), or None.

    Candidates are every setting path, and the path with its unknown part replaced by
    a close sibling (so a typo inside ``lab.profiles.<name>`` is answered with that
    profile's field, which no fixed list holds).
    """
    _, at, siblings = _walk(parts, model)
    candidates = set(known_setting_names(model))
    for name in difflib.get_close_matches(parts[at], siblings, n=3, cutoff=0.6):
        fixed = [*parts[:at], name, *parts[at + 1:]]
        if _resolve(fixed, model) != "unknown":
            candidates.add(_NESTED.join(fixed))
    close = difflib.get_close_matches(_NESTED.join(parts), sorted(candidates), n=1, cutoff=0.6)
    return close[0].split(_NESTED) if close else None


def check_unknown_settings(
    environ: Mapping[str, str],
    *,
    file_data: Mapping[str, Any] | None = None,
    file_name: str = "PACSLAB_CONFIG",
) -> None:
    """Refuse ``PACSLAB_*`` variables and config-file keys that name no setting.

    Parameters
    ----------
    environ
        The environment; every ``PACSLAB_*`` name not in :data:`NON_SETTING_VARIABLES`
        (nor starting ``PACSLAB_TEST_``) must be a setting path with ``__`` nesting.
    file_data
        The parsed config file, checked key by key (nested tables are sections).

    Raises
    ------
    UnknownSettingError
        Naming the first unknown name and the closest known one (difflib).
    """
    for key in sorted(environ):
        upper = key.upper()
        if not upper.startswith(_ENV_PREFIX) or upper in NON_SETTING_VARIABLES:
            continue
        if upper.startswith(_NON_SETTING_PREFIX):
            continue
        parts = upper[len(_ENV_PREFIX):].lower().split(_NESTED)
        if _resolve(parts, Settings) == "unknown":
            fixed = _closest(parts, Settings)
            hint = f" (did you mean {_ENV_PREFIX}{_NESTED.join(fixed).upper()}?)" if fixed else ""
            if not fixed:
                other = difflib.get_close_matches(upper, sorted(NON_SETTING_VARIABLES), n=1)
                hint = f" (did you mean {other[0]}?)" if other else ""
            raise UnknownSettingError(f"unknown setting {key}{hint}")
    if file_data:

        def walk(data: Mapping[str, Any], parts: list[str]) -> None:
            for k, v in data.items():
                path = [*parts, str(k).lower()]
                found = _resolve(path, Settings)
                if found == "unknown":
                    name = ".".join(path)
                    fixed = _closest(path, Settings)
                    hint = f" (did you mean {'.'.join(fixed)}?)" if fixed else ""
                    raise UnknownSettingError(f"unknown setting {name!r} in {file_name}{hint}")
                if found == "known" and isinstance(v, Mapping):
                    walk(v, path)  # a section, or a dict of models (lab.profiles)

        walk(file_data, [])
