"""When is a dropped lab file complete? The rules are the drop folders' (pure).

Kept as the lab inboxes' name for :mod:`core.dropfiles`, which the order inbox
shares: a temporary name (``.x``, ``x.tmp``, ``x.part``…) waits for its rename; an
unrenamed file must be quiet (size, mtime, inode) for ``lab_stable_s``, closed by
its writer, and end as its format says (ASTM ``L`` record or E1381 ``EOT``, HL7
``BTS``/``FTS``). See :mod:`storage.dropfolder` for the disk side.
"""

from __future__ import annotations

from core.dropfiles import PARTIAL_SUFFIXES as IGNORED_SUFFIXES
from core.dropfiles import Stability, filed_name, is_candidate, is_partial

__all__ = ["IGNORED_SUFFIXES", "Stability", "filed_name", "is_candidate", "is_partial"]
