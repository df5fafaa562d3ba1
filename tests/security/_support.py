"""Helpers shared by the security tests (imported, unlike conftest fixtures)."""

from __future__ import annotations


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}
