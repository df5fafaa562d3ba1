"""Lab results: pure parsers (``parsers/``) over shared value objects (``model``).

``parsers.detect(raw)`` names the format, ``parsers.get_parser(name)(raw)``
returns a :class:`~core.labs.ParseResult`. No I/O happens here; the file
watcher that feeds bytes in and stores results out lives in ``watcher.py``.
"""
