"""Fixtures for the tile API: a session-wide converted synthetic CT series, a client.

``tests/api_tiles`` is a package (``__init__.py``) so that this conftest is imported
as ``api_tiles.conftest``: as a bare ``conftest`` it would replace ``tests/conftest.py``
in ``sys.modules`` for the ``from conftest import …`` of the test modules collected
after it (``tests/ingest``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from .tiles_data import Converted, convert_synthetic_ct


@pytest.fixture(scope="session")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Converted]:
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.startswith("PACSLAB_"):
                mp.delenv(key)
        yield convert_synthetic_ct(tmp_path_factory.mktemp("tiles"))


@pytest.fixture
def client(converted: Converted) -> Iterator[TestClient]:
    from api.app import create_app

    with TestClient(create_app(converted.settings)) as c:
        yield c
