"""pynetdicom's reactor race (pacslab.runtime.close_reactor_race; pynetdicom issue #875).

The reactor thread of an association marks itself paused before it waits on its
checkpoint and unmarks itself after; a ``send_*`` that clears the checkpoint in between
trusts the stale mark, and the reactor can take the peer's response off the queue.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

from pynetdicom import AE
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacslab.runtime import close_reactor_race
from tests.support import Receiver


def test_the_reactor_gets_nothing_while_a_sender_waits() -> None:
    close_reactor_race()
    assoc = SimpleNamespace(_reactor_checkpoint=threading.Event(), dimse_timeout=1.0)
    dimse = DIMSEServiceProvider(assoc)  # type: ignore[arg-type]
    dimse.msg_queue.put((1, "response"))  # type: ignore[arg-type]
    assoc._reactor_checkpoint.clear()  # a send_* waits for its response
    assert dimse.get_msg(block=False) == (None, None)  # the reactor's poll
    assert dimse.get_msg(block=True) == (1, "response")  # type: ignore[comparison-overlap]
    assoc._reactor_checkpoint.set()
    dimse.msg_queue.put((3, "request"))  # type: ignore[arg-type]
    # Served by the reactor as before.
    assert dimse.get_msg(block=False) == (3, "request")  # type: ignore[comparison-overlap]
    wrapper = DIMSEServiceProvider.get_msg
    close_reactor_race()  # idempotent: one wrapper, not two
    assert DIMSEServiceProvider.get_msg is wrapper


class _LateReactor(threading.Event):
    """A checkpoint whose ``wait`` returns late: the reactor is held in the window
    between "paused" and "not paused" that the race needs, every time (a loaded machine
    does the same by descheduling the thread there)."""

    def wait(self, timeout: float | None = None) -> bool:
        result = super().wait(timeout)
        time.sleep(0.2)
        return result


def test_a_fast_response_reaches_the_sender_through_the_race_window(receiver: Receiver) -> None:
    """Real association to our receiver, the reactor held in the race window: the C-ECHO
    response must reach ``send_c_echo``, not the reactor (without the fix: an empty
    status after the DIMSE timeout, "Received unexpected C-ECHO service message")."""
    close_reactor_race()
    ae = AE(ae_title="RACESCU")
    ae.add_requested_context(Verification)
    ae.dimse_timeout = 5
    assoc = ae.associate("127.0.0.1", receiver.port)
    assert assoc.is_established
    try:
        late = _LateReactor()
        late.set()
        assoc._reactor_checkpoint = late
        send = assoc.dimse.send_msg

        def send_then_stall(*args: Any, **kwargs: Any) -> None:
            # The sender is slower to its get_msg than the reactor out of its wait,
            # so the response is on the queue when the reactor polls.
            send(*args, **kwargs)
            time.sleep(0.3)

        assoc.dimse.send_msg = send_then_stall  # type: ignore[method-assign]
        statuses: list[Any] = []
        for _ in range(3):
            time.sleep(0.05)  # the reactor is inside its late wait now
            status = assoc.send_c_echo()
            statuses.append(getattr(status, "Status", None))
        assert statuses == [0x0000] * 3
    finally:
        assoc._reactor_checkpoint = threading.Event()
        assoc._reactor_checkpoint.set()
        assoc.release()
