"""Process-wide third-party configuration, set once by the composition root.

pydicom, pynetdicom and :mod:`tempfile` keep configuration in module globals. Setting
them in constructors (as the DICOM receiver and the worklist SCP once did) made every
object built in a test change the process for the tests after it, which is how
pydicom's and the FastAPI template's tests came to need save-flip-restore fixtures
(STYLE.md §4). Here they are set in one place, by the process entry points in
``pacslab/`` only: :func:`pacslab.dicom_process.run_receiver` for a DICOM receiver
process (which also serves the worklist and MPPS).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from pydicom import config as pydicom_config
from pynetdicom import _config

__all__ = ["configure_runtime"]


def configure_runtime(*, receiver_staging: Path | None = None) -> None:
    """Set pynetdicom's and pydicom's globals (and the temp directory) for this process.

    Always: pynetdicom keeps data set identifiers (names, birth dates, patient ids)
    out of its logs (``LOG_REQUEST_IDENTIFIERS``/``LOG_RESPONSE_IDENTIFIERS``, STYLE.md
    §5) and association threads inherit the correlation id of :mod:`core.logging`
    (``PASS_CONTEXTVARS``).

    Parameters
    ----------
    receiver_staging : Path, optional
        Given in a DICOM receiver process: its staging directory. pynetdicom then
        receives C-STORE data sets in chunks to a file (``STORE_RECV_CHUNKED_DATASET``)
        in :mod:`tempfile`'s directory, pointed here so the file is on the same file
        system as the originals; pynetdicom's handler logging is off (ours logs);
        and pydicom reads values without validating them, because on read
        validation only produces warnings (its default ``WARN``) and its regexes
        cost more than the rest of header parsing; refusals are decided by
        :func:`core.instance.record_from`.
    """
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.PASS_CONTEXTVARS = True
    if receiver_staging is None:
        return
    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.LOG_HANDLER_LEVEL = "none"
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    tempfile.tempdir = str(receiver_staging)
