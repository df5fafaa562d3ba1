"""core/sharing.py: what a share token may read (pure, deny by default)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from core.sharing import (
    ShareGrant,
    hash_share_token,
    is_share_token,
    new_share_token,
    share_allows,
    share_state,
)

GRANT = ShareGrant("abc", "1.2.3", frozenset({"1.2.3.4"}), datetime(2030, 1, 1, tzinfo=UTC))


@pytest.mark.parametrize(
    ("method", "path", "query", "ok"),
    [
        ("GET", "/viewer/api/share", "", True),
        ("GET", "/viewer/api/studies/1.2.3/series", "", True),
        ("GET", "/viewer/api/studies/1.2.33/series", "", False),
        ("GET", "/viewer/api/studies", "", False),
        ("GET", "/iiif/1.2.3.4@7:0:axial:0/full/max/0/default.png", "", True),
        ("HEAD", "/iiif/1.2.3.4:0:axial:0/info.json", "", True),
        ("GET", "/iiif/1.2.3.45@7:0:axial:0/info.json", "", False),
        ("GET", "/dzi/1.2.3.4@7:0:axial:0.dzi", "", True),
        ("GET", "/dzi/1.2.3.4@7:0:axial:0_files/9/0_0.png", "", True),
        ("GET", "/dzi/9.9@7:0:axial:0_files/9/0_0.png", "", False),
        ("GET", "/dicomweb/studies/1.2.3/series/1.2.3.4/metadata", "", True),
        ("GET", "/dicomweb/studies/1.2.3", "", True),
        ("GET", "/dicomweb/studies/1.2.3/../1.2.4/metadata", "", False),
        ("GET", "/dicomweb/studies/1.2.3//x", "", False),
        ("GET", "/dicomweb/studies/1.2.30", "", False),
        ("GET", "/dicomweb/studies", "StudyInstanceUID=1.2.3&includefield=all", True),
        ("GET", "/dicomweb/studies", "0020000D=1.2.3", True),
        ("GET", "/dicomweb/studies", "StudyInstanceUID=1.2.3%5C1.2.4", False),
        ("GET", "/dicomweb/studies", "StudyInstanceUID=1.2.3&StudyInstanceUID=1.2.4", False),
        ("GET", "/dicomweb/studies", "PatientID=x", False),
        ("GET", "/dicomweb/series", "StudyInstanceUID=1.2.3", False),
        ("POST", "/dicomweb/studies/1.2.3", "", False),
        ("DELETE", "/viewer/api/share", "", False),
        ("GET", "/fhir/ImagingStudy", "", False),
        ("GET", "/admin/shares", "", False),
    ],
)
def test_share_allows(method: str, path: str, query: str, ok: bool) -> None:
    assert share_allows(GRANT, method, path, query) is ok


def test_tokens() -> None:
    token = new_share_token()
    assert is_share_token(token) and len(token) == 4 + 43  # 256 bits, base64url
    assert token != new_share_token()
    assert len(hash_share_token(token)) == 64 and token not in hash_share_token(token)
    assert not is_share_token("pls_" + "a" * 42) and not is_share_token("plk_" + "a" * 43)
    end = datetime(2030, 1, 1, tzinfo=UTC)
    assert share_state(end, None, datetime(2029, 1, 1, tzinfo=UTC)) == "active"
    assert share_state(end, None, end) == "expired"
    assert share_state(end, end, datetime(2029, 1, 1, tzinfo=UTC)) == "revoked"
