"""Consistent, verifiable snapshots of a running instance, and restoring them (issue 7 §5).

Order matters. The index is copied first — it holds the action log, signed results,
retention and API keys too. SQLite: with its online backup API
(``sqlite3.Connection.backup``, one step: a WAL read transaction, so receivers keep
committing meanwhile), as ``index.db``. PostgreSQL: with ``pg_dump`` in the custom
format, as ``index.pgdump``, under a snapshot exported by a REPEATABLE READ
transaction that also reads the blob keys, instance count and audit head the
manifest records, so they describe the dump exactly (:mod:`storage._pgdump`).
Originals are copied after it: an instance is indexed only after its
original was published (``storage.archive``, blob first), so every original the
snapshot references is already on disk, and originals never change (content keys).
Every instance acknowledged before the backup started is therefore in it, bit for
bit. Zarr pyramids (one immutable store per job) and the keys directory follow.
The action log's checkpoint file (``audit.checkpoint_file``, outside the database)
is copied *before* the index, as ``audit/checkpoints.jsonl``: every checkpoint names
an entry already committed, so none names one beyond the snapshot's head, and the
backup's log verifies against its own checkpoints and chain key (``keys/``).

``manifest.json`` lists every file with its SHA-256 and size; :func:`verify` checks
them, the SQLite integrity (or that ``pg_restore`` reads the dump), the action log's
hash chain and that every original the index references is present — for a dump,
from its rows as ``pg_restore`` prints them, without a server. :func:`restore` loads
a dump with ``pg_restore`` into the target PostgreSQL database, which must be empty.
The snapshot is built in ``DEST.partial`` and renamed to ``DEST`` when complete, so a
directory named ``DEST`` is always whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, create_engine, inspect, text

from core.audit import ChainedEntry, Checkpoint, verify_chain
from core.settings import Settings
from storage import _pgdump
from storage.audit import AuditStore, CheckpointFile
from storage.index.sql import SqlIndex
from storage.originals import FileOriginalStore

__all__ = ["BackupReport", "backup", "restore", "verify"]

logger = logging.getLogger(__name__)

FORMAT = "pacslab-backup/1"
MANIFEST = "manifest.json"
SQLITE_INDEX = "index.db"
PG_INDEX = "index.pgdump"
CHECKPOINTS = "audit/checkpoints.jsonl"
CHAIN_KEY = "keys/audit-chain.key"


@dataclass
class BackupReport:
    dest: Path
    files: int = 0
    bytes: int = 0
    linked: int = 0
    seconds: float = 0.0
    instances: int = 0
    audit_head: tuple[int, str] | None = None
    manifest_sha256: str = ""
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _IndexFacts:
    """What the manifest and the completeness check need from the snapshot."""

    blobs: frozenset[str]
    instances: int
    audit_head: tuple[int, str] | None
    revision: str | None


def _sqlite_path(url: str) -> Path:
    if not url.startswith("sqlite:///"):
        raise ValueError(f"pacslab backup copies SQLite and PostgreSQL indexes, not {url!r}")
    return Path(url.removeprefix("sqlite:///"))


def _facts(conn: Connection) -> _IndexFacts:
    """Read from the snapshot: within the same transaction as the copy."""
    blobs = frozenset(str(r[0]) for r in conn.execute(
        text("SELECT DISTINCT blob_key FROM instances")))
    count = int(conn.execute(text("SELECT count(*) FROM instances")).scalar_one())
    head = conn.execute(text("SELECT seq, hash FROM audit_head WHERE id = 1")).first()
    revision = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    return _IndexFacts(blobs, count, (int(head[0]), str(head[1])) if head else None,
                       str(revision) if revision is not None else None)


def _dump_postgres(url: str, dest: Path) -> _IndexFacts:
    """``pg_dump`` under a snapshot this transaction exports and keeps open meanwhile."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                conn.execute(text("SET TRANSACTION READ ONLY"))
                snapshot = str(conn.execute(text("SELECT pg_export_snapshot()")).scalar_one())
                _pgdump.dump(url, dest, snapshot=snapshot)
                return _facts(conn)
    finally:
        engine.dispose()


def _sqlite_facts(db: Path) -> _IndexFacts:
    engine = create_engine(f"sqlite:///file:{db}?mode=ro&uri=true")
    try:
        with engine.connect() as conn:
            return _facts(conn)
    finally:
        engine.dispose()


def _sha256_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as fp:
        while chunk := fp.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _copy(src: Path, dst: Path) -> tuple[str, int]:
    """Copy ``src`` to ``dst`` hashing the bytes written (one read of the source)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    size = 0
    with src.open("rb") as fin, dst.open("wb") as fout:
        while chunk := fin.read(1 << 20):
            h.update(chunk)
            fout.write(chunk)
            size += len(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return h.hexdigest(), size


def _snapshot_index(src: Path, dst: Path) -> None:
    source = sqlite3.connect(f"file:{src}?mode=ro", uri=True, timeout=60)
    target = sqlite3.connect(dst)
    try:
        source.backup(target)  # pages=-1: the whole database in one read transaction
        target.execute("PRAGMA journal_mode=DELETE")
        ok = target.execute("PRAGMA integrity_check").fetchone()[0]
        if ok != "ok":
            raise RuntimeError(f"index snapshot failed its integrity check: {ok}")
    finally:
        target.close()
        source.close()


def _walk(root: Path, *, skip: tuple[str, ...] = ()) -> list[Path]:
    if not root.is_dir():
        return []
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        for name in filenames:
            if name.endswith(".tmp") or name.startswith(".tmp"):
                continue  # writes in progress
            out.append(Path(dirpath) / name)
    return sorted(out)


def _referenced_blobs(db: Path) -> set[str]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {r[0] for r in con.execute("SELECT DISTINCT blob_key FROM instances")}
    finally:
        con.close()


def _blob_rel(key: str) -> str:
    return f"originals/{key[:2]}/{key[2:4]}/{key}.dcm"


def backup(settings: Settings, dest: Path, *, link_dest: Path | None = None) -> BackupReport:
    """Snapshot ``settings``' instance into ``dest`` (which must not exist).

    ``link_dest``, an earlier verified backup, lets unchanged originals be hard
    links to it instead of copies (originals never change: only new ones are copied).
    """
    started = time.monotonic()
    if dest.exists():
        raise FileExistsError(f"{dest} exists; a backup goes to a new directory")
    partial = dest.with_name(dest.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    report = BackupReport(dest)
    files: dict[str, dict[str, Any]] = {}
    previous: dict[str, Any] = {}
    if link_dest is not None:
        previous = json.loads((link_dest / MANIFEST).read_text())["files"]

    checkpoints = settings.audit.checkpoint_file
    if checkpoints is not None and checkpoints.is_file():
        digest, size = _copy(checkpoints, partial / CHECKPOINTS)
        files[CHECKPOINTS] = {"sha256": digest, "size": size}

    url = settings.index.url
    dialect = "postgresql" if _pgdump.is_postgres(url) else "sqlite"
    if dialect == "postgresql":
        index_file = PG_INDEX
        facts = _dump_postgres(url, partial / PG_INDEX)
    else:
        index_file = SQLITE_INDEX
        _snapshot_index(_sqlite_path(url), partial / SQLITE_INDEX)
        facts = _sqlite_facts(partial / SQLITE_INDEX)
    digest, size = _sha256_file(partial / index_file)
    files[index_file] = {"sha256": digest, "size": size}

    assert settings.storage.originals_dir is not None
    originals = settings.storage.originals_dir
    # Originals still only in a receiver's journal (storage/journal.py) are copied
    # as the files they are about to become (the index says which; a mark is dropped
    # only once its file is durable, so each is a file or a mark by now).
    if (originals / ".journal").is_dir():
        live = SqlIndex(settings.index.model_copy(update={"migrate": False}))
        try:
            FileOriginalStore(
                originals, fsync=False, staging=originals / ".staging" / "backup", index=live
            ).write_out_pending()
        finally:
            live.close()
    for path in _walk(originals, skip=(".staging", ".journal", ".pending")):
        rel = "originals/" + path.relative_to(originals).as_posix()
        target = partial / rel
        old = previous.get(rel)
        if old is not None and link_dest is not None and (link_dest / rel).exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(link_dest / rel, target)
            files[rel] = dict(old)
            report.linked += 1
            continue
        try:
            digest, size = _copy(path, target)
        except FileNotFoundError:
            continue  # deleted meanwhile (retention); the snapshot cannot reference it
        files[rel] = {"sha256": digest, "size": size}

    zarr_root = Path(settings.storage.zarr_url)
    for path in _walk(zarr_root):
        rel = "zarr/" + path.relative_to(zarr_root).as_posix()
        with contextlib.suppress(FileNotFoundError):
            digest, size = _copy(path, partial / rel)
            files[rel] = {"sha256": digest, "size": size}

    for path in _walk(settings.keys_dir):
        rel = "keys/" + path.relative_to(settings.keys_dir).as_posix()
        digest, size = _copy(path, partial / rel)
        os.chmod(partial / rel, 0o600)
        files[rel] = {"sha256": digest, "size": size}

    missing = sorted(k for k in facts.blobs if _blob_rel(k) not in files)
    if missing:
        raise RuntimeError(f"{len(missing)} indexed originals are missing from the data "
                           f"directory (first: {missing[0]})")
    report.audit_head = facts.audit_head
    report.instances = facts.instances

    manifest = {
        "format": FORMAT,
        "created": datetime.now(UTC).isoformat(),
        "source": {"data_dir": str(settings.data_dir.resolve()),
                   "zarr_url": str(zarr_root.resolve())},
        "index": {"dialect": dialect, "file": index_file},
        "alembic_revision": facts.revision,
        "instances": report.instances,
        "audit_head": list(report.audit_head) if report.audit_head else None,
        "files": files,
    }
    body = json.dumps(manifest, indent=1, sort_keys=True).encode()
    (partial / MANIFEST).write_bytes(body)
    report.manifest_sha256 = hashlib.sha256(body).hexdigest()
    report.files = len(files)
    report.bytes = sum(int(f["size"]) for f in files.values())
    os.replace(partial, dest)
    report.seconds = time.monotonic() - started
    logger.info("backup %s: %d files, %d bytes, %d instances in %.1f s", dest, report.files,
                report.bytes, report.instances, report.seconds)
    return report


def verify(src: Path) -> list[str]:
    """Everything wrong with the backup at ``src``; an empty list means it is intact."""
    problems: list[str] = []
    try:
        manifest = json.loads((src / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        return [f"manifest unreadable: {exc}"]
    if manifest.get("format") != FORMAT:
        return [f"unknown backup format {manifest.get('format')!r}"]
    listed: dict[str, dict[str, Any]] = manifest["files"]
    present = {p.relative_to(src).as_posix() for p in _walk(src)} - {MANIFEST}
    for rel in sorted(present - set(listed)):
        problems.append(f"{rel}: not in the manifest")
    for rel, meta in sorted(listed.items()):
        path = src / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
            continue
        digest, size = _sha256_file(path)
        if digest != meta["sha256"] or size != meta["size"]:
            problems.append(f"{rel}: content differs from the manifest")
    index = manifest.get("index") or {"dialect": "sqlite", "file": SQLITE_INDEX}
    path = src / str(index["file"])
    if path.is_file():
        key = (src / CHAIN_KEY).read_bytes() if CHAIN_KEY in listed else None
        cp_file = src / CHECKPOINTS if CHECKPOINTS in listed else None
        if index["dialect"] == "postgresql":
            problems += _verify_pg_dump(path, listed, key, cp_file)
        else:
            problems += _verify_sqlite(path, listed, key, cp_file)
    return problems


def _verify_sqlite(db: Path, listed: dict[str, dict[str, Any]], chain_key: bytes | None,
                   checkpoints: Path | None) -> list[str]:
    problems: list[str] = []
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            ok = con.execute("PRAGMA integrity_check").fetchone()[0]
        finally:
            con.close()
        if ok != "ok":
            problems.append(f"index.db: integrity check: {ok}")
        for key in sorted(_referenced_blobs(db)):
            if _blob_rel(key) not in listed:
                problems.append(f"original {key} is indexed but not in the backup")
        engine = create_engine(f"sqlite:///file:{db}?mode=ro&uri=true")
        try:
            for p in AuditStore(engine, key=chain_key, checkpoints=checkpoints).verify():
                problems.append(f"audit log: {p.message}")
        finally:
            engine.dispose()
    except sqlite3.DatabaseError as exc:
        problems.append(f"index.db: {exc}")
    return problems


def _verify_pg_dump(dump: Path, listed: dict[str, dict[str, Any]], chain_key: bytes | None,
                    checkpoints: Path | None) -> list[str]:
    """The same checks on a ``pg_dump`` archive, from its rows (no server needed)."""
    try:
        unreadable = _pgdump.list_ok(dump)
        if unreadable:
            return [f"{dump.name}: not a readable pg_dump archive: {unreadable}"]
        rows = _pgdump.table_rows(dump, ("instances", "audit_events", "audit_head"))
    except RuntimeError as exc:
        return [f"{dump.name}: {exc}"]
    problems: list[str] = []
    for key in sorted({str(r["blob_key"]) for r in rows.get("instances", [])}):
        if _blob_rel(key) not in listed:
            problems.append(f"original {key} is indexed but not in the backup")
    entries = sorted(
        (ChainedEntry.from_row(r | {"seq": int(str(r["seq"]))})
         for r in rows.get("audit_events", [])),
        key=lambda e: e.seq,
    )
    head_rows = [r for r in rows.get("audit_head", []) if r.get("id") == "1"]
    head = (int(str(head_rows[0]["seq"])), str(head_rows[0]["hash"])) if head_rows else None
    cps: list[Checkpoint] = []
    if checkpoints is not None:
        cps, bad = CheckpointFile(checkpoints).read(chain_key)
        problems += [f"audit log: {p.message}" for p in bad]
    for p in verify_chain(entries, head, key=chain_key, checkpoints=cps):
        problems.append(f"audit log: {p.message}")
    return problems


def restore(src: Path, data_dir: Path, *, index_url: str = "") -> dict[str, Any]:
    """Rebuild a data directory from a verified backup; ``data_dir`` must be new or empty.

    ``index_url`` is where the restored instance's index goes (its
    ``PACSLAB_INDEX__URL``; empty: ``<data_dir>/index.db``). A PostgreSQL backup is
    loaded there with ``pg_restore`` (one transaction) and needs an empty database;
    a SQLite backup needs a SQLite URL. Returns the manifest. Job results that name
    the old Zarr root are rewritten to the new one, so tiles of already converted
    series are served without re-running.
    """
    problems = verify(src)
    if problems:
        raise ValueError(f"backup {src} does not verify: {problems[0]}")
    if data_dir.exists() and any(data_dir.iterdir()):
        raise FileExistsError(f"{data_dir} is not empty")
    manifest: dict[str, Any] = json.loads((src / MANIFEST).read_text())
    index = manifest.get("index") or {"dialect": "sqlite", "file": SQLITE_INDEX}
    url = index_url or f"sqlite:///{(data_dir / SQLITE_INDEX).as_posix()}"
    to_postgres = _pgdump.is_postgres(url)
    if (index["dialect"] == "postgresql") != to_postgres:
        raise ValueError(f"the backup holds a {index['dialect']} index; the target index "
                         f"URL must be {index['dialect']} too")
    if to_postgres:
        _refuse_non_empty(url)
    else:
        db = _sqlite_path(url)
        if db.exists():
            raise FileExistsError(f"{db} exists")
    data_dir.mkdir(parents=True, exist_ok=True)
    for rel in manifest["files"]:
        if rel == index["file"]:
            continue
        target = data_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        _copy(src / rel, target)
    keys = data_dir / "keys"
    if keys.is_dir():
        os.chmod(keys, 0o700)
        for path in keys.iterdir():
            os.chmod(path, 0o600)
    if to_postgres:
        _pgdump.restore(src / str(index["file"]), url)
    else:
        db.parent.mkdir(parents=True, exist_ok=True)
        _copy(src / str(index["file"]), db)
    old_zarr = manifest["source"]["zarr_url"]
    new_zarr = str((data_dir / "zarr").resolve())
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE jobs SET result_json = replace(result_json, :old, :new)"),
                         {"old": json.dumps(old_zarr)[1:-1], "new": json.dumps(new_zarr)[1:-1]})
    finally:
        engine.dispose()
    return manifest


def _refuse_non_empty(url: str) -> None:
    engine = create_engine(url)
    try:
        tables = inspect(engine).get_table_names()
    finally:
        engine.dispose()
    if tables:
        raise FileExistsError(f"the target database is not empty ({len(tables)} tables)")
