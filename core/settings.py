"""The one Settings object (STYLE.md §4): pydantic-settings, prefix ``PACSLAB_``, ``__`` nesting.

Built once per process by the composition root (``pacslab/``) and handed to each
component as its own section. There is deliberately no module-level instance.

Sources, highest priority first: constructor arguments, environment variables
(``PACSLAB_DICOM__PORT=11112``), an optional config file named by ``PACSLAB_CONFIG``
(``.toml``, ``.yaml``/``.yml``), then the defaults below.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

__all__ = [
    "AuditSettings",
    "AuthSettings",
    "DaskSettings",
    "DicomSettings",
    "HttpSettings",
    "IndexSettings",
    "IngestSettings",
    "LabCriticalLimit",
    "LabDelimitedSettings",
    "LabProfileSettings",
    "LabSettings",
    "LogSettings",
    "OrdersSettings",
    "ProcessingSettings",
    "RetentionRule",
    "RetentionSettings",
    "Settings",
    "SigningSettings",
    "StorageSettings",
    "WorklistSettings",
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
    #: Receiver processes sharing the listening socket (0: one per CPU core).
    workers: int = Field(0, ge=0)
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    max_associations: int = Field(32, ge=1)
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
        return self


class HttpSettings(BaseModel):
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1)
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


class DaskSettings(BaseModel):
    #: ``tcp://host:8786`` for a distributed cluster; empty runs a local threaded scheduler.
    scheduler: str = ""
    workers: int = Field(0, ge=0)


class ProcessingSettings(BaseModel):
    #: Seconds without a new instance before a series is considered complete.
    series_quiet_s: float = Field(10.0, ge=0)
    poll_interval_s: float = Field(0.5, gt=0)
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
    #: Transcode stored originals to HTJ2K lossless (issue #3 archive option).
    archive_htj2k: bool = False


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
    delimited: LabDelimitedSettings | None = None
    #: Largest file of this inbox (bytes); None: ``IngestSettings.lab_max_bytes``.
    max_bytes: int | None = Field(None, gt=0)

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
    #: POSTed a small JSON notice for each new critical result; empty for none.
    #: Failures are logged and never hold up ingestion.
    critical_webhook_url: str = ""
    critical_webhook_timeout_s: float = Field(5.0, gt=0)
    #: Analyzer clocks without an offset are read in this zone (IANA name); FHIR R4
    #: dateTime needs a zone whenever it has a time (R4 §2.24.0.1 dateTime).
    local_timezone: str = "UTC"
    #: Watch the inboxes in ``pacslab serve``.
    watch: bool = True

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
        import ipaddress

        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError as exc:
                raise ValueError(
                    f"orders.mllp_allowed_sources: {item!r} is not an IP or CIDR network"
                ) from exc
        return value
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
            "/static/",
            # FHIR R4 3.1.0.4 / SMART App Launch: clients read the CapabilityStatement
            # before they have a token (it holds no patient data).
            "/fhir/metadata",
        ]
    )
    #: The embedded issuer's private key (PEM, P-256). Empty: ``<data_dir>/keys/token-es256.pem``.
    local_key: Path | None = None
    #: Lifetime of tokens ``pacslab token`` prints.
    token_ttl_s: int = Field(default=3600, ge=60)

    @model_validator(mode="after")
    def _check_source(self) -> AuthSettings:
        if self.jwks_path is not None and self.jwks_url:
            raise ValueError("set auth.jwks_path or auth.jwks_url, not both")
        if self.jwks_url and not self.jwks_url.startswith(("https://", "http://127.", "http://localhost")):
            raise ValueError("auth.jwks_url must be https (or loopback http for tests)")
        return self

    @property
    def is_local(self) -> bool:
        """True when the service issues its own tokens (no identity provider configured)."""
        return self.jwks_path is None and not self.jwks_url


class AuditSettings(BaseModel):
    """The hash-chained action log (audit_events table, FHIR R4 AuditEvent export)."""

    enabled: bool = True
    #: A background thread writes what was queued at most this often (one transaction).
    flush_interval_s: float = Field(default=0.2, gt=0)
    batch_max: int = Field(default=1000, ge=1)
    #: Entries kept in memory while the database cannot take them; more are dropped
    #: with an ERROR (a C-STORE is never refused because the log is away, STYLE.md §5).
    max_pending: int = Field(default=100_000, ge=1)
    #: Secret keying the patient reference (HMAC-SHA256 of issuer and Patient ID), so
    #: the log holds no patient identifier. Empty: ``<data_dir>/keys/audit-patient.key``.
    patient_key_file: Path | None = None


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


class LogSettings(BaseModel):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = Field(False, alias="json")

    model_config = {"populate_by_name": True}


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
    log: LogSettings = LogSettings()
    auth: AuthSettings = AuthSettings()
    audit: AuditSettings = AuditSettings()
    signing: SigningSettings = SigningSettings()
    retention: RetentionSettings = RetentionSettings()

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
        config = os.environ.get("PACSLAB_CONFIG", "")
        if config:
            path = Path(config)
            if not path.is_file():
                raise ValueError(f"PACSLAB_CONFIG={config} is not a file")
            if path.suffix == ".toml":
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
            elif path.suffix in {".yaml", ".yml"}:
                sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
            else:
                raise ValueError("PACSLAB_CONFIG must end in .toml, .yaml or .yml")
        return tuple(sources)

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

    def section(self, name: str) -> Any:
        return getattr(self, name)
