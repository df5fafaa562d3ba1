"""The one Settings object (STYLE.md §4): pydantic-settings, prefix ``PACSLAB_``, ``__`` nesting.

Built once per process by the composition root (``pacslab/``) and handed to each
component as its own section. There is deliberately no module-level instance.

Sources, highest priority first: constructor arguments, environment variables
(``PACSLAB_DICOM__PORT=11112``), an optional config file named by ``PACSLAB_CONFIG``
(``.toml``, ``.yaml``/``.yml``), then the defaults below.
"""

from __future__ import annotations

import os
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
    "DaskSettings",
    "DicomSettings",
    "HttpSettings",
    "IndexSettings",
    "IngestSettings",
    "LogSettings",
    "ProcessingSettings",
    "Settings",
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


class DaskSettings(BaseModel):
    #: ``tcp://host:8786`` for a distributed cluster; empty runs a local threaded scheduler.
    scheduler: str = ""
    workers: int = Field(0, ge=0)


class ProcessingSettings(BaseModel):
    #: Seconds without a new instance before a series is considered complete.
    series_quiet_s: float = Field(10.0, ge=0)
    poll_interval_s: float = Field(0.5, gt=0)
    max_attempts: int = Field(3, ge=1)
    #: Transcode stored originals to HTJ2K lossless (issue #3 archive option).
    archive_htj2k: bool = False


class IngestSettings(BaseModel):
    #: Seconds a dropped lab file must keep the same size and mtime before it is read.
    lab_stable_s: float = Field(1.0, ge=0)
    lab_rescan_s: float = Field(5.0, gt=0)


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
    log: LogSettings = LogSettings()

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
        return self

    @property
    def lab_inbox(self) -> Path:
        return self.data_dir / "inbox" / "lab"

    @property
    def orders_inbox(self) -> Path:
        return self.data_dir / "inbox" / "orders"

    def section(self, name: str) -> Any:
        return getattr(self, name)
