"""Live analyzer links (issue 18): the I/O shells around :mod:`ingest.labs.e1381`.

``tcp.py`` (pacslab as server or as client) and ``serial.py`` (RS-232 through
pyserial) move bytes; :mod:`ingest.labs.links.session` turns a received E1394
message into a call of :class:`services.analyzers.AnalyzerService` and a host
query into the reply message. The loop shared by every transport is ``_runner``.
"""

from ingest.labs.links._runner import AnalyzerLink, Transport, run_link

__all__ = ["AnalyzerLink", "Transport", "run_link"]
