"""The originals' file system fills up (issue #8 §5).

As root the originals directory is a 2 MiB tmpfs, partly taken by a filler file;
otherwise (or additionally) ENOSPC is injected into the staged writes. C-STORE then
answers 0xA700 Out of Resources, never success for an instance that was not stored,
and once space is freed the receiver stores again by itself.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from core.settings import Settings
from core.synthetic import write_ct_series
from storage.staging import StagedWriter
from tests.support import Receiver

from .conftest import report

pytestmark = pytest.mark.network


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0:
        return False
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "pacslab-full",
                             str(path)], capture_output=True, check=False)
    return result.returncode == 0


def _send(receiver: Receiver, files: list[Path]) -> list[tuple[str, int]]:
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    ae = AE(ae_title="FAULTS")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", receiver.port)
    assert assoc.is_established
    out = []
    try:
        for path in files:
            status = assoc.send_c_store(path)
            out.append((str(dcmread(path, stop_before_pixels=True).SOPInstanceUID),
                        int(status.Status)))
    finally:
        assoc.release()
    return out


def _run(name: str, receiver: Receiver, files: list[Path], fill: Callable[[], None],
         free: Callable[[], None]) -> None:
    from pacslab.wiring import build_originals
    from processing.integrity import verify_original

    before = _send(receiver, files[:5])
    fill()
    during = _send(receiver, files[5:25])
    free()
    after = _send(receiver, files[25:])
    store = build_originals(receiver.settings)
    lost = []
    for uid, status in before + during + after:
        if status == 0x0000:
            try:
                verify_original(store, receiver.index.get_instance(uid))  # type: ignore[attr-defined]
            except Exception:
                lost.append(uid)
    statuses = [s for _, s in during]
    report(name, sent=len(files), refused_0xA700=statuses.count(0xA700),
           success_while_full=statuses.count(0), acknowledged_lost=len(lost))
    assert all(s == 0 for _, s in before)
    assert set(statuses) <= {0x0000, 0xA700} and statuses.count(0xA700) >= 10, statuses
    assert all(s == 0 for _, s in after), "did not recover once space was freed"
    assert lost == []


@pytest.fixture
def full_dir(tmp_path: Path) -> Iterator[Path]:
    originals = tmp_path / "data" / "originals"
    if not _mount_tmpfs(originals, "2m"):
        pytest.skip("cannot mount a tmpfs here (needs root); the simulated case runs instead")
    yield originals
    subprocess.run(["umount", "-l", str(originals)], check=False, capture_output=True)


class TestTmpfsFull:
    @pytest.fixture
    def settings(self, tmp_path: Path, full_dir: Path) -> Settings:
        # No original journal: a 2 MB file system has no room for one, and this is the
        # file path's test (tests/storage/test_journal.py fills the disk under one).
        return Settings(data_dir=tmp_path / "data", dicom={"port": 0, "host": "127.0.0.1"},
                        storage={"journal_mb": 0})

    def test_tmpfs_full_then_freed(self, receiver: Receiver, full_dir: Path,
                                   tmp_path: Path) -> None:
        files = write_ct_series(tmp_path / "ct", slices=35, rows=128, columns=128)
        filler = full_dir / "filler"

        def fill() -> None:
            # take every free byte: the next staged write hits ENOSPC
            with filler.open("wb") as fp:
                try:
                    while True:
                        fp.write(b"\0" * 65536)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC

        _run("disk full (tmpfs)", receiver, files, fill, lambda: filler.unlink())


class TestSimulatedEnospc:
    @pytest.fixture
    def settings(self, settings: Settings) -> Settings:
        # The file path's test: instances kept in memory for the original journal are
        # never staged (tests/storage/test_journal.py fills the disk under a journal).
        settings.storage.journal_mb = 0
        return settings

    def test_enospc_injected_into_staged_writes(self, receiver: Receiver, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
        files = write_ct_series(tmp_path / "ct", slices=35, rows=32, columns=32)
        full = {"on": False}
        real_write_out = StagedWriter._write_out

        def write_out(self: StagedWriter, length: int) -> None:
            # Where the staged bytes leave for the file system.
            if full["on"]:
                raise OSError(errno.ENOSPC, "No space left on device")
            real_write_out(self, length)

        monkeypatch.setattr(StagedWriter, "_write_out", write_out)
        _run("disk full (simulated ENOSPC)", receiver, files,
             lambda: full.update(on=True), lambda: full.update(on=False))
