"""The application layer: use cases shared by the edges (ingest, worklist, api, worker).

No wire code here: edges translate their protocol to calls of these services, and
these call storage. See STYLE.md §1.
"""
