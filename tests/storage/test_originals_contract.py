"""One contract for every OriginalStore backend (STYLE.md example C).

Local directory (the embedded default), fsspec's in-memory file system (always runs)
and S3 on a local moto server (issue #8 §3; skipped without moto[server] and s3fs).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest_s3 import S3Bucket

from core.errors import NotFoundError, OutOfResourcesError
from core.settings import Settings
from storage.abc import OriginalStore
from storage.objectstore import ObjectOriginalStore
from storage.originals import FileOriginalStore


def stage(store: OriginalStore, content: bytes) -> tuple[Path, str]:
    """A staged file and its key, as the receiver leaves them."""
    key = hashlib.sha256(content).hexdigest()
    path = store.staging_dir() / f"{key[:8]}.part"
    path.write_bytes(content)
    return path, key


class OriginalStoreContract:
    @pytest.fixture
    def store(self, tmp_path: Path) -> OriginalStore:
        raise NotImplementedError

    def test_staging_is_a_local_directory(self, store: OriginalStore) -> None:
        assert store.staging_dir().is_dir()

    def test_commit_then_exists_open_path(self, store: OriginalStore) -> None:
        staged, key = stage(store, b"DICM-data-1" * 1000)
        assert not store.exists(key)
        assert store.commit(staged, key) is True
        assert not staged.exists(), "the staged file is consumed by commit"
        assert store.exists(key)
        with store.open(key) as fp:
            assert fp.read() == b"DICM-data-1" * 1000
        with store.open(key) as fp:  # decoders seek (integrity check, deferred reads)
            fp.seek(4)
            assert fp.read(7) == b"-data-1"
        local = store.path(key)
        assert local.read_bytes() == b"DICM-data-1" * 1000

    def test_commit_is_idempotent(self, store: OriginalStore) -> None:
        staged, key = stage(store, b"same bytes")
        assert store.commit(staged, key) is True
        again, key2 = stage(store, b"same bytes")
        assert key2 == key
        assert store.commit(again, key) is False
        assert not again.exists()
        with store.open(key) as fp:
            assert fp.read() == b"same bytes"

    def test_delete(self, store: OriginalStore) -> None:
        staged, key = stage(store, b"to delete")
        store.commit(staged, key)
        store.delete(key)
        assert not store.exists(key)
        store.delete(key)  # deleting twice is fine
        with pytest.raises(NotFoundError):
            store.open(key)

    def test_unknown_and_invalid_keys(self, store: OriginalStore) -> None:
        with pytest.raises(NotFoundError):
            store.open("0" * 64)
        with pytest.raises(NotFoundError):
            store.open("../../etc/passwd")
        assert not store.exists("0" * 64)


class TestFileOriginalStore(OriginalStoreContract):
    @pytest.fixture
    def store(self, tmp_path: Path) -> OriginalStore:
        return FileOriginalStore(tmp_path / "originals")

    def test_has_local_paths(self, store: OriginalStore) -> None:
        assert store.has_local_paths


class TestMemoryObjectOriginalStore(OriginalStoreContract):
    """fsspec's memory file system: the object-store code path without a server."""

    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[OriginalStore]:
        import fsspec

        url = f"memory://pacslab-{tmp_path.name}/originals"
        yield ObjectOriginalStore(url, staging=tmp_path / "staging")
        with contextlib.suppress(FileNotFoundError):
            fsspec.filesystem("memory").rm(f"/pacslab-{tmp_path.name}", recursive=True)

    def test_has_no_local_paths(self, store: OriginalStore) -> None:
        assert not store.has_local_paths


@pytest.mark.network
class TestS3OriginalStore(OriginalStoreContract):
    @pytest.fixture
    def store(self, tmp_path: Path, s3_bucket: S3Bucket) -> OriginalStore:
        return ObjectOriginalStore(f"{s3_bucket.url}/originals", staging=tmp_path / "staging",
                                   cache=tmp_path / "cache",
                                   storage_options=s3_bucket.storage_options)

    def test_objects_use_the_content_key_layout(self, store: OriginalStore,
                                                s3_bucket: S3Bucket) -> None:
        import s3fs

        staged, key = stage(store, b"layout")
        store.commit(staged, key)
        fs = s3fs.S3FileSystem(**s3_bucket.storage_options, skip_instance_cache=True)
        assert fs.cat(f"{s3_bucket.name}/originals/{key[:2]}/{key[2:4]}/{key}.dcm") == b"layout"

    def test_unreachable_store_is_out_of_resources(self, tmp_path: Path) -> None:
        pytest.importorskip("s3fs")
        store = ObjectOriginalStore(
            "s3://nowhere/originals", staging=tmp_path / "staging",
            storage_options={"endpoint_url": "http://127.0.0.1:9",  # discard port: refused
                             "config_kwargs": {"retries": {"max_attempts": 1},
                                               "connect_timeout": 1}})
        staged, key = stage(store, b"never stored")
        with pytest.raises(OutOfResourcesError):
            store.commit(staged, key)
        assert not staged.exists()


def test_settings_select_the_backend(tmp_path: Path) -> None:
    from pacslab.wiring import build_originals

    local = build_originals(Settings(data_dir=tmp_path))
    assert isinstance(local, FileOriginalStore) and local.root == tmp_path / "originals"
    remote = build_originals(Settings(data_dir=tmp_path, storage={
        "originals_url": f"memory://b-{tmp_path.name}/o"}))
    assert isinstance(remote, ObjectOriginalStore)
    assert remote.staging_dir() == tmp_path / "originals" / ".staging"
    with pytest.raises(ValueError, match="storage URL"):
        Settings(data_dir=tmp_path, storage={"originals_url": "s3:/bucket"})
