"""Helpers shared by the security tests (imported, unlike conftest fixtures)."""

from __future__ import annotations

import os
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread

from core.settings import Settings
from core.synthetic import write_ct_series
from storage.backup import backup
from tests.support import Receiver, dcmtk, storescu_responses


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


@dataclass
class BackupDuringIngest:
    files: list[Path]
    acknowledged: list[str]  # SOP Instance UIDs, in the order storescu saw success
    before_backup: list[str]  # those acknowledged before the backup started
    report: Any  # what storage.backup.backup returned


def backup_during_storescu(receiver: Receiver, settings: Settings, tmp_path: Path, *,
                           slices: int, size: int, start_after: int) -> BackupDuringIngest:
    """Send a CT series with DCMTK storescu and take ``pacslab backup`` to
    ``tmp_path/backup`` from another thread once ``start_after`` instances are
    acknowledged (issue #7: a backup taken while a modality is sending)."""
    files = write_ct_series(tmp_path / "ct", slices=slices, rows=size, columns=size)
    uid_of = {p.resolve(): str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
              for p in files}
    sender = subprocess.Popen(
        [dcmtk("storescu"), "-v", "+sd", "127.0.0.1", str(receiver.port), str(tmp_path / "ct")],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "TCP_NODELAY": "1"})
    assert sender.stderr is not None
    acknowledged: list[str] = []
    before_backup: list[str] = []
    result: dict[str, object] = {}

    def take_backup() -> None:
        try:
            result["report"] = backup(settings, tmp_path / "backup")
        except BaseException as exc:  # reported by the main thread
            result["error"] = exc

    worker: threading.Thread | None = None
    for current, status in storescu_responses(sender.stderr):
        if status == "Success" and current is not None:
            acknowledged.append(uid_of[current])
            if len(acknowledged) == start_after:
                before_backup = list(acknowledged)  # acknowledged before the backup starts
                worker = threading.Thread(target=take_backup)
                worker.start()
    assert sender.wait(timeout=120) == 0
    assert worker is not None
    worker.join(timeout=120)
    assert "error" not in result, result.get("error")
    return BackupDuringIngest(files, acknowledged, before_backup, result["report"])
