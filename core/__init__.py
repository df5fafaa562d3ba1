"""Settings, domain values, errors and logging. Imports nothing of ours (STYLE.md §1)."""
