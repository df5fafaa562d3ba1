"""Connection slots (ingest.dicom.association.Admission): pure, no sockets served."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from ingest.dicom.association import Admission


@pytest.fixture
def socks() -> Iterator[list[socket.socket]]:
    made: list[socket.socket] = []
    yield made
    for s in made:
        s.close()


def _sock(socks: list[socket.socket]) -> socket.socket:
    a, b = socket.socketpair()
    socks.extend((a, b))
    return a


def test_a_new_connection_takes_the_slot_of_the_oldest_silent_one(
    socks: list[socket.socket],
) -> None:
    adm = Admission(total=3, per_key=3)
    first = adm.admit(_sock(socks), "10.0.0.1")
    second = adm.admit(_sock(socks), "10.0.0.2")
    third = adm.admit(_sock(socks), "10.0.0.3")
    assert first and second and third
    assert second.establish("CT1") and third.establish("MR1")
    fourth = adm.admit(_sock(socks), "10.0.0.4")
    assert fourth is not None
    assert first.state == "closed"  # never sent its A-ASSOCIATE-RQ: evicted
    assert len(adm) == 3


def test_busy_established_associations_are_never_evicted(socks: list[socket.socket]) -> None:
    adm = Admission(total=2, per_key=2, evict_idle_s=3600)
    for ip, ae in (("10.0.0.1", "CT1"), ("10.0.0.2", "MR1")):
        ticket = adm.admit(_sock(socks), ip)
        assert ticket is not None and ticket.establish(ae)
    assert adm.admit(_sock(socks), "10.0.0.3") is None


def test_an_idle_established_association_makes_room(socks: list[socket.socket]) -> None:
    adm = Admission(total=1, per_key=1, evict_idle_s=0)
    idle = adm.admit(_sock(socks), "10.0.0.1")
    assert idle is not None and idle.establish("FLOODER")
    assert adm.admit(_sock(socks), "10.0.0.2") is not None
    assert idle.state == "closed"


def test_one_calling_ae_holds_at_most_its_share(socks: list[socket.socket]) -> None:
    adm = Admission(total=8, per_key=2)
    tickets = [adm.admit(_sock(socks), f"10.0.0.{n}") for n in range(4)]
    assert all(tickets)
    results = [t.establish("FLOODER") for t in tickets if t]
    assert results == [True, True, False, False]
    other = adm.admit(_sock(socks), "10.0.0.9")
    assert other is not None and other.establish("CT1")


def test_one_ip_cannot_fill_the_table_before_associating(socks: list[socket.socket]) -> None:
    adm = Admission(total=4, per_key=2)
    silent = [adm.admit(_sock(socks), "10.0.0.1") for _ in range(5)]
    assert all(silent)
    assert sum(t.state == "pending" for t in silent if t) == 2  # older ones evicted
    assert adm.admit(_sock(socks), "10.0.0.2") is not None


def test_release_frees_the_slot(socks: list[socket.socket]) -> None:
    adm = Admission(total=1, per_key=1, evict_idle_s=3600)
    ticket = adm.admit(_sock(socks), "10.0.0.1")
    assert ticket is not None and ticket.establish("CT1")
    ticket.release()
    ticket.release()  # twice is harmless
    assert len(adm) == 0
    assert adm.admit(_sock(socks), "10.0.0.1") is not None
