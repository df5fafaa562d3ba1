from __future__ import annotations

import hashlib
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info

from storage.staging import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION,
    StagedWriter,
    part10_prefix,
)


def test_prefix_matches_pydicom_writer() -> None:
    for inst in ("1.2.3.45", "1.2.3.456"):  # odd and even lengths (UI padding)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = inst
        meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.90"
        meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION
        buf = BytesIO()
        buf.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(buf, meta, enforce_standard=True)  # type: ignore[arg-type]
        assert part10_prefix("1.2.840.10008.5.1.4.1.1.2", inst,
                             "1.2.840.10008.1.2.4.90") == buf.getvalue()


def test_writer_hashes_the_data_set_only(tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    src = Path(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
    raw = src.read_bytes()
    data = raw[144 + int.from_bytes(raw[140:144], "little"):]
    ds = dcmread(src, stop_before_pixels=True)
    w = StagedWriter(tmp_path, ds.SOPClassUID, ds.SOPInstanceUID, "1.2.840.10008.1.2.1")
    for i in range(0, len(data), 1000):
        w.write(data[i : i + 1000])
    staged = w.finish(fsync=True)
    assert staged.key == hashlib.sha256(data).hexdigest()
    assert dcmread(staged.path).SOPInstanceUID == ds.SOPInstanceUID
    assert staged.path.read_bytes()[staged.dataset_offset:] == data


def test_abort_leaves_nothing(tmp_path: Path) -> None:
    w = StagedWriter(tmp_path, "1.2.3", "1.2.3.4", "1.2.840.10008.1.2.1")
    w.write(b"\x00" * 10)
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_receive_streams_into_the_buffer_across_its_boundary(tmp_path: Path) -> None:
    import os

    data = os.urandom((5 << 20) + 12345)  # crosses the 2 MiB write buffer twice
    stream = BytesIO(data)

    def recv_exactly(view: memoryview) -> None:
        got = stream.readinto(view)
        assert got == len(view)

    w = StagedWriter(tmp_path, "1.2.3", "1.2.3.4", "1.2.840.10008.1.2.1")
    w.receive(recv_exactly, 1 << 20)
    w.receive(recv_exactly, len(data) - (1 << 20))
    staged = w.finish(fsync=True)
    assert staged.key == hashlib.sha256(data).hexdigest()
    assert staged.path.read_bytes()[staged.dataset_offset:] == data
    assert staged.size == staged.dataset_offset + len(data)
    assert staged.head == data[:65536] and staged.tail == data[-8:]


def test_receive_consumes_everything_when_the_disk_is_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from core.errors import OutOfResourcesError

    def full(self: StagedWriter, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(StagedWriter, "_write_out", full)
    stream = BytesIO(b"\x01" * (5 << 20))
    w = StagedWriter(tmp_path, "1.2.3", "1.2.3.4", "1.2.840.10008.1.2.1")
    with pytest.raises(OutOfResourcesError):
        w.receive(lambda view: stream.readinto(view) and None, 5 << 20)
    assert stream.tell() == 5 << 20  # the association stays in step with its peer
    assert list(tmp_path.iterdir()) == []
