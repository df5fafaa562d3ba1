"""A real Orthanc as a DICOM peer of the tests (issue 16): start, stop, start again.

Its storage folder survives a stop, so "down for a while, then back" keeps what it
had. Skips the test when Orthanc is not installed (Debian package ``orthanc``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.support import free_port, wait_until

__all__ = ["OrthancPeer"]

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class OrthancPeer:
    def __init__(self, work: Path, *, aet: str = "ORTHANC",
                 modalities: dict[str, list[Any]] | None = None,
                 dicomweb: bool = False, extra: dict[str, Any] | None = None,
                 authorization: str = "") -> None:
        exe = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        if not Path(exe).exists():
            pytest.skip("Orthanc not installed (Debian package orthanc)")
        if dicomweb and not DICOMWEB_PLUGIN.exists():
            pytest.skip("Orthanc DICOMweb plugin not installed (Debian orthanc-dicomweb)")
        self.exe = exe
        self.work = work
        self.aet = aet
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.base = f"http://127.0.0.1:{self.http_port}"
        work.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "Name": "peer", "StorageDirectory": str(work / "db"),
            "IndexDirectory": str(work / "db"), "DicomAet": aet,
            "DicomPort": self.dicom_port, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False, "DicomModalities": modalities or {},
            "Plugins": [str(DICOMWEB_PLUGIN)] if dicomweb else [],
            "DicomScuTimeout": 20,
        }
        config.update(extra or {})
        if dicomweb:
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        self.config = work / "orthanc.json"
        self.config.write_text(json.dumps(config))
        self.proc: subprocess.Popen[bytes] | None = None
        self.headers = {"Authorization": authorization} if authorization else {}
        #: Orthanc's own log (warnings and errors), kept across restarts: its answer to a
        #: failed request (an HTTP 500) is explained there, not in the response.
        self.log = work / "orthanc.log"

    def start(self) -> OrthancPeer:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([self.exe, str(self.config)], start_new_session=True,
                                         stdout=log, stderr=log)
        proc = self.proc

        def answers() -> bool:
            try:
                self.get("/system")
                return True
            except OSError:
                assert proc.poll() is None, "Orthanc did not start (it exited)"
                return False

        wait_until(answers, timeout=30, interval=0.1, message="Orthanc did not start")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def log_tail(self, chars: int = 2000) -> str:
        """The end of Orthanc's log, for an assertion message."""
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def get(self, path: str) -> Any:
        req = urllib.request.Request(self.base + path, headers=self.headers)
        with urllib.request.urlopen(req, timeout=30) as rsp:
            return json.loads(rsp.read())

    def post(self, path: str, body: Any) -> Any:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method="POST",
                                     headers=self.headers)
        with urllib.request.urlopen(req, timeout=120) as rsp:
            raw = rsp.read()
        return json.loads(raw) if raw else None

    def sop_instance_uids(self) -> set[str]:
        out = set()
        for oid in self.get("/instances"):
            tags = self.get(f"/instances/{oid}/simplified-tags")
            out.add(str(tags["SOPInstanceUID"]))
        return out
