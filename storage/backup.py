"""Consistent, verifiable snapshots of a running instance, and restoring them (issue 7 §5).

Order matters. The index is copied first, with SQLite's online backup API
(``sqlite3.Connection.backup``, one step: a WAL read transaction, so receivers keep
committing meanwhile) — it holds the action log, signed results, retention and API
keys too. Originals are copied after it: an instance is indexed only after its
original was published (``storage.archive``, blob first), so every original the
snapshot references is already on disk, and originals never change (content keys).
Every instance acknowledged before the backup started is therefore in it, bit for
bit. Zarr pyramids (one immutable store per job) and the keys directory follow.

``manifest.json`` lists every file with its SHA-256 and size; :func:`verify` checks
them, the SQLite integrity, the action log's hash chain and that every original the
index references is present. The snapshot is built in ``DEST.partial`` and renamed
to ``DEST`` when complete, so a directory named ``DEST`` is always whole.
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

from sqlalchemy import create_engine

from core.settings import Settings
from storage.audit import AuditStore

__all__ = ["BackupReport", "backup", "restore", "verify"]

logger = logging.getLogger(__name__)

FORMAT = "pacslab-backup/1"
MANIFEST = "manifest.json"


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


def _sqlite_path(url: str) -> Path:
    if not url.startswith("sqlite:///"):
        raise ValueError("pacslab backup copies SQLite indexes; back up PostgreSQL with "
                         "pg_basebackup or pg_dump and the files with this command's --no-index")
    return Path(url.removeprefix("sqlite:///"))


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

    db = _sqlite_path(settings.index.url)
    _snapshot_index(db, partial / "index.db")
    digest, size = _sha256_file(partial / "index.db")
    files["index.db"] = {"sha256": digest, "size": size}

    assert settings.storage.originals_dir is not None
    originals = settings.storage.originals_dir
    for path in _walk(originals, skip=(".staging",)):
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

    missing = sorted(k for k in _referenced_blobs(partial / "index.db")
                     if _blob_rel(k) not in files)
    if missing:
        raise RuntimeError(f"{len(missing)} indexed originals are missing from the data "
                           f"directory (first: {missing[0]})")

    engine = create_engine(f"sqlite:///{partial / 'index.db'}")
    try:
        store = AuditStore(engine)
        report.audit_head = store.head()
        with engine.connect() as conn:
            from sqlalchemy import text

            count = conn.execute(text("SELECT count(*) FROM instances")).scalar_one()
            report.instances = int(count)
            revision = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    finally:
        engine.dispose()

    manifest = {
        "format": FORMAT,
        "created": datetime.now(UTC).isoformat(),
        "source": {"data_dir": str(settings.data_dir.resolve()),
                   "zarr_url": str(zarr_root.resolve())},
        "alembic_revision": revision,
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
    db = src / "index.db"
    if db.is_file():
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
                for p in AuditStore(engine).verify():
                    problems.append(f"audit log: {p.message}")
            finally:
                engine.dispose()
        except sqlite3.DatabaseError as exc:
            problems.append(f"index.db: {exc}")
    return problems


def restore(src: Path, data_dir: Path) -> dict[str, Any]:
    """Rebuild a data directory from a verified backup; ``data_dir`` must be new or empty.

    Returns the manifest. Job results that name the old Zarr root are rewritten to
    the new one, so tiles of already converted series are served without re-running.
    """
    problems = verify(src)
    if problems:
        raise ValueError(f"backup {src} does not verify: {problems[0]}")
    if data_dir.exists() and any(data_dir.iterdir()):
        raise FileExistsError(f"{data_dir} is not empty")
    manifest: dict[str, Any] = json.loads((src / MANIFEST).read_text())
    data_dir.mkdir(parents=True, exist_ok=True)
    for rel in manifest["files"]:
        target = data_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        _copy(src / rel, target)
    keys = data_dir / "keys"
    if keys.is_dir():
        os.chmod(keys, 0o700)
        for path in keys.iterdir():
            os.chmod(path, 0o600)
    old_zarr = manifest["source"]["zarr_url"]
    new_zarr = str((data_dir / "zarr").resolve())
    con = sqlite3.connect(data_dir / "index.db")
    try:
        con.execute("UPDATE jobs SET result_json = replace(result_json, ?, ?)",
                    (json.dumps(old_zarr)[1:-1], json.dumps(new_zarr)[1:-1]))
        con.commit()
    finally:
        con.close()
    return manifest
