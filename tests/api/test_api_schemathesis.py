"""Property-based run of every operation in the OpenAPI document: no input gives a 500.

Bounded to stay well under a minute: few examples per operation, no deadline (the
first request of an operation pays for imports), and only the explicit and generate
phases (no shrinking of failures that never happen). Operations are driven by hand
with Hypothesis (schemathesis' ``from_fixture`` does not run on pytest 9).
"""

from __future__ import annotations

from pathlib import Path

import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import settings as settings_
from hypothesis import strategies as st

from core.settings import Settings
from tests.api._support import Stored

EXAMPLES = 25
#: Fewer per operation with every check: several checks send requests of their own.
ALL_CHECKS_EXAMPLES = 8

# STOW-RS bodies are opaque bytes to the generator (random ones must give 400, not 500).
schemathesis.serializer.alias("multipart/related", "application/octet-stream")


def test_no_server_errors(app: FastAPI, ct: Stored) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 25
    failures: list[str] = []
    statuses: list[int] = []

    def check(operation: object) -> None:
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        @given(data=st.data())
        def run(data: st.DataObject) -> None:
            case = data.draw(operation.as_strategy())  # type: ignore[attr-defined]
            response = case.call()
            statuses.append(response.status_code)
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.formatted_path} {case.query} -> "
                    f"{response.status_code} {response.text[:200]}"
                )

        run()

    for operation in operations:
        check(operation)
    assert failures == []
    assert len(statuses) > 3 * len(operations)
    assert {200, 400, 404} <= set(statuses)


def _all_checks() -> list[object]:
    """Every check schemathesis registers (the Python equivalent of ``--checks all``)."""
    from schemathesis.checks import CHECKS, load_all_checks

    load_all_checks()
    return list(CHECKS.get_all())


def test_every_route_with_auth_and_all_checks(settings: Settings, tmp_path: Path) -> None:
    """Authentication on (an admin token), every check: no 500 on any route.

    Other check failures (a response the schema does not describe, invalid input
    accepted…) are collected and printed (``-s``) as findings for their owners; a
    server error fails the test, with the exact request.
    """
    from schemathesis.checks import not_a_server_error
    from schemathesis.core.failures import FailureGroup

    from api.keys import issue_token
    from core.auth import SCOPES
    from tests.api._support import running_app, store_ct

    secure = settings.model_copy(update={"auth": settings.auth.model_copy(
        update={"enabled": True})})
    token = issue_token(secure.auth, subject="schemathesis", scopes=list(SCOPES))
    headers = {"Authorization": f"Bearer {token}"}
    checks = _all_checks()
    assert not_a_server_error in checks and len(checks) > 5
    with running_app(secure) as app:
        store_ct(app, tmp_path / "ct")
        schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=headers)
        operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
        server_errors: list[str] = []
        findings: dict[str, set[str]] = {}
        calls: list[int] = []

        def exercise(operation: object) -> None:
            @settings_(max_examples=ALL_CHECKS_EXAMPLES, deadline=None,
                       phases=[Phase.explicit, Phase.generate],
                       suppress_health_check=list(HealthCheck), database=None)
            @given(data=st.data())
            def run(data: st.DataObject) -> None:
                case = data.draw(operation.as_strategy())  # type: ignore[attr-defined]
                response = case.call(headers=headers)
                calls.append(response.status_code)
                if response.status_code >= 500:
                    server_errors.append(
                        f"{case.method} {case.formatted_path} query={case.query} "
                        f"headers={case.headers} body={str(case.body)[:120]} -> "
                        f"{response.status_code} {response.text[:200]}")
                    return
                try:
                    case.validate_response(response, checks=checks, headers=headers)
                except (FailureGroup, AssertionError) as exc:
                    name = f"{case.method} {operation.path}"  # type: ignore[attr-defined]
                    for failure in getattr(exc, "exceptions", [exc]):
                        title = getattr(failure, "title", str(failure)[:80])
                        findings.setdefault(name, set()).add(
                            f"{title} [{response.status_code}]")

            run()

        for operation in operations:
            exercise(operation)
        for name, messages in sorted(findings.items()):
            print(f"schemathesis finding: {name}: {sorted(messages)}")
        assert server_errors == []
        assert len(calls) >= len(operations)
        assert 401 not in calls  # the token was sent on every request
