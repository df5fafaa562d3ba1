"""pacslab ingest."""
