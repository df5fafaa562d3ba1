"""Property-based run of every operation in the OpenAPI document: no input gives a 500.

Bounded to stay well under a minute: few examples per operation, no deadline (the
first request of an operation pays for imports), and only the explicit and generate
phases (no shrinking of failures that never happen). Operations are driven by hand
with Hypothesis (schemathesis' ``from_fixture`` does not run on pytest 9).
"""

from __future__ import annotations

import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.api._support import Stored

EXAMPLES = 25

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
