"""The ``pacslab`` command: serve, demo and operator tools."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from core import __version__
from core.logging import configure
from core.settings import Settings

if TYPE_CHECKING:
    from storage.index.sql import SqlIndex

__all__ = ["main"]

logger = logging.getLogger("pacslab")


def _prepare(settings: Settings) -> None:
    """Create the data layout and bring the index schema to head, before any fork."""
    from pacslab.wiring import build_index

    for sub in ("inbox/orders/processed", "inbox/orders/rejected"):
        (settings.data_dir / sub).mkdir(parents=True, exist_ok=True)
    for profile in settings.lab.profiles:
        for state in ("processed", "rejected"):
            (settings.lab_inbox / profile / state).mkdir(parents=True, exist_ok=True)
    index = build_index(settings, migrate=True)
    try:
        _ensure_keys(settings)
        _anchor_audit(settings, index)
    finally:
        index.close()  # children open their own connections after fork


def _anchor_audit(settings: Settings, index: SqlIndex) -> None:
    """Record where the keyed chain begins (a no-op once it has begun), before any fork."""
    from storage.audit import AuditLog

    if settings.audit.enabled and settings.audit.chain_key_file is not None:
        AuditLog(index.engine, settings.audit, url=index.url).anchor()


def _ensure_keys(settings: Settings) -> None:
    """Embedded defaults of a first run: token key, result-signing certificate, secrets.

    Created here, before any fork, so every process reads the same files.
    """
    from api.keys import ensure_hospital_cert, ensure_private_key
    from storage.audit import load_chain_key, load_secret

    if settings.audit.chain_key_file is not None:
        # First, so nothing is created when it refuses: AuditKeyError (missing after
        # keying began, or readable by others), which main() prints with exit code 2.
        load_chain_key(settings.audit.chain_key_file, settings.audit.checkpoint_file)
    if settings.auth.enabled and settings.auth.is_local:
        assert settings.auth.local_key is not None
        ensure_private_key(settings.auth.local_key)
    ensure_hospital_cert(settings.signing)
    assert settings.audit.patient_key_file is not None
    load_secret(settings.audit.patient_key_file)


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from pacslab.dicom_process import DicomProcesses

    _prepare(settings)
    dicom = DicomProcesses(settings)
    dicom.start()  # fork first: the children must not inherit our threads
    from pacslab.api_process import run_api
    from pacslab.background import start_background
    from pacslab.runtime import configure_runtime

    # pydicom's settings for the API (STOW-RS, WADO-RS) and the inboxes; the worker
    # process sets its own.
    configure_runtime()

    background = start_background(settings)
    try:
        _exit_on_sigterm()
        run_api(settings)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the stops below are bounded
        background.stop()
        dicom.stop()
    return 0


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _exit_on_sigterm() -> None:
    """Make SIGTERM end ``run_api`` with ``SystemExit(0)``, so what follows it runs.

    uvicorn takes SIGTERM while it serves, shuts down gracefully, then puts the
    previous handler back and raises the signal again (so a default handler still
    ends the process). Under Python's default that ended the process there: the
    worker, the inboxes and the receivers were never stopped, only killed with it.
    """
    signal.signal(signal.SIGTERM, _raise_exit)


def _until_sigterm() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()


def cmd_api(settings: Settings, args: argparse.Namespace) -> int:
    """Only the HTTP API (for scale-out, and for the fault tests)."""
    from pacslab.api_process import run_api

    _prepare(settings)
    _exit_on_sigterm()
    run_api(settings)
    return 0


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    """Only the processing worker (for scale-out, and for the fault tests).

    Its claims carry the name ``<host>-<processing.worker_name>``: restarted, it
    resumes the jobs it left ``running``; jobs of a worker that never comes back are
    requeued by any worker once their lease (``processing.lease_s``) expires.
    """
    from pacslab.runtime import configure_runtime
    from pacslab.worker_process import start_worker

    _prepare(settings)
    configure_runtime()  # a DICOM SCU (forwarding, commitment reports)
    stop_worker = start_worker(settings, name=settings.processing.worker_name)
    _until_sigterm()
    stop_worker()
    return 0


def cmd_dicom(settings: Settings, args: argparse.Namespace) -> int:
    """Only the DICOM receiver (for scale-out: several receivers, one index)."""
    from pacslab.dicom_process import DicomProcesses

    _prepare(settings)
    dicom = DicomProcesses(settings)
    dicom.start()
    _until_sigterm()
    dicom.stop()
    return 0


def cmd_labs(settings: Settings, args: argparse.Namespace) -> int:
    """Only the lab side: inbox watcher and analyzer links (scale-out, crash tests)."""
    from pacslab.labs import start_analyzer_links, start_lab_watcher

    _prepare(settings)
    stop_watcher = start_lab_watcher(settings)
    stop_links = start_analyzer_links(settings) if settings.analyzers else None
    _until_sigterm()
    if stop_links is not None:
        stop_links()
    stop_watcher()
    return 0


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    from pacslab.demo import run_demo

    return run_demo(settings, slices=args.slices, keep_running=not args.exit)


def cmd_token(settings: Settings, args: argparse.Namespace) -> int:
    """Print a bearer token from the embedded issuer (RFC 7519, ES256)."""
    from api.keys import issue_token
    from core.auth import SCOPES

    if not settings.auth.is_local:
        print(
            "an identity provider is configured (auth.jwks_*): get tokens from it", file=sys.stderr
        )
        return 2
    unknown = sorted(set(args.scopes) - set(SCOPES))
    if unknown:
        print(f"unknown scopes {unknown}; known: {' '.join(SCOPES)}", file=sys.stderr)
        return 2
    _ensure_keys(settings)
    print(issue_token(settings.auth, subject=args.subject, scopes=args.scopes, ttl_s=args.ttl))
    return 0


def cmd_apikey(settings: Settings, args: argparse.Namespace) -> int:
    """Create, list or revoke device API keys (stored as scrypt hashes)."""
    from pacslab.wiring import build_index
    from storage.apikeys import ApiKeyStore

    index = build_index(settings, migrate=True)
    try:
        store = ApiKeyStore(index.engine)
        if args.action == "create":
            try:
                key = store.create(args.name, args.scopes)
            except ValueError as exc:
                print(exc, file=sys.stderr)
                return 2
            print(key)
            print(
                "shown once: store it in the device; send it as 'X-API-Key: <key>' or "
                "'Authorization: Bearer <key>'",
                file=sys.stderr,
            )
        elif args.action == "list":
            for rec in store.list():
                state = "revoked" if rec.revoked else "active"
                print(f"{rec.key_id}  {state:7}  {rec.name}  {' '.join(sorted(rec.scopes))}")
        else:
            if not store.revoke(args.key_id):
                print(f"no API key {args.key_id}", file=sys.stderr)
                return 1
            print(f"revoked {args.key_id}: refused from the next request on")
    finally:
        index.close()
    return 0


def cmd_audit(settings: Settings, args: argparse.Namespace) -> int:
    """``audit verify``: check the action log's keyed chain against its checkpoints.

    Exit 1 if anything was tampered with (an edited, removed, reordered, re-chained
    or cut entry, a forged checkpoint), 2 if the chain key cannot be used.
    """
    from core.audit import is_keyed, to_json_line
    from pacslab.wiring import build_index
    from storage.audit import AuditKeyError, AuditStore

    try:
        index = build_index(settings, migrate=True)
    except Exception as exc:  # an unreachable or unreadable index: say so, no traceback
        print(f"pacslab: cannot open the index: {exc}", file=sys.stderr)
        return 2
    try:
        if args.action == "export":
            for entry in AuditStore(index.engine).entries():
                print(to_json_line(entry))
            return 0
        try:
            store = AuditStore.from_settings(index.engine, settings.audit)
        except AuditKeyError as exc:
            print(f"pacslab: {exc}", file=sys.stderr)
            return 2
        problems = store.verify()
        head = store.head()
        unkeyed = sum(1 for e in store.entries() if not is_keyed(e.hash))
    finally:
        index.close()
    if problems:
        for p in problems:
            print(f"TAMPERED {p.kind} at entry {p.seq}: {p.message}")
        return 1
    seq, digest = head or (0, "")
    print(f"audit log intact: {seq} entries, head {digest}")
    if store.key is None:
        print("note: no chain key: keyed entries were checked for their links only")
    elif unkeyed:
        print(
            f"note: {unkeyed} entries predate the chain key (SHA-256 only); "
            "anchored by the first keyed entry"
        )
    return 0


def cmd_share(settings: Settings, args: argparse.Namespace) -> int:
    """``share STUDY_UID --hours N`` prints a link; ``--revoke ID``; ``--list`` (issue 17)."""
    import getpass

    from core.errors import ServiceError
    from pacslab.wiring import build_index
    from services.sharing import ShareService
    from storage.audit import AuditLog, load_secret
    from storage.shares import ShareStore

    index = build_index(settings, migrate=True)
    audit = AuditLog(index.engine, settings.audit, url=index.url)
    assert settings.audit.patient_key_file is not None
    service = ShareService(ShareStore(index), audit=audit,
                           patient_secret=load_secret(settings.audit.patient_key_file))
    who = f"cli:{getpass.getuser()}"
    try:
        if args.list:
            for r in service.list(study_uid=args.study_uid):
                print(f"{r.share_id}  {service.state(r):7}  {r.expires_at.isoformat()}  "
                      f"{r.study_uid}  {r.note}")
        elif args.revoke:
            service.revoke(args.revoke, by=who, source="cli")
            print(f"revoked {args.revoke}: refused from the next request on")
        elif args.study_uid:
            created = service.create(args.study_uid, expires_in_s=round(args.hours * 3600),
                                     note=args.note, by=who, source="cli")
            http = settings.http
            host = "localhost" if http.host in ("0.0.0.0", "::", "") else http.host
            base = http.public_url or f"http://{host}:{http.port}"
            print(created.url(base))
            print(f"share {created.record.share_id} until {created.record.expires_at.isoformat()}"
                  " (the link is shown once)", file=sys.stderr)
        else:
            print("pacslab share: give a STUDY_UID, --revoke ID or --list", file=sys.stderr)
            return 2
    except ServiceError as exc:
        print(f"pacslab share: {exc}", file=sys.stderr)
        return 1
    finally:
        audit.close()
        index.close()
    return 0


def cmd_verify_signature(settings: Settings, args: argparse.Namespace) -> int:
    """Verify a signed report offline with the hospital certificate alone."""
    from api.keys import load_certificate
    from api.signing import verify_detached
    from core.canonical import canonical_json
    from core.errors import InvalidSignatureError

    payload = args.report.read_bytes()
    if args.canonicalize:
        payload = canonical_json(payload)
    try:
        header = verify_detached(payload, args.signature.read_text(), load_certificate(args.cert))
    except InvalidSignatureError as exc:
        print(f"INVALID: {exc}")
        return 1
    cert = load_certificate(args.cert)
    print(
        f"valid: signed {header.get('sigT', '?')} with {header['alg']} by "
        f"{cert.subject.rfc4514_string()}"
    )
    return 0


def cmd_retention(settings: Settings, args: argparse.Namespace) -> int:
    """Assign retention classes and list (``report``) or delete what has expired."""
    import datetime as dt

    from core.errors import NotFoundError, RetentionError
    from core.retention import RetentionDecision, add_years
    from pacslab.wiring import build_index
    from storage.originals import FileOriginalStore
    from storage.retention import RetentionStore

    today = dt.date.fromisoformat(args.today) if args.today else dt.date.today()
    index = build_index(settings, migrate=True)
    try:
        store = RetentionStore(index.engine, settings.retention)
        if args.action == "report":
            added = store.assign_studies()
            rows = store.expired(today)
            if args.json:
                import json
                from dataclasses import asdict

                print(json.dumps([asdict(r) for r in rows], indent=1))
            else:
                print(
                    f"{added} new studies classified; {len(rows)} records past retention "
                    f"on {today.isoformat()}:"
                )
                for r in rows:
                    print(
                        f"  {r.target_kind:6} {r.target_id}  {r.years} y ({r.rule}) "
                        f"expired {r.expires_on}"
                    )
            return 0
        if args.action == "set":
            row = store.get("study", args.study)
            ref = dt.date.fromisoformat(row.reference_date) if row else today
            store.set(
                "study",
                args.study,
                RetentionDecision(args.years, args.rule, add_years(ref, args.years)),
                ref,
            )
            print(f"study {args.study}: {args.years} years from {ref.isoformat()}")
            return 0
        assert settings.storage.originals_dir is not None
        originals = FileOriginalStore(settings.storage.originals_dir)
        try:
            n = store.delete_study(args.study, today, originals)
        except (RetentionError, NotFoundError) as exc:
            print(f"refused: {exc}", file=sys.stderr)
            return 1
        print(f"deleted study {args.study} ({n} instance versions)")
        return 0
    finally:
        index.close()


def cmd_purge_rejected(settings: Settings, args: argparse.Namespace) -> int:
    """Delete what IHE IOCM rejections hid (services/rejection.py), in the action log.

    113039 ("Data Retention Policy Expired") rejections are purged only once the
    study's retention ended; the others whenever this is run.
    """
    import datetime as dt
    import getpass

    from core.errors import ServiceError
    from pacslab.wiring import build_audit, build_index
    from services.rejection import RejectionService
    from storage.originals import open_originals

    today = dt.date.fromisoformat(args.today) if args.today else None
    index = build_index(settings, migrate=True)
    audit, _secret = build_audit(settings, index)
    try:
        service = RejectionService(index, open_originals(settings, index=index), audit=audit,
                                   retention=settings.retention)
        try:
            report = service.purge(by=f"cli:{getpass.getuser()}", codes=args.code,
                                   study=args.study, agent_type="system", today=today)
        except ServiceError as exc:
            print(f"refused: {exc}", file=sys.stderr)
            return 1
        print(f"purged {report.purged.instances} rejected instances "
              f"({report.purged.versions} versions, {report.purged.originals} originals); "
              f"{report.kept_for_retention} kept until their retention ends")
        return 0
    finally:
        audit.close()
        index.close()


def cmd_export(settings: Settings, args: argparse.Namespace) -> int:
    """A study or series as a ZIP with a DICOMDIR (issue 17.3), in the action log."""
    import getpass

    from core.errors import NotFoundError, ServiceError
    from pacslab.wiring import build_audit, build_index
    from services.export import ExportRequest, ExportService
    from storage.originals import open_originals

    index = build_index(settings, migrate=True)
    try:
        audit, secret = build_audit(settings, index)
        service = ExportService(
            index,
            open_originals(settings, index=index),
            audit=audit,
            patient_secret=secret,
            max_instances=settings.qr.max_retrieve_instances,
        )
        request = ExportRequest(args.study, args.series, args.deidentify)
        try:
            progress = service.write(
                request, args.output, agent=f"cli:{getpass.getuser()}", agent_type="user"
            )
        except NotFoundError:
            print(f"pacslab: no such study or series: {args.study}", file=sys.stderr)
            return 1
        except ServiceError as exc:
            print(f"pacslab: export failed: {exc.title}: {exc}", file=sys.stderr)
            return 1
        print(f"{args.output}: {progress.instances_done} instances, {progress.bytes_done} bytes")
        return 0
    finally:
        index.close()


def cmd_backup(settings: Settings, args: argparse.Namespace) -> int:
    """``backup DEST`` or ``backup verify DEST``."""
    from pathlib import Path

    from storage.backup import backup, verify

    if args.target[0] == "verify":
        if len(args.target) != 2:
            print("usage: pacslab backup verify DEST", file=sys.stderr)
            return 2
        problems = verify(Path(args.target[1]))
        for p in problems:
            print(f"BAD {p}")
        if not problems:
            print(f"backup {args.target[1]} verifies")
        return 1 if problems else 0
    if len(args.target) != 1:
        print("usage: pacslab backup DEST", file=sys.stderr)
        return 2
    report = backup(settings, Path(args.target[0]), link_dest=args.link_dest)
    print(
        f"backup {report.dest}: {report.files} files ({report.linked} linked), "
        f"{report.bytes} bytes, {report.instances} instances, in {report.seconds:.1f} s; "
        f"manifest sha256 {report.manifest_sha256}"
    )
    return 0


def cmd_restore(settings: Settings, args: argparse.Namespace) -> int:
    """Rebuild a data directory from a backup, then bring its schema to head.

    The index goes where the restored instance will look for it: its
    ``PACSLAB_INDEX__URL`` (a PostgreSQL backup needs an empty PostgreSQL database
    there), else ``<data-dir>/index.db``.
    """
    from storage.backup import restore

    restored = Settings(data_dir=args.data_dir)
    try:
        manifest = restore(args.source, args.data_dir, index_url=restored.index.url)
    except (ValueError, FileExistsError, RuntimeError) as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    _prepare(restored)
    print(
        f"restored {manifest['instances']} instances into {args.data_dir}; start it with "
        f"PACSLAB_DATA_DIR={args.data_dir} pacslab serve"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pacslab",
        description="Imaging and lab data service. Configuration comes from PACSLAB_* "
        "environment variables (nested with __, e.g. PACSLAB_DICOM__PORT) or a TOML/YAML "
        "file named by PACSLAB_CONFIG.",
    )
    parser.add_argument("--version", action="version", version=f"pacslab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run every service on embedded defaults (DICOM 11112, HTTP 8000)")
    sub.add_parser("dicom", help="run only the DICOM receiver")
    sub.add_parser(
        "labs", help="run only the lab inbox watcher (data/inbox/lab/<profile>/) and analyzer links"
    )
    sub.add_parser("worker", help="run only the processing worker (instance and series jobs)")
    sub.add_parser("api", help="run only the HTTP API (DICOMweb, FHIR, IIIF, DZI)")
    demo = sub.add_parser(
        "demo", help="start the service, send a synthetic CT series, show where to look"
    )
    demo.add_argument("--slices", type=int, default=120)
    demo.add_argument("--exit", action="store_true", help="stop once the series is indexed")

    from pathlib import Path

    token = sub.add_parser("token", help="print a bearer token from the embedded issuer")
    token.add_argument(
        "--scopes",
        nargs="+",
        required=True,
        help="e.g. imaging.read lab.read orders.write results.sign admin",
    )
    token.add_argument("--subject", default="operator", help="the sub claim (who)")
    token.add_argument("--ttl", type=int, default=None, help="lifetime in seconds")

    apikey = sub.add_parser("apikey", help="device API keys (stored hashed)")
    api_sub = apikey.add_subparsers(dest="action", required=True)
    create = api_sub.add_parser("create", help="create a key; it is printed once")
    create.add_argument("--scopes", nargs="+", required=True)
    create.add_argument("--name", default="device")
    api_sub.add_parser("list")
    revoke = api_sub.add_parser("revoke")
    revoke.add_argument("key_id")

    share = sub.add_parser("share", help="a time-limited link to one study in the viewer")
    share.add_argument("study_uid", nargs="?", help="the study to share")
    share.add_argument("--hours", type=float, default=72.0, help="lifetime (default 72)")
    share.add_argument("--note", default="", help="for the list, e.g. who it is for (no PHI)")
    share.add_argument("--revoke", metavar="ID", help="revoke share ID")
    share.add_argument("--list", action="store_true", help="list shares (of STUDY_UID)")

    audit = sub.add_parser("audit", help="the hash-chained action log")
    audit.add_argument("action", choices=["verify", "export"])

    verify = sub.add_parser(
        "verify-signature", help="verify a signed report with the certificate alone"
    )
    verify.add_argument("report", type=Path, help="the signed bytes (GET …/_history/N)")
    verify.add_argument("signature", type=Path, help="the detached JWS (header..signature)")
    verify.add_argument("--cert", type=Path, required=True, help="hospital certificate (PEM)")
    verify.add_argument(
        "--canonicalize",
        action="store_true",
        help="canonicalize report.json (RFC 8785) first, e.g. a pretty copy",
    )

    retention = sub.add_parser("retention", help="retention classes and expiry")
    ret_sub = retention.add_subparsers(dest="action", required=True)
    report = ret_sub.add_parser("report", help="classify new studies, list what may be deleted")
    report.add_argument("--json", action="store_true")
    report.add_argument("--today", help="ISO date (default: today)")
    rset = ret_sub.add_parser("set", help="lengthen a study's retention (e.g. deceased: 30)")
    rset.add_argument("--study", required=True)
    rset.add_argument("--years", type=int, required=True)
    rset.add_argument("--rule", default="manual")
    rset.add_argument("--today", help=argparse.SUPPRESS)
    rdel = ret_sub.add_parser("delete", help="delete a study whose retention has ended")
    rdel.add_argument("--study", required=True)
    rdel.add_argument("--today", help="ISO date (default: today)")

    purge = sub.add_parser(
        "purge-rejected", help="delete instances rejected by IHE IOCM (audited)"
    )
    purge.add_argument("--code", action="append", default=[],
                       help="only this rejection code (CID 7011; repeatable; default all)")
    purge.add_argument("--study", help="only this Study Instance UID")
    purge.add_argument("--today", help="ISO date for retention checks (default: today)")

    backup = sub.add_parser("backup", help="backup DEST | backup verify DEST")
    backup.add_argument("target", nargs="+", metavar="DEST")
    backup.add_argument(
        "--link-dest",
        type=Path,
        default=None,
        help="an earlier backup: unchanged originals are hard-linked",
    )

    export = sub.add_parser(
        "export", help="a study or series as a ZIP with a DICOMDIR (PS3.10/PS3.11)"
    )
    export.add_argument("study", metavar="STUDY_UID")
    export.add_argument("--series", metavar="UID", default=None, help="only this series")
    export.add_argument(
        "--deidentify", action="store_true", help="PS3.15 E.1 Basic Confidentiality Profile"
    )
    export.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.zip")

    restore = sub.add_parser("restore", help="rebuild an instance from a backup")
    restore.add_argument("source", type=Path)
    restore.add_argument("--data-dir", type=Path, required=True)
    return parser


def _settings_or_none() -> Settings | None:
    """Build Settings; on a bad configuration print one line to stderr and return None.

    An unknown ``PACSLAB_*`` variable or config key (a typo: the default would be used
    silently) and an invalid value both stop every command before it starts, with
    exit code 2 (as argparse does for a bad command line), not a traceback.
    """
    from pydantic import ValidationError

    from core.settings import UnknownSettingError

    try:
        return Settings()
    except UnknownSettingError as exc:
        print(f"pacslab: {exc}", file=sys.stderr)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
            for err in exc.errors()
        )
        print(f"pacslab: invalid configuration: {problems}", file=sys.stderr)
    except ValueError as exc:  # PACSLAB_CONFIG not a file, or of an unknown kind
        print(f"pacslab: {exc}", file=sys.stderr)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = _settings_or_none()
    if settings is None:
        return 2
    configure(settings.log.level, json_format=settings.log.json_format)
    commands = {
        "serve": cmd_serve,
        "dicom": cmd_dicom,
        "labs": cmd_labs,
        "worker": cmd_worker,
        "api": cmd_api,
        "demo": cmd_demo,
        "token": cmd_token,
        "apikey": cmd_apikey,
        "audit": cmd_audit,
        "share": cmd_share,
        "verify-signature": cmd_verify_signature,
        "retention": cmd_retention,
        "purge-rejected": cmd_purge_rejected,
        "backup": cmd_backup,
        "restore": cmd_restore,
        "export": cmd_export,
    }
    from storage.audit import AuditKeyError

    try:
        return commands[args.command](settings, args)
    except AuditKeyError as exc:
        print(f"pacslab: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
