"""DCMTK helpers for worklist tests and benchmarks: ``findscu -W`` and ``wlmscpfs``.

Every server gets the same items: ours from memory (in this process) or from the SQL
order store behind a real ``pacslab dicom`` process (what ``pacslab serve`` answers
from), wlmscpfs from ``.wl`` files in ``<root>/<called AE title>/`` (one file per
scheduled step, plus the empty ``lockfile`` wlmscpfs insists on).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.sop_class import ModalityWorklistInformationFind  # type: ignore[attr-defined]

from tests.support import configured_runtime, free_port, wait_until
from worklist.memory import InMemoryWorklist
from worklist.model import WorklistItem, iter_entries, to_dataset
from worklist.query import MatchOptions
from worklist.scp import build_ae, handlers

ROOT = Path(__file__).resolve().parents[2]
HAVE_DCMTK = all(shutil.which(tool) for tool in ("findscu", "wlmscpfs"))

#: Port -> session id (the leader's pid) of each server process started here, so a
#: benchmark can read the CPU time the server and its children spent.
SESSIONS: dict[int, int] = {}

#: The two environments every DCMTK call runs in.
ENVIRONMENTS: Mapping[str, Mapping[str, str]] = {"default": {}, "nodelay": {"TCP_NODELAY": "1"}}


def _file(ds: Dataset, path: Path) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ModalityWorklistInformationFind
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)


def write_query(keys: Dataset, path: Path) -> Path:
    """Write a C-FIND identifier as a DICOM file ``findscu`` can read."""
    _file(keys, path)
    return path


def write_wl_folder(items: Iterable[WorklistItem], root: Path, called_ae: str) -> Path:
    """Export items as wlmscpfs's data files: ``<root>/<called_ae>/*.wl`` and ``lockfile``."""
    folder = root / called_ae
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "lockfile").touch()
    for n, (item, sps) in enumerate(iter_entries(items)):
        _file(to_dataset(item, sps), folder / f"item{n:06d}.wl")
    return root


def _wait_for_port(
    port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 10
) -> None:
    def listening() -> bool:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return True
        return False

    wait_until(listening, timeout=timeout, message=f"nothing listens on {port}")


@contextlib.contextmanager
def wlmscpfs(root: Path, env: Mapping[str, str] | None = None) -> Iterator[int]:
    """Run ``wlmscpfs`` on a free loopback port over ``root``; yield the port."""
    port = free_port()
    cmd = [
        "wlmscpfs",
        "--data-files-path",
        str(root),
        "--keep-char-set",
        "--single-process",
        str(port),
    ]
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    SESSIONS[port] = proc.pid
    try:
        _wait_for_port(port, proc)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextlib.contextmanager
def pacslab_server(
    items: Iterable[WorklistItem], options: MatchOptions | None = None, ae_title: str = "PACSLAB"
) -> Iterator[tuple[int, InMemoryWorklist]]:
    """Our MWL/MPPS SCP on 127.0.0.1, port 0, over an in-memory worklist."""
    from worklist.memory import InMemoryMppsRepository

    source = InMemoryWorklist(items)
    # As in a receiver process, where pacslab.runtime.configure_runtime sets them.
    with configured_runtime():
        ae = build_ae(ae_title=ae_title)
        server = ae.start_server(
            ("127.0.0.1", 0),
            block=False,
            evt_handlers=handlers(
                source, InMemoryMppsRepository(), options or MatchOptions(), source.apply_effects
            ),
        )
        assert server is not None
        try:
            yield int(server.server_address[1]), source
        finally:
            server.shutdown()


def scrubbed_env(**values: str) -> dict[str, str]:
    """This environment without PACSLAB_ settings, this checkout first on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSLAB_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(values)
    return env


@contextlib.contextmanager
def run_process(cmd: list[str], env: dict[str, str], port: int) -> Iterator[int]:
    """Run ``cmd`` until the block ends; yield ``port`` once something listens there."""
    # A session of its own, so the receiver's forked children go with it.
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    SESSIONS[port] = proc.pid
    try:
        _wait_for_port(port, proc, timeout=60)
        yield port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def fill_index(items: list[WorklistItem], url: str) -> None:
    """Place ``items`` as orders in the index at ``url`` (migrated to head)."""
    from core.settings import IndexSettings
    from storage.index.orders import SqlOrderStore
    from storage.index.sql import SqlIndex
    from tests.worklist.order_requests import place_items

    index = SqlIndex(IndexSettings(url=url, migrate=True))
    try:
        store = SqlOrderStore(index)
        place_items(store, items, source="fixture")
    finally:
        index.close()


@contextlib.contextmanager
def pacslab_dicom(items: list[WorklistItem], work: Path) -> Iterator[int]:
    """``pacslab dicom`` over a SQLite index holding ``items``; yield its port.

    ``work`` becomes its data directory. One receiver process: an association is
    served by one child, and a second would only take memory on a shared machine.
    """
    url = f"sqlite:///{work}/index.db"
    fill_index(items, url)
    port = free_port()
    env = scrubbed_env(
        PACSLAB_DATA_DIR=str(work),
        PACSLAB_INDEX__URL=url,
        PACSLAB_DICOM__HOST="127.0.0.1",
        PACSLAB_DICOM__PORT=str(port),
        PACSLAB_DICOM__WORKERS="1",
        # Default log level (INFO), as ``pacslab serve`` runs: one line per C-FIND.
    )
    with run_process([sys.executable, "-m", "pacslab", "dicom"], env, port) as p:
        yield p


@dataclass(frozen=True)
class FindResult:
    returncode: int
    responses: list[Dataset]
    stderr: str


def findscu(
    port: int,
    query: Path,
    outdir: Path,
    *,
    called_ae: str = "PACSLAB",
    env: Mapping[str, str] | None = None,
) -> FindResult:
    """Query with DCMTK ``findscu -W`` and read back the extracted responses."""
    outdir.mkdir(parents=True, exist_ok=True)
    for old in outdir.glob("rsp*.dcm"):
        old.unlink()
    cmd = [
        "findscu",
        "-W",
        "-aet",
        "MODALITY1",
        "-aec",
        called_ae,
        "-X",
        "-od",
        str(outdir),
        "-to",
        "20",
        "127.0.0.1",
        str(port),
        str(query),
    ]
    proc = subprocess.run(
        cmd, env={**os.environ, **(env or {})}, capture_output=True, timeout=60, check=False
    )
    responses: list[Dataset] = [pydicom.dcmread(p) for p in sorted(outdir.glob("rsp*.dcm"))]
    return FindResult(proc.returncode, responses, proc.stderr.decode(errors="replace"))
