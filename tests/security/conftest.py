"""Fixtures for the issue-7 tests: an app with authentication ON and a token factory."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from core.settings import Settings


@pytest.fixture
def secure_settings(settings: Settings) -> Settings:
    """The shared fixture's settings with authentication turned back on."""
    return settings.model_copy(update={"auth": settings.auth.model_copy(update={"enabled": True})})


@pytest.fixture
def app(secure_settings: Settings) -> Iterator[FastAPI]:
    from api.app import create_app
    from pacslab.wiring import build_index

    build_index(secure_settings, migrate=True).close()
    application = create_app(secure_settings)
    yield application
    application.state.audit.close()


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


@pytest.fixture
def token(secure_settings: Settings) -> Callable[..., str]:
    from api.keys import issue_token

    def make(*scopes: str, subject: str = "dr.tester", **kw: object) -> str:
        return issue_token(secure_settings.auth, subject=subject, scopes=list(scopes),
                           **kw)  # type: ignore[arg-type]

    return make


@pytest.fixture
def data_dir(secure_settings: Settings) -> Path:
    return secure_settings.data_dir
