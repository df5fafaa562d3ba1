"""Where C-MOVE sends and storage commitment reports go: AE title → host, port (issue 16 §2).

Two sources: ``qr.destinations`` in the settings (fixed; the API cannot change them)
and those added through the admin API, kept in the index (migration 0007) so every
receiver process and a restart see them. The settings win on a name in both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from core.errors import ConfiguredElsewhereError, InvalidQueryError, NotFoundError
from core.settings import RemoteAE
from storage.index import qr as qr_index

if TYPE_CHECKING:
    from collections.abc import Mapping

    from storage.index.sql import SqlIndex

__all__ = ["Destination", "DestinationDirectory", "parse_ae_title"]

_HOST = re.compile(r"[A-Za-z0-9.:_-]{1,255}")


@dataclass(frozen=True, slots=True)
class Destination:
    ae_title: str
    host: str
    port: int
    source: str  # "settings" | "api"


def parse_ae_title(value: str) -> str:
    """PS3.5 6.2 AE: 1-16 characters of the default repertoire, no backslash or control."""
    stripped = value.strip()
    if not 1 <= len(stripped) <= 16 or "\\" in stripped or not stripped.isascii() or not (
        stripped.isprintable()
    ):
        raise InvalidQueryError("an AE title is 1-16 printable ASCII characters, no backslash")
    return stripped


class DestinationDirectory:
    def __init__(self, index: SqlIndex, configured: Mapping[str, RemoteAE]) -> None:
        self.index = index
        self.configured = dict(configured)

    def lookup(self, ae_title: str) -> RemoteAE | None:
        """The address of ``ae_title``, or None (C-MOVE answers 0xA801)."""
        found = self.configured.get(ae_title)
        if found is not None:
            return found
        stored = qr_index.get_destination(self.index, ae_title)
        return RemoteAE(host=stored[0], port=stored[1]) if stored else None

    def list(self) -> list[Destination]:
        out = {ae: Destination(ae, d.host, d.port, "settings")
               for ae, d in self.configured.items()}
        for ae, (host, port) in qr_index.list_destinations(self.index).items():
            out.setdefault(ae, Destination(ae, host, port, "api"))
        return [out[k] for k in sorted(out)]

    def put(self, ae_title: str, host: str, port: int, *, by: str) -> bool:
        ae = parse_ae_title(ae_title)
        if ae in self.configured:
            raise ConfiguredElsewhereError(f"{ae} is set in the settings; change it there")
        if not _HOST.fullmatch(host) or not 1 <= port <= 65535:
            raise InvalidQueryError("host must be a name or address, port 1-65535")
        return qr_index.put_destination(self.index, ae, host, port, by)

    def delete(self, ae_title: str) -> None:
        ae = parse_ae_title(ae_title)
        if ae in self.configured:
            raise ConfiguredElsewhereError(f"{ae} is set in the settings; change it there")
        if not qr_index.delete_destination(self.index, ae):
            raise NotFoundError(f"no destination {ae}")
