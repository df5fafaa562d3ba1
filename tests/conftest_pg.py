"""A throwaway PostgreSQL server for the test session (issue #8 §1).

When ``PACSLAB_TEST_POSTGRES_URL`` names a server, tests use it. Otherwise, when the
Debian binaries exist (``/usr/lib/postgresql/*/bin/initdb``, package ``postgresql``,
which ``./run test`` installs) and psycopg 3 is importable, the session starts its own
server: data directory and unix socket in a fresh temporary directory, a free loopback
port, ``fsync=off`` (nothing here must survive a power cut). PostgreSQL refuses to run
as root, and CI runs as root, so the server then runs as the ``postgres`` system user
(created if missing) through ``runuser``.

Each test that asks for ``pg_url`` gets a database of its own, so tests never see each
other's rows and subprocesses can be pointed at the same URL. It is a copy
(``CREATE DATABASE … TEMPLATE``) of one database the session migrated to head once:
running the migrations took about 0.5 s per test, the copy takes tens of milliseconds.
A test that needs an empty database (a migration from an older revision) asks for
``pg_empty_url``.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import free_port

__all__ = [
    "PgServer",
    "admin_url",
    "find_pg_bin",
    "pg_empty_url",
    "pg_server",
    "pg_template",
    "pg_url",
]

_counter = itertools.count()
# Read at import: the DICOM receiver later points tempfile.tempdir at its staging
# directory (pynetdicom's chunked receive), where the postgres user cannot go.
_TMP = tempfile.gettempdir()


def find_pg_bin() -> Path | None:
    """The newest installed PostgreSQL's ``bin`` directory (Debian layout), if any."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name
                   .isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def _run_as_user() -> str | None:
    """The system user to run the server as (None: the current user, when not root)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/bin/sh",
                        "postgres"], check=True, capture_output=True)
    return "postgres"


class PgServer:
    """One PostgreSQL cluster in a temporary directory, started and stopped with pg_ctl."""

    def __init__(self, bin_dir: Path, *, port: int | None = None) -> None:
        self.bin_dir = bin_dir
        self.user = _run_as_user()
        self.root = Path(tempfile.mkdtemp(prefix="pacslab-pg-", dir=_TMP))
        self.data = self.root / "data"
        self.socket_dir = self.root / "sock"
        self.log = self.root / "server.log"
        self.port = port or free_port()
        self.socket_dir.mkdir()
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            for path in (self.root, self.socket_dir):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self._cmd("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--locale=C", "--no-sync")

    def _cmd(self, tool: str, *args: str, timeout: float = 60) -> None:
        argv = [str(self.bin_dir / tool), *args]
        if self.user is not None:
            argv = ["runuser", "-u", self.user, "--", *argv]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                check=False)
        if result.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{tool} failed: {result.stderr[-2000:]}{log[-2000:]}")

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1 "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                   "-c max_connections=300 -c shared_buffers=64MB")
        self._cmd("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                  "-o", options, "start")

    def stop(self, mode: str = "fast") -> None:
        self._cmd("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def cleanup(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"


def create_database(admin_url: str, *, template: str | None = None) -> str:
    """A new database on the server of ``admin_url`` (empty, or a copy of the database
    named ``template``, which nobody may be connected to); its URL."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"pacslab_t{os.getpid()}_{next(_counter)}_{int(time.time() * 1000) % 100000}"
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            suffix = f' TEMPLATE "{template}"' if template else ""
            conn.execute(text(f'CREATE DATABASE "{name}"{suffix}'))
    finally:
        engine.dispose()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer | str]:
    """The session's PostgreSQL: an external URL (str) or a server we started."""
    external = os.environ.get("PACSLAB_TEST_POSTGRES_URL", "")
    pytest.importorskip("psycopg", reason="psycopg 3 not installed (pip install psycopg[binary])")
    if external:
        yield external
        return
    bin_dir = find_pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries not installed (Debian package postgresql)")
    server = PgServer(bin_dir)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def restartable_pg() -> Iterator[PgServer]:
    """A PostgreSQL server of this test's own, to stop and start again (outages)."""
    pytest.importorskip("psycopg", reason="psycopg 3 not installed (pip install psycopg[binary])")
    bin_dir = find_pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries not installed (Debian package postgresql)")
    server = PgServer(bin_dir)
    server.start()
    yield server
    server.cleanup()


def admin_url(pg_server: PgServer | str) -> str:
    """The URL of ``pg_server``'s administrative database (``pg_server`` as the fixture
    gives it: an external URL, or a server we started)."""
    return pg_server if isinstance(pg_server, str) else pg_server.url()


@pytest.fixture(scope="session")
def pg_template(pg_server: PgServer | str) -> str:
    """The name of a database the real migrations brought to head, once per session."""
    from sqlalchemy.engine import make_url

    from core.settings import IndexSettings
    from storage.index.sql import SqlIndex

    url = create_database(admin_url(pg_server))
    SqlIndex(IndexSettings(url=url)).close()  # migrates; close() lets go of every connection
    name = make_url(url).database
    assert name is not None
    return name


@pytest.fixture
def pg_url(pg_server: PgServer | str, pg_template: str) -> str:
    """A fresh database for this test, already migrated to head."""
    return create_database(admin_url(pg_server), template=pg_template)


@pytest.fixture
def pg_empty_url(pg_server: PgServer | str) -> str:
    """A fresh, empty database for this test (no schema: for migration tests)."""
    return create_database(admin_url(pg_server))
