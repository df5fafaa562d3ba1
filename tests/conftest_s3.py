"""A local S3-compatible server for the test session (issue #8 §3).

moto's standalone server (``python -m moto.server``, PyPI ``moto[server]``) runs as a
subprocess on a free loopback port; every test that asks for ``s3_bucket`` gets a
bucket of its own. The tests need ``s3fs`` (fsspec's S3 backend) too; without either
package they are skipped.
"""

from __future__ import annotations

import itertools
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.support import free_port, wait_until

__all__ = ["S3Bucket", "s3_bucket", "s3_endpoint"]

_buckets = itertools.count()


@dataclass(frozen=True)
class S3Bucket:
    """A bucket on the test server: ``url`` (``s3://name``) and the fsspec options."""

    name: str
    endpoint: str
    storage_options: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"s3://{self.name}"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """``http://127.0.0.1:<port>`` of a moto server started for this session."""
    pytest.importorskip("moto.server", reason="moto[server] not installed")
    pytest.importorskip("s3fs", reason="s3fs not installed")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def listening() -> bool:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return True
            assert proc.poll() is None, "moto server did not start (it exited)"
            return False

        wait_until(listening, timeout=30, message="moto server did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> S3Bucket:
    """A new, empty bucket; AWS_* variables set to moto's dummy credentials."""
    import s3fs

    # Credentials come from the environment, as in production (never from Settings).
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    options: dict[str, Any] = {"endpoint_url": s3_endpoint}
    name = f"pacslab-{next(_buckets)}-{int(time.time() * 1000) % 10**8}"
    s3fs.S3FileSystem(**options, skip_instance_cache=True).mkdir(name)
    return S3Bucket(name, s3_endpoint, options)
