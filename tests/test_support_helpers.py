"""tests.support.wait_until: the one polling helper of the suite (issue 15)."""

from __future__ import annotations

import itertools

import pytest

from tests.support import wait_until


def test_returns_the_first_truthy_value() -> None:
    calls = itertools.count()
    assert wait_until(lambda: next(calls) >= 2 and "done", interval=0) == "done"


def test_gives_up_with_what_is_left() -> None:
    with pytest.raises(AssertionError, match="3 left"):
        wait_until(lambda: False, timeout=0, interval=0, message=lambda: "3 left")
