"""Helpers for the lab inbox tests: settings with the test profiles, a watcher, drops."""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

from core.settings import Settings
from ingest.labs.watcher import FileOutcome, LabWatcher
from pacslab.labs import build_lab_watcher
from pacslab.wiring import build_index
from storage.index.lab import SqlLabStore
from storage.index.sql import SqlIndex

LAB_DATA = Path(__file__).resolve().parents[2] / "data" / "lab"

#: The CSV/TXT profiles of tests/ingest/labs/test_lab_delimited.py, written as settings.
PROFILES: dict[str, Any] = {
    "auto": {},
    "cobas": {"format": "cobas_c111", "analyzer": "cobas c111"},
    "labor_sued": {
        "format": "delimited",
        "delimited": {
            "columns": {
                "specimen_id": "Probe",
                "patient_id": "Patienten-Nr",
                "patient_name": "Name",
                "birth_date": "Geburtsdatum",
                "test_code": "Test",
                "value": "Wert",
                "unit": "Einheit",
                "reference_range": "Referenz",
                "flag": "Kennz.",
                "date": "Datum",
            },
            "delimiter": ";",
            "encoding": "latin-1",
            "decimal_comma": True,
            "header_row": 1,
            "date_format": "%d.%m.%Y %H:%M",
            "birth_date_format": "%d.%m.%Y",
            "instrument_id": "SUED-1",
            "test_code_map": {"HB": "718-7^Hemoglobin [Mass/volume] in Blood^LN"},
        },
    },
    "vn_export": {
        "format": "delimited",
        "delimited": {
            "columns": {
                "specimen_id": "Mã mẫu",
                "patient_id": "Mã BN",
                "patient_name": "Họ tên",
                "test_code": "Xét nghiệm",
                "value": "Kết quả",
                "exponent": "Số mũ",
                "unit": "Đơn vị",
                "flag": "Cờ",
                "date": "Ngày giờ",
            },
            "delimiter": "\t",
            "quotechar": None,
            "encoding": "cp1258",
            "date_format": "%d/%m/%Y %H:%M",
            "qc_specimen_prefixes": ["QC-"],
        },
    },
}

#: Which inbox each shared/ours file goes to.
CSV_PROFILE = {
    "roche_cobas_c111_export_semicolon.csv": "cobas",
    "ours_decimal_comma_latin1_de.csv": "labor_sued",
    "ours_scaled_int_cp1258_vi.txt": "vn_export",
}


def lab_settings(settings: Settings, **lab: Any) -> Settings:
    """``settings`` with the test profiles, no quiet period and ``lab`` overrides."""
    section = {"profiles": PROFILES, **lab}
    return settings.model_copy(
        update={
            "lab": type(settings.lab).model_validate(section),
            "ingest": settings.ingest.model_copy(update={"lab_stable_s": 0.0}),
        }
    )


@dataclass
class LabRig:
    settings: Settings
    watcher: LabWatcher
    store: SqlLabStore
    index: SqlIndex
    release: Any
    outcomes: list[FileOutcome] = field(default_factory=list)

    def inbox(self, profile: str = "auto") -> Path:
        return self.settings.lab_inbox / profile

    def drop(self, source: Path | str, profile: str = "auto", name: str | None = None) -> Path:
        src = LAB_DATA / source if isinstance(source, str) else source
        dest = self.inbox(profile) / (name or src.name)
        shutil.copyfile(src, dest)
        return dest

    def run(self) -> list[FileOutcome]:
        return self.watcher.run_until_idle()


def make_rig(settings: Settings, *, use_events: bool = False) -> Generator[LabRig, None, None]:
    build_index(settings, migrate=True).close()
    watcher, release = build_lab_watcher(settings, use_events=use_events)
    index = build_index(settings, migrate=False)
    rig = LabRig(settings, watcher, SqlLabStore(index), index, release)
    try:
        yield rig
    finally:
        watcher.stop()
        release()
        index.close()


#: ``with open_rig(settings) as rig:``
open_rig = contextlib.contextmanager(make_rig)


@contextlib.contextmanager
def webhook_receiver() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A loopback HTTP server keeping each JSON body POSTed to it: ``(url, bodies)``."""
    received: list[dict[str, Any]] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers["Content-Length"])
            received.append(json.loads(self.rfile.read(length)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    finally:
        server.shutdown()
