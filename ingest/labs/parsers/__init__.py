"""pacslab ingest/labs/parsers."""
