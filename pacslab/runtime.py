"""Process-wide third-party configuration, set once by the composition root.

pydicom, pynetdicom and :mod:`tempfile` keep configuration in module globals. Setting
them in constructors (as the DICOM receiver and the worklist SCP once did) made every
object built in a test change the process for the tests after it, which is how
pydicom's and the FastAPI template's tests came to need save-flip-restore fixtures
(STYLE.md §4). Here they are set in one place, by the process entry points in
``pacslab/`` only: :func:`pacslab.dicom_process.run_receiver` for a DICOM receiver
process (which also serves the worklist and MPPS), the worker process of ``pacslab
serve`` and ``pacslab worker`` (a DICOM SCU: forwarding, Storage Commitment reports),
and the main process of ``pacslab serve`` (API and inboxes).
"""

from __future__ import annotations

import ctypes
import os
import signal
import tempfile
from pathlib import Path
from typing import Any

import pynetdicom
from pydicom import config as pydicom_config
from pynetdicom import _config
from pynetdicom.dimse import DIMSEServiceProvider

__all__ = ["close_reactor_race", "configure_runtime", "die_with_parent"]


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel kill this child process when the ``pacslab serve`` that started
    it dies (Linux ``PR_SET_PDEATHSIG``): a receiver or worker left behind would hold
    the port, the index and its claims with nobody supervising it.

    ``parent_pid`` is the parent's pid as the parent saw it when it started the child:
    a parent that died before this call (a spawned child takes a second to get here)
    sent no signal, and this process then exits at once instead of running orphaned.
    """
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() != parent_pid:
        os._exit(0)


def close_reactor_race() -> None:
    """Keep an association's reactor thread off the DIMSE queue while a ``send_*`` waits.

    pynetdicom 3.0's reactor marks itself paused just *before* it waits on its
    checkpoint and unmarks it just after. A ``send_c_store`` (or any ``send_*``) that
    clears the checkpoint in between sees a stale "paused", sends, and the reactor then
    takes the peer's response off the queue as if it were a request ("Received
    unexpected C-STORE service message"): the sender waits out the DIMSE timeout. It
    happens when the peer answers fast and the machine is loaded (pynetdicom issue
    #875; one CI run here lost a C-STORE of our own test SCU to it). The reactor is the
    only caller of the non-blocking ``get_msg``; while the checkpoint is cleared it now
    gets nothing, so the message stays for the sender. Process-wide, idempotent, and
    only on the pynetdicom major version this was read against.
    """
    current: Any = DIMSEServiceProvider.get_msg
    if getattr(current, "_pacslab_race_closed", False):
        return
    if not pynetdicom.__version__.startswith("3."):
        return

    def get_msg(self: DIMSEServiceProvider, block: bool = False) -> Any:
        if not block:
            checkpoint = getattr(self.assoc, "_reactor_checkpoint", None)
            if checkpoint is not None and not checkpoint.is_set():
                return None, None
        return current(self, block)

    get_msg._pacslab_race_closed = True  # type: ignore[attr-defined]
    DIMSEServiceProvider.get_msg = get_msg  # type: ignore[method-assign]


def configure_runtime(*, receiver_staging: Path | None = None) -> None:
    """Set pynetdicom's and pydicom's globals (and the temp directory) for this process.

    Always: the reactor race of :func:`close_reactor_race` is closed; pynetdicom keeps
    data set identifiers (names, birth dates, patient ids) out of its logs
    (``LOG_REQUEST_IDENTIFIERS``/``LOG_RESPONSE_IDENTIFIERS``, STYLE.md §5) and association
    threads inherit the correlation id of :mod:`core.logging`
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
    close_reactor_race()
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.PASS_CONTEXTVARS = True
    if receiver_staging is None:
        return
    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.LOG_HANDLER_LEVEL = "none"
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    tempfile.tempdir = str(receiver_staging)
