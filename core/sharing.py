"""Share links: one study, for a limited time, to someone without an account (pure, no I/O).

A share link is ``{public_url}/viewer/shared#token=pls_<secret>``: the secret is 256
random bits (``secrets.token_urlsafe(32)``), only its SHA-256 is stored, and the URL
holds neither a UID nor anything about the patient. The token rides in the fragment,
which a browser never sends to a server (RFC 3986 3.5), so it is in no request line,
access log or proxy log, nor in any ``Referer`` (the fragment is stripped from it,
Fetch standard "referrer" and RFC 9110 10.1.3; the viewer pages also send
``Referrer-Policy: no-referrer``). The viewer moves it from the fragment to the tab's
``sessionStorage`` and sends it as a bearer token (RFC 6750 2.1), like a staff token.

A fast hash is enough for storage: unlike a password, a 256-bit random secret cannot
be guessed from its SHA-256, so no scrypt is needed (which also lets the row be found
by the hash, one primary-key lookup per request).

With a share token a request may only *read* what the viewers need for the shared
study (:func:`share_allows`): its series and pyramids for the built-in viewer, and
its DICOMweb resources for OHIF. Everything else is refused (403), deny by default.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import secrets
import urllib.parse
from dataclasses import dataclass
from datetime import datetime
from typing import Final

__all__ = [
    "SHARE_PREFIX",
    "ShareGrant",
    "hash_share_token",
    "is_share_token",
    "new_share_id",
    "new_share_token",
    "share_allows",
    "share_state",
]

#: Share tokens start with this, so the authenticator tells them from JWTs and API keys.
SHARE_PREFIX: Final = "pls_"
_TOKEN_RE: Final = re.compile(r"^pls_[A-Za-z0-9_-]{43}$")
_READ: Final = frozenset({"GET", "HEAD"})


def new_share_token() -> str:
    """A fresh token: ``pls_`` and 256 random bits in base64url (43 characters)."""
    return SHARE_PREFIX + secrets.token_urlsafe(32)


def new_share_id() -> str:
    """The public id that names a share in lists, the CLI and the action log (64 bits)."""
    return secrets.token_hex(8)


def is_share_token(value: str) -> bool:
    """True if ``value`` is shaped like a :func:`new_share_token` value."""
    return bool(_TOKEN_RE.match(value))


def hash_share_token(token: str) -> str:
    """SHA-256 hex of the token: what the ``shares`` table keeps."""
    return hashlib.sha256(token.encode()).hexdigest()


def share_state(expires_at: datetime, revoked_at: datetime | None, now: datetime) -> str:
    """``active``, ``expired`` or ``revoked`` (revocation wins) at ``now``."""
    if revoked_at is not None:
        return "revoked"
    return "expired" if now >= expires_at else "active"


@dataclass(frozen=True, slots=True)
class ShareGrant:
    """What one valid share token lets its bearer read."""

    share_id: str
    study_uid: str
    #: Series of the study when the token was checked (the IIIF/DZI ids name a series).
    series_uids: frozenset[str]
    expires_at: datetime


def _image_series(image_id: str) -> str:
    """The series UID of an IIIF/DZI image id ``{series}[@{version}]:{stack}:…``."""
    return re.split(r"[@:]", image_id, maxsplit=1)[0]


def share_allows(grant: ShareGrant, method: str, path: str, query: str = "") -> bool:
    """May the bearer of ``grant`` make this request? Reads of the shared study only.

    Allowed (``GET``/``HEAD``):

    * ``/viewer/api/share`` (which study the link is for) and
      ``/viewer/api/studies/{study}/series``;
    * ``/iiif/{id}/…`` and ``/dzi/{id}…`` whose image id names a series of the study
      (IIIF Image API 3.0 4.1 identifiers, ``api/iiif.py``);
    * DICOMweb under ``/dicomweb/studies/{study}`` (WADO-RS, QIDO-RS of its series and
      instances, PS3.18 10.4, 10.6) and the study-level QIDO-RS that OHIF sends first,
      ``/dicomweb/studies?StudyInstanceUID={study}`` with exactly that one UID.

    A path that is not already normalised (``..``, ``//``) is refused, so it cannot
    name one thing here and another to the router.
    """
    if method.upper() not in _READ:
        return False
    if not path.startswith("/") or posixpath.normpath(path) != path.rstrip("/") or "//" in path:
        return False
    study = grant.study_uid
    if path == "/viewer/api/share" or path == f"/viewer/api/studies/{study}/series":
        return True
    for prefix in ("/iiif/", "/dzi/"):
        if path.startswith(prefix):
            image_id = path[len(prefix) :].split("/", 1)[0]
            if prefix == "/dzi/":
                image_id = re.sub(r"(\.dzi|_files)$", "", image_id)
            return _image_series(image_id) in grant.series_uids
    base = f"/dicomweb/studies/{study}"
    if path == base or path.startswith(base + "/"):
        return True
    if path.rstrip("/") == "/dicomweb/studies":
        params = urllib.parse.parse_qs(query, keep_blank_values=True)
        uids = params.get("StudyInstanceUID", []) + params.get("0020000D", [])
        return uids == [study]
    return False
