"""pacslab ingest/dicom."""
