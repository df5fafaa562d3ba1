"""When is a dropped file complete? (pure; the watcher feeds it ``stat`` values.)

A file is read only when its writer is done with it, judged in one of two ways:

- **Rename convention.** Writers that first write ``name.tmp`` or ``name.part`` and
  then rename it (what Mirth's and most LIS middleware's file writers do) are never
  read before the rename; the renamed file is complete at once.
- **Quiet period.** Otherwise the size and modification time must stay the same
  for ``stable_s`` seconds (``IngestSettings.lab_stable_s``): a file untouched for
  that long — by our clock since we first saw it, or by its mtime — is taken as
  complete.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

__all__ = ["IGNORED_SUFFIXES", "Stability", "filed_name", "is_candidate", "is_partial"]

#: Names a writer uses while a file is still being written.
IGNORED_SUFFIXES: Final = (".tmp", ".part", ".partial", ".filepart", ".crdownload")


def is_partial(name: str) -> bool:
    """True for a name that marks a file still being written (``x.hl7.tmp``)."""
    return name.lower().endswith(IGNORED_SUFFIXES)


def is_candidate(name: str) -> bool:
    """True for a file name the inbox should consider reading.

    Hidden files (``.x``, editor locks ``~$x``) and partial names are skipped; so are
    our own reason/summary files should one ever land in an inbox.
    """
    if not name or name.startswith((".", "~")):
        return False
    if is_partial(name):
        return False
    return not name.endswith((".summary.json", ".error.json"))


@dataclass(slots=True)
class _Seen:
    size: int
    mtime_ns: int
    since: float


@dataclass(slots=True)
class Stability:
    """Tracks candidate files until each is complete.

    Parameters
    ----------
    stable_s : float
        Quiet period, seconds.
    """

    stable_s: float
    _seen: dict[str, _Seen] = field(default_factory=dict)
    _renamed: set[str] = field(default_factory=set)

    def renamed(self, path: str) -> None:
        """The writer renamed a partial file to ``path``: it is complete."""
        self._renamed.add(path)

    def observe(self, path: str, *, size: int, mtime_ns: int, wall: float, mono: float) -> bool:
        """Record a ``stat`` of ``path``; return True when the file may be read.

        ``wall`` is the wall clock (to compare with ``mtime_ns``), ``mono`` a
        monotonic clock (for our own waiting).
        """
        if path in self._renamed:
            return True
        prev = self._seen.get(path)
        if prev is None or (prev.size, prev.mtime_ns) != (size, mtime_ns):
            self._seen[path] = _Seen(size, mtime_ns, mono)
            # A file found already quiet for stable_s by its mtime (e.g. at start-up
            # after a crash) needs no further wait.
            return wall - mtime_ns / 1e9 >= self.stable_s
        return mono - prev.since >= self.stable_s

    def forget(self, path: str) -> None:
        """Stop tracking ``path`` (read, moved or deleted)."""
        self._seen.pop(path, None)
        self._renamed.discard(path)

    def __len__(self) -> int:
        return len(self._seen) + len(self._renamed)


def filed_name(name: str, sha256: str, taken: Callable[[str], bool]) -> str:
    """The name under ``processed/`` or ``rejected/``: the same, unless taken.

    A second file dropped under a name already filed keeps both: the new one gets
    the start of its hash before the extension (``r.hl7`` → ``r.1a2b3c4d.hl7``).
    """
    if not taken(name):
        return name
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        return f"{name}.{sha256[:8]}"
    return f"{stem}.{sha256[:8]}.{ext}"
