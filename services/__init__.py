"""Application layer (STYLE.md §1): use cases shared by the edges; no wire code."""
