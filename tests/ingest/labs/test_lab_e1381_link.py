"""The E1381 link state machine, effect by effect (pure: no socket, no clock)."""

from __future__ import annotations

from ingest.labs.e1381 import Abort, Deliver, E1381Link, LinkTimers, Send, Sent
from tests.ingest.labs._framing import frame

ENQ, ACK, NAK, EOT = b"\x05", b"\x06", b"\x15", b"\x04"
TIMERS = LinkTimers(reply_s=15, frame_s=30, busy_s=10, retries=6)


def _link() -> E1381Link:
    return E1381Link(timers=TIMERS)


def test_establishment_frames_and_deliver_before_the_last_ack() -> None:
    link = _link()
    assert link.receive(ENQ, 0) == [Send(ACK)]
    assert link.receive(frame(1, b"H|\\^&\r", last=True), 1) == [Send(ACK)]
    assert link.receive(frame(2, b"R|1|^^^K|4.1\r", last=True), 2) == [Send(ACK)]
    effects = link.receive(frame(3, b"L|1|N\r", last=True), 3)
    # The L frame is not answered yet: the message must be stored first.
    assert effects == [Deliver(b"H|\\^&\rR|1|^^^K|4.1\rL|1|N\r")]
    assert link.state == "storing"
    assert link.stored(True, 4) == [Send(ACK)]
    assert link.receive(EOT, 5) == []
    assert str(link.state) == "idle"


def test_storage_failure_naks_and_the_repeat_is_delivered_whole() -> None:
    link = _link()
    link.receive(ENQ, 0)
    link.receive(frame(1, b"H|\\^&\r", last=True), 0)
    last = frame(2, b"L|1|N\r", last=True)
    assert link.receive(last, 0) == [Deliver(b"H|\\^&\rL|1|N\r")]
    assert link.stored(False, 0) == [Send(NAK)]
    assert link.receive(last, 1) == [Deliver(b"H|\\^&\rL|1|N\r")]
    assert link.stored(True, 1) == [Send(ACK)]


def test_bad_checksum_and_wrong_number_are_naked_a_repeat_is_acked() -> None:
    link = _link()
    link.receive(ENQ, 0)
    good = frame(1, b"H|\\^&\r", last=True)
    bad = good[:-4] + b"00\r\n"
    assert link.receive(bad, 0) == [Send(NAK)]
    assert link.receive(frame(2, b"H|\\^&\r", last=True), 0) == [Send(NAK)]
    assert link.receive(good, 0) == [Send(ACK)]
    # Our ACK was lost; the sender repeats the frame: ACK, not delivered twice.
    assert link.receive(good, 0) == [Send(ACK)]


def test_etb_frames_join_into_one_record() -> None:
    link = _link()
    link.receive(ENQ, 0)
    assert link.receive(frame(1, b"H|\\^", last=False), 0) == [Send(ACK)]
    assert link.receive(frame(2, b"&\r", last=True), 0) == [Send(ACK)]
    assert link.receive(frame(3, b"L|1\r", last=True), 0) == [Deliver(b"H|\\^&\rL|1\r")]


def test_frame_split_across_reads_waits_for_crlf() -> None:
    link = _link()
    link.receive(ENQ, 0)
    data = frame(1, b"H|\\^&\r", last=True)
    assert link.receive(data[:5], 0) == []
    assert link.receive(data[5:-1], 0) == []
    assert link.receive(data[-1:], 0) == [Send(ACK)]


def test_receiver_timeout_discards_the_partial_message() -> None:
    link = _link()
    link.receive(ENQ, 0)
    link.receive(frame(1, b"H|\\^&\r", last=True), 1)
    assert link.tick(30) == []
    effects = link.tick(31.5)
    assert isinstance(effects[0], Abort) and "receiver timeout" in effects[0].reason
    assert link.state == "idle"
    # The next session starts clean at frame 1.
    assert link.receive(ENQ, 40) == [Send(ACK)]
    assert link.receive(frame(1, b"L|1\r", last=True), 40) == [Deliver(b"L|1\r")]


def test_sender_frames_retries_six_times_then_gives_up() -> None:
    link = _link()
    message = b"H|\\^&\rL|1|N\r"
    assert link.queue(message, 0) == [Send(ENQ)]
    first = link.receive(ACK, 1)
    assert first == [Send(frame(1, b"H|\\^&\r", last=True))]
    for attempt in range(6):
        assert link.receive(NAK, 2 + attempt) == first
    effects = link.receive(NAK, 9)
    assert effects[0] == Send(EOT)
    assert isinstance(effects[1], Abort) and effects[1].message == message
    assert link.state == "waiting"


def test_sender_success_and_timeout() -> None:
    link = _link()
    link.queue(b"H|\\^&\rL|1|N\r", 0)
    link.receive(ACK, 0)
    assert link.receive(ACK, 1) == [Send(frame(2, b"L|1|N\r", last=True))]
    assert link.receive(ACK, 2) == [Sent(b"H|\\^&\rL|1|N\r"), Send(EOT)]
    assert link.state == "idle"
    link.queue(b"H|\\^&\rL|1|N\r", 10)
    link.receive(ACK, 10)
    effects = link.tick(25.5)  # 15 s without a reply to the frame
    assert effects[0] == Send(EOT) and isinstance(effects[1], Abort)
    # After the busy wait the message is offered again, in a new session.
    assert link.tick(36) == [Send(ENQ)]


def test_contention_the_instrument_wins() -> None:
    link = _link()
    assert link.queue(b"H|\\^&\rL|1|N\r", 0) == [Send(ENQ)]
    # The analyzer sent ENQ at the same time: we receive first.
    assert link.receive(ENQ, 0.1) == [Send(ACK)]
    assert link.receive(frame(1, b"L|1\r", last=True), 0.2) == [Deliver(b"L|1\r")]
    assert link.stored(True, 0.3) == [Send(ACK)]
    # After its EOT our message goes out.
    assert link.receive(EOT, 0.4) == [Send(ENQ)]
    assert link.pending == 1


def test_a_frame_without_end_is_refused_when_it_outgrows_the_limit() -> None:
    link = _link()
    link.receive(ENQ, 0)
    assert link.receive(b"\x021" + b"x" * (64 * 1024 + 100), 0) == [Send(NAK)]
    # The link goes on: the next frame is read normally.
    assert link.receive(frame(1, b"H|\\^&\r", last=True), 0) == [Send(ACK)]
