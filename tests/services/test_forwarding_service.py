"""Forwarding (issue 16 §4): rules, backoff, and a real Orthanc that is down, then back.

The end-to-end test stores instances over C-STORE while the destination Orthanc is
down, lets the processing worker try (and fail) a few times, restarts the worker,
starts Orthanc, and checks that exactly the routed instances arrive: at least once,
nothing lost across the worker restart or the outage. A dead-lettered job keeps its
last error and is delivered after a manual retry.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from core.settings import ForwardingRule, ForwardingSettings, Settings
from services.forwarding import InstanceFacts, backoff_s, route
from tests.ingest.dicom.qr_data import CT, MR, Study, build, store
from tests.orthanc_peer import OrthancPeer
from tests.support import Receiver, wait_until

#: Forwarding converges over retries and backoff: poll less often, wait longer.
_wait = partial(wait_until, timeout=60, interval=0.2)

ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"

# -- pure ------------------------------------------------------------------------------


def _facts(**kw: str) -> InstanceFacts:
    base = {"sop_instance_uid": "1.2.3", "sop_class_uid": CT, "calling_ae": "CT1",
            "source": "dicom", "modality": "CT"}
    base.update(kw)
    study = {"InstitutionName": kw.get("institution", "SITE A HOSPITAL")}
    base.pop("institution", None)
    return InstanceFacts(study=study, **base)  # type: ignore[arg-type]


def test_route_every_criterion_filters() -> None:
    rules = [
        ForwardingRule(name="ct", destinations=["A"], modalities=["CT"], calling_aes=["CT1"]),
        ForwardingRule(name="site", destinations=["B", "A"], study={"InstitutionName": "SITE A*"}),
        ForwardingRule(name="stow", destinations=["C"], sources=["stow"]),
        ForwardingRule(name="sr", destinations=["D"], sop_classes=[ENHANCED_SR]),
    ]
    assert route(rules, _facts()) == ["A", "B"]
    assert route(rules, _facts(modality="MR")) == ["B", "A"]
    assert route(rules, _facts(calling_ae="CT2", institution="SITE B")) == []
    assert route(rules, _facts(source="stow", institution="X", modality="US")) == ["C"]
    assert route(rules, _facts(sop_class_uid=ENHANCED_SR,
                               institution="X", calling_ae="Z")) == ["D"]


def test_backoff_doubles_and_is_capped() -> None:
    assert [backoff_s(a, 5, 60) for a in (1, 2, 3, 4, 5, 9)] == [5, 10, 20, 40, 60, 60]


def test_settings_refuse_unknown_destination_and_long_names() -> None:
    with pytest.raises(ValueError, match="unknown destinations"):
        ForwardingSettings(rules=[ForwardingRule(name="r", destinations=["NOPE"])])
    with pytest.raises(ValueError, match="1-12"):
        ForwardingSettings(destinations={"A_VERY_LONG_NAME": {"ae_title": "X", "host": "h"}})
    with pytest.raises(ValueError, match="http"):
        ForwardingSettings(destinations={"W": {"kind": "stow", "url": "ftp://x"}})


# -- against Orthanc ----------------------------------------------------------------------


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancPeer]:
    peer = OrthancPeer(tmp_path / "orthanc", aet="REGIONAL")
    yield peer
    peer.stop()


@pytest.fixture
def settings(settings: Settings, orthanc: OrthancPeer) -> Settings:
    forwarding = ForwardingSettings(
        destinations={"REGIONAL": {"ae_title": "REGIONAL", "host": "127.0.0.1",
                                   "port": orthanc.dicom_port}},
        rules=[ForwardingRule(name="ct-to-regional", destinations=["REGIONAL"],
                              modalities=["CT"])],
        max_attempts=4, retry_base_s=0.2, retry_max_s=0.5, timeout_s=5,
    )
    processing = settings.processing.model_copy(
        update={"series_quiet_s": 3600.0, "poll_interval_s": 0.1}
    )
    return settings.model_copy(update={"forwarding": forwarding, "processing": processing})


def _forward_jobs(receiver: Receiver) -> list[object]:
    return [j for j in receiver.index.get_jobs() if j.kind.startswith("fwd:")]  # type: ignore[attr-defined]


@pytest.mark.network
def test_forward_to_orthanc_down_then_up_nothing_lost(
    receiver: Receiver, orthanc: OrthancPeer, settings: Settings
) -> None:
    from pacslab.worker_process import build_worker
    from storage.index.qr import retry_job

    ct = Study("FW001", "VO^THI D", "20240601", "A6001", [("CT", CT, 3)])
    mr = Study("FW002", "DO^VAN E", "20240602", "A6002", [("MR", MR, 2)])
    store(receiver.port, build(ct) + build(mr))
    worker = build_worker(settings, name="fwd-test")
    worker.start()
    try:
        # Orthanc is down: every try fails, is retried with backoff, then dead-lettered.
        _wait(lambda: len(_forward_jobs(receiver)) == 3
                     and all(j.status == "failed" for j in _forward_jobs(receiver)))  # type: ignore[attr-defined]
        dead = _forward_jobs(receiver)
        assert all("gave up after 4 tries" in j.error for j in dead)  # type: ignore[attr-defined]
        assert {j.target for j in dead} == set(ct.sop_uids[0])  # type: ignore[attr-defined]
        # The worker restarts while the destination is still down, now patient enough
        # for an outage of any length.
        worker.stop()
        patient = settings.forwarding.model_copy(update={"max_attempts": 100_000})
        worker = build_worker(settings.model_copy(update={"forwarding": patient}),
                              name="fwd-test")
        worker.start()
        orthanc.start()
        for job in dead:
            assert retry_job(receiver.index, job.id, "fwd:")  # type: ignore[attr-defined,arg-type]
        _wait(lambda: orthanc.sop_instance_uids() == set(ct.sop_uids[0]))
        _wait(lambda: all(j.status == "done" for j in _forward_jobs(receiver)))  # type: ignore[attr-defined]
        # Down again for a while: new instances wait in the queue and arrive later.
        orthanc.stop()
        more = Study("FW003", "VO^THI D", "20240603", "A6003", [("CT", CT, 2)])
        store(receiver.port, build(more))
        _wait(lambda: any(j.status == "pending" and j.attempts >= 1  # type: ignore[attr-defined]
                                 for j in _forward_jobs(receiver)))
        orthanc.start()
        want = set(ct.sop_uids[0]) | set(more.sop_uids[0])
        _wait(lambda: orthanc.sop_instance_uids() == want)
        assert not any(j.status == "failed" for j in _forward_jobs(receiver))  # type: ignore[attr-defined]
    finally:
        worker.stop()
