"""Shared fixtures: ``settings(tmp_path)`` and an in-process DICOM receiver."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

# PostgreSQL fixtures (a throwaway server per session when the binaries exist).
from conftest_pg import (  # noqa: F401
    pg_empty_url,
    pg_server,
    pg_template,
    pg_url,
    restartable_pg,
)

# A local S3-compatible server (moto) when moto[server] and s3fs are installed.
from conftest_s3 import s3_bucket, s3_endpoint  # noqa: F401

from core.settings import Settings
from pacslab.runtime import close_reactor_race
from tests.support import Receiver, preserved_runtime, wait_until

#: Files that take a minute or more (measured in CI runs), started first: with
#: pytest-xdist (``./run test``: ``--dist loadfile --no-loadscope-reorder``) workers
#: take files in collection order, so a long file begun last would run alone at the
#: end while the other worker sits idle.
_LONG_FILES = (
    "tests/faults/test_kill_worker_api.py",
    "tests/api/test_api_schemathesis.py",
    "benchmarks/test_archive_scale.py",
    "benchmarks/test_dicom_ingest.py",
    "tests/ohif/test_ohif_viewer.py",
    "tests/ingest/dicom/test_storage_commitment.py",
    "tests/ingest/labs/test_lab_crash.py",
    "tests/ohif/test_ohif_share.py",
    "tests/pacslab/test_cli.py",
    "tests/ingest/dicom/test_crash.py",
    "benchmarks/test_ohif_viewer.py",
    "tests/faults/test_kill_receiver.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Long files first (:data:`_LONG_FILES`, in that order), the rest as collected."""
    rank = {name: i for i, name in enumerate(_LONG_FILES)}
    root = config.rootpath

    def key(item: pytest.Item) -> int:
        try:
            name = item.path.relative_to(root).as_posix()
        except ValueError:
            return len(rank)
        return rank.get(name, len(rank))

    items.sort(key=key)  # stable: the order within a file and among the rest is kept

# Our test and benchmark SCUs are pynetdicom associations too: close its reactor race
# for the whole session, as the entry points do in the service (pacslab/runtime.py).
close_reactor_race()


@pytest.fixture(scope="session")
def migrated_sqlite_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SQLite index migrated to head by the real migrations, once per session."""
    from pacslab.wiring import build_index

    data = tmp_path_factory.mktemp("migrated") / "data"
    seed = Settings(data_dir=data, dicom={"port": 0, "host": "127.0.0.1"},
                    auth={"enabled": False})
    build_index(seed, migrate=True).close()  # closes with a checkpoint: one file, no WAL
    (index_file,) = data.glob("index.db")
    return index_file


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
             migrated_sqlite_index: Path) -> Settings:
    # The environment of the developer's shell must not leak into tests.
    for key in list(os.environ):
        if key.startswith("PACSLAB_"):
            monkeypatch.delenv(key)
    # Authentication is off for the tests of other components; tests/security turns
    # it on explicitly (``Settings()`` itself defaults to on).
    # A small original journal (storage/journal.py): its segments are zero-filled.
    made = Settings(data_dir=tmp_path / "data", dicom={"port": 0, "host": "127.0.0.1"},
                    auth={"enabled": False}, storage={"journal_mb": 16})
    # The default index starts as a copy of one migrated at the start of the session:
    # running the 11 migrations took 0.15-0.4 s of most tests' set-up (hundreds of
    # tests, minutes of the suite). Opening it still runs ``upgrade``, which finds it at
    # head; the migrations themselves are tested from empty files in tests/storage.
    index_file = tmp_path / "data" / "index.db"
    if made.index.url == f"sqlite:///{index_file.as_posix()}":
        index_file.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(migrated_sqlite_index, index_file)
    return made


@pytest.fixture
def receiver(settings: Settings) -> Iterator[Receiver]:
    """A DICOM receiver in this process on a free loopback port (STYLE.md §7)."""
    from ingest.dicom.scp import bind_listener
    from pacslab.dicom_process import run_receiver
    from pacslab.wiring import build_index

    build_index(settings, migrate=True).close()
    # run_receiver sets process-wide globals (pacslab.runtime); undo them afterwards.
    with preserved_runtime():
        listener = bind_listener("127.0.0.1", 0)
        port = listener.getsockname()[1]
        stop = threading.Event()
        started: dict[str, object] = {}
        thread = threading.Thread(
            target=run_receiver,
            args=(listener, settings, stop),
            kwargs={"started": started},
            daemon=True,
        )
        thread.start()
        # A start deadline, not a speed check: on a loaded 2-core runner the receiver's
        # start (index open, fan-out directories, sockets) took over 5 s once.
        wait_until(lambda: "service" in started, timeout=30, message="receiver did not start")
        index = build_index(settings, migrate=False)
        yield Receiver(settings, port, index, started["service"])
        stop.set()
        thread.join(timeout=10)
        listener.close()
        index.close()  # type: ignore[attr-defined]


# -- API (tests/api; helpers in tests/api/_support.py) -------------------------------


@pytest.fixture
def app(settings: Settings) -> Iterator[object]:
    """``create_app(settings)`` over a fresh index (STYLE.md §7: no overrides)."""
    from tests.api._support import running_app

    with running_app(settings) as application:
        yield application


@pytest.fixture
def client(app: object) -> object:
    from fastapi.testclient import TestClient

    return TestClient(app)  # type: ignore[arg-type]


@pytest.fixture
def ct(app: object, tmp_path: Path) -> object:
    """Four small CT slices of one series, stored through Archive.accept."""
    from tests.api._support import store_ct

    return store_ct(app, tmp_path / "ct")  # type: ignore[arg-type]


@pytest.fixture
def catalogue(app: object, tmp_path: Path) -> dict[str, str]:
    """Three studies of two patients for matching tests; their Study UIDs by name."""
    from tests.api._support import store_catalogue

    return store_catalogue(app, tmp_path)  # type: ignore[arg-type]
