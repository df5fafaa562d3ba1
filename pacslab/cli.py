"""The ``pacslab`` command: serve, demo and operator tools."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Sequence

from core.logging import configure
from core.settings import Settings

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
    index.close()  # children open their own connections after fork


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from api.app import create_app
    from pacslab.dicom_process import DicomProcesses

    _prepare(settings)
    dicom = DicomProcesses(settings)
    dicom.start()  # fork first: the children must not inherit our threads
    from pacslab.background import start_background

    background = start_background(settings)
    app = create_app(settings)
    logger.info("HTTP on port %d; data in %s", settings.http.port, settings.data_dir)
    try:
        uvicorn.run(
            app,
            host=settings.http.host,
            port=settings.http.port,
            log_level=settings.log.level.lower(),
            access_log=False,
        )
    finally:
        background.stop()
        dicom.stop()
    return 0


def cmd_dicom(settings: Settings, args: argparse.Namespace) -> int:
    """Only the DICOM receiver (for scale-out: several receivers, one index)."""
    from pacslab.dicom_process import DicomProcesses

    _prepare(settings)
    dicom = DicomProcesses(settings)
    dicom.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    dicom.stop()
    return 0


def cmd_labs(settings: Settings, args: argparse.Namespace) -> int:
    """Only the lab inbox watcher (for scale-out, and for the crash test)."""
    from pacslab.labs import start_lab_watcher

    _prepare(settings)
    stop_watcher = start_lab_watcher(settings)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    stop_watcher()
    return 0


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    from pacslab.demo import run_demo

    return run_demo(settings, slices=args.slices, keep_running=not args.exit)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pacslab",
        description="Imaging and lab data service. Configuration comes from PACSLAB_* "
        "environment variables (nested with __, e.g. PACSLAB_DICOM__PORT) or a TOML/YAML "
        "file named by PACSLAB_CONFIG.",
    )
    parser.add_argument("--version", action="version", version="pacslab 0.1.0")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run every service on embedded defaults (DICOM 11112, HTTP 8000)")
    sub.add_parser("dicom", help="run only the DICOM receiver")
    sub.add_parser("labs", help="run only the lab inbox watcher (data/inbox/lab/<profile>/)")
    demo = sub.add_parser(
        "demo", help="start the service, send a synthetic CT series, show where to look"
    )
    demo.add_argument("--slices", type=int, default=120)
    demo.add_argument("--exit", action="store_true", help="stop once the series is indexed")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings()
    configure(settings.log.level, json_format=settings.log.json_format)
    commands = {"serve": cmd_serve, "dicom": cmd_dicom, "labs": cmd_labs, "demo": cmd_demo}
    try:
        return commands[args.command](settings, args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
