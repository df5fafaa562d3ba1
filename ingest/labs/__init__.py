"""pacslab ingest/labs."""
