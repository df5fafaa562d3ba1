"""``pg_dump`` / ``pg_restore`` for backups of a PostgreSQL index (I/O shell, one pure parser).

The index is dumped in the custom format (``pg_dump --format=custom``: compressed,
restorable table by table) under a snapshot exported by the caller's REPEATABLE READ
transaction (``pg_export_snapshot()``, PostgreSQL docs §9.27.5 "Snapshot
Synchronization"), so the facts the caller reads in that transaction — blob keys,
audit head — describe exactly the rows in the dump. :func:`table_rows` reads rows
back from a dump without a server (``pg_restore --data-only`` writes ``COPY … FROM
stdin`` text; :func:`parse_copy` decodes it, PostgreSQL docs "COPY", *Text Format*),
which is how a backup is verified offline.

Connection details come from the SQLAlchemy URL; a password travels in
``PGPASSWORD``, never on a command line other users can read in ``ps``.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path

from sqlalchemy.engine import make_url

__all__ = ["dump", "is_postgres", "list_ok", "parse_copy", "pg_tool", "restore", "table_rows"]

#: Backslash escapes of COPY's text format other than octal/hex byte values.
_ESCAPES: Mapping[int, bytes] = {
    ord("b"): b"\b", ord("f"): b"\f", ord("n"): b"\n", ord("r"): b"\r",
    ord("t"): b"\t", ord("v"): b"\v",
}
_COPY_HEAD = re.compile(rb"^COPY (?:\S+\.)?\"?([^\s\"(]+)\"? \(([^)]*)\) FROM stdin;$")


def is_postgres(url: str) -> bool:
    """Whether the SQLAlchemy ``url`` names a PostgreSQL database."""
    return make_url(url).get_backend_name() == "postgresql"


def pg_tool(name: str) -> str:
    """Path of a PostgreSQL client program: on ``PATH``, else the newest Debian one.

    Raises
    ------
    RuntimeError
        The client programs are not installed (Debian package ``postgresql-client``).
    """
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
        key=lambda p: int(Path(p).parents[1].name) if Path(p).parents[1].name.isdigit() else 0,
    )
    if candidates:
        return candidates[-1]
    raise RuntimeError(f"{name} not found: install the PostgreSQL client programs")


def _target(url: str) -> tuple[str, dict[str, str]]:
    """A libpq connection URI for ``url`` and the environment carrying its password."""
    parsed = make_url(url)
    env = dict(os.environ)
    if parsed.password:
        env["PGPASSWORD"] = str(parsed.password)
    uri = parsed.set(drivername="postgresql", password=None).render_as_string(
        hide_password=False
    )
    return uri, env


def _run(
    argv: list[str], env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, env=env, capture_output=True, check=False)


def _failure(tool: str, result: subprocess.CompletedProcess[bytes]) -> str:
    return f"{tool} exited with {result.returncode}: " + result.stderr.decode(
        errors="replace").strip()[-2000:]


def dump(url: str, dest: Path, *, snapshot: str) -> None:
    """Write the database of ``url`` to ``dest`` (custom format) as of ``snapshot``.

    ``--no-owner --no-privileges``: a restore recreates the objects as whoever
    restores them, on a server that may not know the original roles.
    """
    uri, env = _target(url)
    result = _run([pg_tool("pg_dump"), "--format=custom", "--no-owner", "--no-privileges",
                   "--no-password", f"--snapshot={snapshot}", f"--file={dest}",
                   f"--dbname={uri}"], env)
    if result.returncode != 0:
        raise RuntimeError(_failure("pg_dump", result))


def list_ok(path: Path) -> str:
    """``""`` when ``pg_restore --list`` reads the archive's table of contents, else why not."""
    result = _run([pg_tool("pg_restore"), "--list", str(path)])
    return "" if result.returncode == 0 else _failure("pg_restore", result)


def restore(path: Path, url: str) -> None:
    """Load the dump at ``path`` into the (empty) database of ``url``, all or nothing."""
    uri, env = _target(url)
    result = _run([pg_tool("pg_restore"), "--no-owner", "--no-privileges", "--no-password",
                   "--exit-on-error", "--single-transaction", f"--dbname={uri}", str(path)], env)
    if result.returncode != 0:
        raise RuntimeError(_failure("pg_restore", result))


def table_rows(path: Path, tables: Iterable[str]) -> dict[str, list[dict[str, str | None]]]:
    """Rows of ``tables`` in the dump at ``path``, as text (no server needed).

    Raises
    ------
    RuntimeError
        ``pg_restore`` cannot read the archive.
    """
    argv = [pg_tool("pg_restore"), "--data-only", "--file=-"]
    argv += [f"--table={t}" for t in tables]
    result = _run([*argv, str(path)])
    if result.returncode != 0:
        raise RuntimeError(_failure("pg_restore", result))
    return parse_copy(result.stdout)


def parse_copy(script: bytes) -> dict[str, list[dict[str, str | None]]]:
    """The ``COPY table (cols) FROM stdin;`` blocks of a SQL script, decoded (pure).

    Text format: one row per line, columns separated by tab, ``\\N`` for NULL, and
    backslash escapes for backslash, control characters and byte values; the script
    is UTF-8 (our databases are created with ``-E UTF8``).
    """
    out: dict[str, list[dict[str, str | None]]] = {}
    lines = iter(script.split(b"\n"))
    for line in lines:
        head = _COPY_HEAD.match(line)
        if head is None:
            continue
        table = head.group(1).decode()
        columns = [c.strip().strip('"') for c in head.group(2).decode().split(",")]
        rows = out.setdefault(table, [])
        for row in lines:
            if row == b"\\.":
                break
            values = [_field(v) for v in row.split(b"\t")]
            rows.append(dict(zip(columns, values, strict=True)))
    return out


def _field(raw: bytes) -> str | None:
    if raw == b"\\N":
        return None
    if b"\\" not in raw:
        return raw.decode("utf-8")
    out = bytearray()
    i = 0
    while i < len(raw):
        c = raw[i]
        if c != 0x5C or i + 1 == len(raw):  # not a backslash
            out.append(c)
            i += 1
            continue
        n = raw[i + 1]
        if n in _ESCAPES:
            out += _ESCAPES[n]
            i += 2
        elif 0x30 <= n <= 0x37:  # \ooo: up to three octal digits, one byte
            m = re.match(rb"[0-7]{1,3}", raw[i + 1 : i + 4])
            assert m is not None
            out.append(int(m.group(), 8) & 0xFF)
            i += 1 + len(m.group())
        elif n == ord("x") and re.match(rb"[0-9a-fA-F]", raw[i + 2 : i + 3]):
            m = re.match(rb"[0-9a-fA-F]{1,2}", raw[i + 2 : i + 4])
            assert m is not None
            out.append(int(m.group(), 16))
            i += 2 + len(m.group())
        else:  # any other character stands for itself (backslash included)
            out.append(n)
            i += 2
    return out.decode("utf-8")
