"""``pacslab demo``: start the service, send a synthetic CT series over C-STORE, show it.

Everything goes through the real paths: a ``pacslab serve`` process, a DICOM association
(pynetdicom as the modality), the durable store and index, the processing worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from core.settings import Settings
from core.synthetic import write_ct_series
from pacslab.runtime import configure_runtime

__all__ = ["run_demo"]


def _echo(port: int) -> bool:
    ae = AE(ae_title="PACSLAB-DEMO")
    ae.add_requested_context(Verification)
    ae.acse_timeout = 2
    ae.network_timeout = 2
    assoc = ae.associate("127.0.0.1", port)
    if not assoc.is_established:
        return False
    ok = bool(assoc.send_c_echo().get("Status", 1) == 0)
    assoc.release()
    return ok


def _http_ok(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as rsp:
            return bool(rsp.status == 200)
    except OSError:
        return False


def _demo_token(settings: Settings) -> str:
    """A token from the embedded issuer (the demo's own data dir), or "" with an IdP."""
    if not settings.auth.enabled or not settings.auth.is_local:
        return ""
    from api.keys import issue_token

    return issue_token(
        settings.auth,
        subject="demo",
        ttl_s=8 * 3600,
        scopes=["imaging.read", "lab.read", "orders.read", "admin"],
    )


def _metrics(port: int, token: str = "") -> dict[str, float]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=5) as rsp:
        text = rsp.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def run_demo(settings: Settings, *, slices: int = 120, keep_running: bool = True) -> int:
    # The demo is a pynetdicom SCU like the worker: without this, pynetdicom's reactor
    # race (pacslab.runtime.close_reactor_race) can take a fast C-STORE-RSP off the
    # queue, and the C-STORE waits out the DIMSE timeout; also keeps identifiers out
    # of pynetdicom's logs.
    configure_runtime()
    console = Console(soft_wrap=True)
    dicom_port, http_port = settings.dicom.port, settings.http.port
    server: subprocess.Popen[bytes] | None = None
    if _echo(dicom_port) and _http_ok(http_port):
        console.print(f"Using the pacslab already running on ports {dicom_port}/{http_port}.")
    else:
        console.print(f"Starting [bold]pacslab serve[/] (data in {settings.data_dir}) …")
        server = subprocess.Popen(
            [sys.executable, "-m", "pacslab", "serve"], env=dict(os.environ), start_new_session=True
        )
        deadline = time.monotonic() + 90
        while not (_echo(dicom_port) and _http_ok(http_port)):
            if server.poll() is not None or time.monotonic() > deadline:
                console.print("[red]pacslab serve did not start; see its log above.[/]")
                return 1
            time.sleep(0.5)
    try:
        token = _demo_token(settings)
        before = _metrics(http_port, token).get("pacslab_instances", 0)
        with (
            tempfile.TemporaryDirectory() as tmp,
            Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
            ) as progress,
        ):
            gen = progress.add_task("Generating CT slices", total=slices)
            files = write_ct_series(Path(tmp), slices=slices, accession_number="DEMO0001")
            progress.update(gen, completed=slices)
            study = dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
            send = progress.add_task("C-STORE to PACSLAB", total=slices)
            ae = AE(ae_title="DEMO-CT")
            ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
            assoc = ae.associate("127.0.0.1", dicom_port, ae_title=settings.dicom.ae_title)
            if not assoc.is_established:
                console.print("[red]association rejected[/]")
                return 1
            failed = 0
            for path in files:
                status = assoc.send_c_store(dcmread(path))
                failed += int(status.get("Status", 0xFFFF) != 0)
                progress.advance(send)
            assoc.release()
            index = progress.add_task("Indexed and processed", total=slices)
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                m = _metrics(http_port, token)
                stored = m.get("pacslab_instances", 0) - before
                pending = m.get("pacslab_jobs_pending", 0) + m.get("pacslab_jobs_running", 0)
                progress.update(
                    index,
                    completed=min(stored, slices) if pending == 0 else max(0, stored - pending),
                )
                if stored >= slices and pending == 0:
                    break
                time.sleep(0.5)
        base = f"http://localhost:{http_port}"
        console.print(f"\n[green]{slices - failed} of {slices} slices stored.[/] Where to look:")
        console.print(f"  viewer         {base}/viewer")
        console.print(f"  DICOMweb study {base}/dicomweb/studies/{study}/series")
        console.print(
            f"  FHIR           {base}/fhir/ImagingStudy?identifier=urn:dicom:uid|urn:oid:{study}"
        )
        console.print(f"  API docs       {base}/docs   metrics {base}/metrics")
        console.print(f"  DICOM          AE {settings.dicom.ae_title} on port {dicom_port}")
        console.print(f"  files          {settings.data_dir.resolve()}")
        if token:
            console.print(
                "  token (8 h; imaging.read lab.read orders.read admin):\n"
                f"    Authorization: Bearer {token}\n"
                "  more with: pacslab token --scopes imaging.read …"
            )
        if failed:
            return 1
        if keep_running and server is not None:
            console.print("\npacslab keeps running; Ctrl-C stops it.")
            server.wait()
        return 0
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
