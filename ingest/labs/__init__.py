"""Lab results in: pure parsers (``parsers/``) over the shared values of :mod:`core.labs`.

``parsers.detect(raw)`` names the format, ``parsers.get_parser(name)(raw)``
returns a :class:`~core.labs.ParseResult`. The shells that feed bytes in are the
file watcher (``watcher.py``) and the analyzer links (``links/``); both file the
results through :class:`services.lab_results.LabResultService`.
"""
