"""One analyzer's E1394 messages: results to the store, host queries answered.

The handler given to the link loop (:data:`~ingest.labs.links._runner.MessageHandler`):
parse the message with the analyzer's character set and decimal mark, then

- results (R records) are filed like a dropped file's, through
  :meth:`services.analyzers.AnalyzerService.store_results`; the
  raw message is kept first under ``<data_dir>/links/<name>/messages/`` (as a file
  is kept in ``processed/``);
- each Q record (E1394 §12) gets a reply message: H, then per specimen P and one
  O record listing the ordered tests (O.5 repeats, O.26 ``O`` = order), or
  ``L|1|I`` (no information, §13.1.3) when nothing is ordered;
- a message we cannot parse is kept under ``rejected/`` with its reason and
  acknowledged: it is durable and waits for inspection, and a NAK would only make
  the analyzer send the same bytes again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Final, Protocol

from core.charsets import codec_for, encode_text
from core.errors import LabMessageError
from core.lab_values import DecimalComma
from core.labs import Coding, LabMessage, ParseResult
from core.settings import AnalyzerSettings
from ingest.labs.parsers import astm
from services.analyzers import AnalyzerService, SpecimenOrders

__all__ = ["AstmSession", "format_query_reply"]

logger = logging.getLogger(__name__)

_DECIMAL: Final[dict[str, DecimalComma]] = {"auto": "auto", "comma": True, "point": False}
_LOINC_LIKE: Final = frozenset("0123456789-")


class _LinkSession(Protocol):
    """What :func:`store_message` needs of an ASTM or HL7 link session (read only)."""

    @property
    def service(self) -> AnalyzerService: ...
    @property
    def messages(self) -> Path: ...


def store_message(
    session: _LinkSession, sha: str, raw: bytes, parsed: ParseResult, *, fmt: str
) -> None:
    """Keep the raw message, then store its results (one lab file of the link): the
    step after which the message may be acknowledged (ASTM ACK to the ``L`` frame,
    HL7 ``AA``)."""
    AstmSession._keep(session.messages, sha, raw, None)
    session.service.store_results(parsed, sha256=sha, fmt=fmt)


class AstmSession:
    """The message handler of one ASTM analyzer link."""

    def __init__(
        self,
        settings: AnalyzerSettings,
        service: AnalyzerService,
        *,
        folder: Path,
    ) -> None:
        self.settings = settings
        self.service = service
        self.encoding = codec_for(settings.encoding) or settings.encoding
        self.decimal = _DECIMAL[settings.decimal_mark]
        self.messages = folder / "messages"
        self.rejected = folder / "rejected"

    def __call__(self, message: bytes) -> list[bytes]:
        sha = hashlib.sha256(message).hexdigest()
        status = self.service.status
        try:
            parsed = astm.parse(message, encoding=self.encoding, decimal_comma=self.decimal)
        except LabMessageError as exc:
            self._keep(self.rejected, sha, message, {"where": exc.where, "why": exc.reason})
            status.count("rejected")
            status.error(f"message rejected: {exc.title}")
            logger.warning("analyzer %s: message %s rejected", self.settings.name, sha[:12])
            return []
        parsed = self._mapped(parsed)
        replies = [
            format_query_reply(
                msg, self.service.ordered_tests, self.settings.name, encoding=self.encoding
            )
            for msg in parsed.messages
            if msg.queries
        ]
        if parsed.observations:
            self._store(sha, message, parsed)
        return replies

    def download(self, specimen_id: str) -> bytes | None:
        """The order download for ``specimen_id`` (sent when the specimen is received).

        The same records as a host query reply; None when nothing is ordered.
        """
        query = LabMessage(format="astm", where="download", queries=(specimen_id,))
        found = self.service.ordered_tests(specimen_id)
        if found is None:
            return None
        return format_query_reply(
            query, lambda _: found, self.settings.name, encoding=self.encoding
        )

    def _store(self, sha: str, message: bytes, parsed: ParseResult) -> None:
        store_message(self, sha, message, parsed, fmt="astm")

    def _mapped(self, parsed: ParseResult) -> ParseResult:
        """Add the configured order code (LOINC) to each result as an alternate."""
        if not self.service.test_codes:
            return parsed
        messages = []
        for msg in parsed.messages:
            observations = []
            for obs in msg.observations:
                ordered = self.service.ordered_code(obs.test.code)
                if ordered:
                    system = "LN" if set(ordered) <= _LOINC_LIKE and "-" in ordered else "local"
                    alt = (*obs.test_alternates, Coding(ordered, obs.test.display, system))
                    obs = replace(obs, test_alternates=alt)
                observations.append(obs)
            messages.append(replace(msg, observations=tuple(observations)))
        return ParseResult(tuple(messages), parsed.warnings)

    @staticmethod
    def _keep(folder: Path, sha: str, raw: bytes, reason: dict[str, object] | None) -> None:
        """Write ``raw`` (and its reason) durably: temporary file, fsync, rename."""
        folder.mkdir(parents=True, exist_ok=True)
        items = [(f"{sha}.astm", raw)]
        if reason is not None:
            items.append((f"{sha}.error.json", json.dumps(reason).encode()))
        for name, data in items:
            final = folder / name
            if final.exists():
                continue
            tmp = folder / f".{name}.tmp"
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _escape(text: str) -> str:
    # E1394 §6.6 escapes with the declared escape delimiter (& here).
    return (
        text.replace("&", "&E&")
        .replace("|", "&F&")
        .replace("\\", "&R&")
        .replace("^", "&S&")
        .replace("\r", " ")
        .replace("\n", " ")
    )


def format_query_reply(
    query: LabMessage,
    lookup: Callable[[str], SpecimenOrders | None],
    sender: str,
    *,
    encoding: str = "latin-1",
    now: datetime | None = None,
) -> bytes:
    """The reply to a host query message (E1394 §12, LIS2-A2 §6.3), as records.

    ``lookup(specimen_id)`` returns :class:`~services.analyzers.SpecimenOrders` or
    None. Specimens with orders get P and O records (O.5 the analyzer's test codes
    as repeats ``^^^CODE``, O.12 ``N`` new, O.26 ``O`` order); when no specimen has
    any, the message is H and ``L|1|I`` (no information available). Text is
    written in the analyzer's ``encoding`` (:func:`core.charsets.encode_text`).
    """
    stamp = (now or datetime.now()).strftime("%Y%m%d%H%M%S")
    lines = [f"H|\\^&|||pacslab|||||{_escape(query.sender)}||P|1|{stamp}"]
    answered = 0
    for specimen in query.queries:
        found = lookup(specimen)
        if found is None:
            continue
        answered += 1
        name = found.patient_name.replace("^", "\x00")
        name = "^".join(_escape(part) for part in name.split("\x00"))
        birth = found.birth_date.strftime("%Y%m%d") if found.birth_date else ""
        lines.append(f"P|{answered}||{_escape(found.patient_id)}||{name}||{birth}|{found.sex}")
        tests = "\\".join(f"^^^{_escape(t.analyzer_code)}" for t in found.tests)
        lines.append(
            f"O|1|{_escape(specimen)}||{tests}|{found.priority}|{stamp}|||||N||||||||||||||O"
        )
    lines.append("L|1|N" if answered else "L|1|I")
    text = "\r".join(lines) + "\r"
    return encode_text(text, encoding)
