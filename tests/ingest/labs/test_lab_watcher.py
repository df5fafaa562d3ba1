"""The inbox watcher's promises: nothing half-read, nothing twice, nothing lost.

Half-written files, the ``*.tmp`` rename convention, duplicates, corrections
keeping the original, a restart after a commit whose move never happened, the
critical-value webhook, and the real watchdog-driven loop.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.observation import Observation
from lab_support import LabRig, lab_settings, make_rig, open_rig, webhook_receiver

from api.app import create_app
from core.settings import Settings
from ingest.labs.watcher import LabInbox
from storage.lab import LabResultQuery
from tests.support import wait_until


def oru(
    *,
    control: str = "C1",
    specimen: str = "SPEC-1",
    patient: str = "PAT-1",
    value: str = "4.1",
    status: str = "F",
    code: str = "2823-3^Potassium^LN",
    flags: str = "",
    when: str = "20240315081500+0100",
) -> bytes:
    """A minimal HL7 v2.5.1 ORU^R01 with one NM result (our fixture, no real patient)."""
    segments = [
        f"MSH|^~\\&|CHEM|LAB|LIS|HOSP|{when}||ORU^R01|{control}|P|2.5.1",
        f"PID|1||{patient}^^^HOSP^MR||DOE^JANE||19800101|F",
        f"OBR|1|PL-{specimen}|{specimen}|2823-3^Potassium^LN|||{when}",
        f"OBX|1|NM|{code}||{value}|mmol/L|3.5-5.1|{flags}|||{status}|||{when}",
    ]
    return ("\r".join(segments) + "\r").encode("ascii")


@pytest.fixture
def rig(settings: Settings) -> Iterator[LabRig]:
    yield from make_rig(lab_settings(settings, critical={"2823-3": {"low": 2.8, "high": 6.2}}))


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def test_half_written_file_is_not_read(settings: Settings) -> None:
    """A writer that pauses between chunks: the file is read once, complete."""
    custom = lab_settings(settings)
    custom = custom.model_copy(
        update={"ingest": custom.ingest.model_copy(update={"lab_stable_s": 0.4})}
    )
    with open_rig(custom) as rig:
        data = b"".join(oru(control=f"C{i}", specimen=f"S{i}") + b"\r\n" for i in range(8))
        target = rig.inbox() / "slow.hl7"
        done = threading.Event()

        def writer() -> None:
            with target.open("wb") as fp:
                for start in range(0, len(data), 200):
                    fp.write(data[start : start + 200])
                    fp.flush()
                    time.sleep(0.1)
            done.set()

        thread = threading.Thread(target=writer)
        thread.start()
        outcomes = []

        def written() -> bool:
            if done.is_set():
                return True
            rig.watcher.rescan()
            outcomes.extend(rig.watcher.poll())
            return False

        wait_until(written, timeout=30, interval=0.02, message="the writer did not finish")
        assert outcomes == [], "the file was read while it was being written"
        thread.join()
        outcomes = rig.run()
        assert [(o.name, o.status, o.results) for o in outcomes] == [("slow.hl7", "ingested", 8)]


def test_tmp_files_wait_for_their_rename(rig: LabRig) -> None:
    tmp = rig.inbox() / "r1.hl7.tmp"
    tmp.write_bytes(oru())
    part = rig.inbox() / "r2.hl7.part"
    part.write_bytes(oru(specimen="SPEC-2"))
    assert rig.run() == []
    assert tmp.exists() and part.exists()
    os.replace(tmp, rig.inbox() / "r1.hl7")
    rig.watcher.notify(str(rig.inbox() / "r1.hl7"), renamed_from_partial=True)
    (outcome,) = rig.watcher.poll()
    assert (outcome.name, outcome.status) == ("r1.hl7", "ingested")
    assert part.exists()


def test_renamed_file_is_taken_without_a_quiet_period(settings: Settings) -> None:
    custom = lab_settings(settings)
    custom = custom.model_copy(
        update={"ingest": custom.ingest.model_copy(update={"lab_stable_s": 60.0})}
    )
    with open_rig(custom) as rig:
        (rig.inbox() / "plain.hl7").write_bytes(oru(specimen="A"))
        (rig.inbox() / "renamed.hl7.tmp").write_bytes(oru(specimen="B"))
        os.replace(rig.inbox() / "renamed.hl7.tmp", rig.inbox() / "renamed.hl7")
        rig.watcher.notify(str(rig.inbox() / "plain.hl7"))
        rig.watcher.notify(str(rig.inbox() / "renamed.hl7"), renamed_from_partial=True)
        assert [o.name for o in rig.watcher.poll()] == ["renamed.hl7"]
        assert (rig.inbox() / "plain.hl7").exists()  # still within its quiet period


def test_duplicate_file_is_recorded_not_ingested(rig: LabRig) -> None:
    _write(rig.inbox() / "a.hl7", oru())
    (first,) = rig.run()
    _write(rig.inbox() / "a.hl7", oru())  # same name, same bytes
    _write(rig.inbox() / "b.hl7", oru())  # other name, same bytes
    outcomes = {o.name: o for o in rig.run()}
    assert {n: o.status for n, o in outcomes.items()} == {
        "a.hl7": "duplicate",
        "b.hl7": "duplicate",
    }
    results, total = rig.store.search_results(LabResultQuery(current_only=False))
    assert total == 1 and results[0].version == 1
    processed = rig.inbox() / "processed"
    renamed = f"a.{first.sha256[:8]}.hl7"
    assert sorted(p.name for p in processed.iterdir()) == sorted(
        [
            "a.hl7",
            "a.hl7.summary.json",
            renamed,
            f"{renamed}.summary.json",
            "b.hl7",
            "b.hl7.summary.json",
        ]
    )
    body = json.loads((processed / "b.hl7.summary.json").read_text())
    assert (body["status"], body["duplicate_of"], body["results"]) == ("duplicate", "a.hl7", 0)
    state = rig.store.file_state(first.sha256)
    assert state is not None and (state.status, state.duplicates) == ("filed", 2)


def test_correction_adds_a_version_and_keeps_the_original(rig: LabRig) -> None:
    _write(rig.inbox() / "k1.hl7", oru(value="7.9", flags="HH"))
    rig.run()
    _write(rig.inbox() / "k2.hl7", oru(control="C2", value="4.4", status="C"))
    (outcome,) = rig.run()
    assert outcome.status == "ingested"
    current, total = rig.store.search_results(LabResultQuery(specimen_ids=("SPEC-1",)))
    assert total == 1
    (now,) = current
    assert (now.version, now.value, now.status, now.is_critical) == (2, 4.4, "corrected", False)
    history = rig.store.result_history(now.observation_id)
    assert [(h.version, h.value, h.status, h.is_current) for h in history] == [
        (2, 4.4, "corrected", True),
        (1, 7.9, "final", False),
    ]
    assert history[0].supersedes_pk == history[1].pk
    assert history[1].is_critical and history[1].critical_reason == "flag HH"
    body = json.loads((rig.inbox() / "processed" / "k2.hl7.summary.json").read_text())
    assert body["new_versions"] == 1

    with TestClient(create_app(rig.settings)) as client:
        obs = client.get(f"/fhir/Observation/{now.observation_id}").json()
        Observation.model_validate(obs)
        assert (obs["meta"]["versionId"], obs["status"], obs["valueQuantity"]["value"]) == (
            "2",
            "corrected",
            4.4,
        )
        original = client.get(f"/fhir/Observation/{now.observation_id}/_history/1").json()
        assert (original["status"], original["valueQuantity"]["value"]) == ("final", 7.9)
        assert original["meta"]["tag"][0]["code"] == "critical"
        history_bundle = client.get(f"/fhir/Observation/{now.observation_id}/_history").json()
        Bundle.model_validate(history_bundle)
        assert [e["resource"]["meta"]["versionId"] for e in history_bundle["entry"]] == ["2", "1"]
        missing = client.get(f"/fhir/Observation/{now.observation_id}/_history/9")
        assert missing.status_code == 404
        assert missing.json()["issue"][0]["code"] == "not-found"


def test_rejected_file_reason_names_what_where_why(rig: LabRig) -> None:
    _write(rig.inbox() / "junk.txt", b"hello, not a lab file\n")
    astm = b"H|\\^&|||ANALYZER\rP|1\rO|1|S1||^^^GLU\rR|1|^^^GLU|5.0|mmol/L\r"
    _write(rig.inbox() / "astm_bad.astm", astm.replace(b"H|", b"X|", 1))
    _write(rig.inbox() / "empty.hl7", b"")
    outcomes = {o.name: o.status for o in rig.run()}
    assert outcomes == {
        "junk.txt": "rejected",
        "astm_bad.astm": "rejected",
        "empty.hl7": "rejected",
    }
    rejected = rig.inbox() / "rejected"
    junk = json.loads((rejected / "junk.txt.error.json").read_text())
    assert junk["why"].startswith("unrecognised lab file") and junk["format"] is None
    empty = json.loads((rejected / "empty.hl7.error.json").read_text())
    assert empty["why"] == "empty file: not an ASTM or HL7 v2 message"


def test_astm_query_without_results_is_rejected(rig: LabRig) -> None:
    query = b"H|\\^&|||HOST\rQ|1|^S-9||ALL\rL|1|N\r"
    _write(rig.inbox() / "query.astm", query)
    (outcome,) = rig.run()
    assert outcome.status == "rejected"
    reason = json.loads((rig.inbox() / "rejected" / "query.astm.error.json").read_text())
    assert reason["why"] == "host query (Q record) for 1 specimen(s), not results"
    assert reason["where"] == "message 1, line 1"


def test_journaled_file_left_in_inbox_is_only_moved(rig: LabRig) -> None:
    """A crash after the commit and before the move: restart finishes the move."""
    path = rig.inbox() / "crash.hl7"
    _write(path, oru())
    inbox: LabInbox = rig.watcher.inboxes[path.parent.resolve()]
    original = inbox._file

    def crash(*args: Any, **kwargs: Any) -> Path:
        raise KeyboardInterrupt  # stands for SIGKILL between commit and move

    inbox._file = crash  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        inbox.process(path)
    inbox._file = original  # type: ignore[method-assign]
    assert path.exists()
    (outcome,) = rig.run()
    assert outcome.status == "recovered"
    assert not path.exists() and (rig.inbox() / "processed" / "crash.hl7").exists()
    body = json.loads((rig.inbox() / "processed" / "crash.hl7.summary.json").read_text())
    assert body["recovered"] is True and body["results"] == 1
    _, total = rig.store.search_results(LabResultQuery(current_only=False))
    assert total == 1
    state = rig.store.file_state(outcome.sha256)
    assert state is not None and state.status == "filed"


def test_order_link_later_clears_the_unmatched_queue(rig: LabRig) -> None:
    _write(rig.inbox() / "u.hl7", oru(specimen="ACC-77"))
    _write(rig.inbox() / "v.hl7", oru(specimen="ACC-78", control="C9"))
    rig.run()
    _, unmatched = rig.store.search_results(LabResultQuery(unmatched=True))
    assert unmatched == 2
    assert rig.store.link_results("ServiceRequest/77", specimen_id="ACC-77") == 1
    linked = rig.store.link_unmatched(lambda specimen, placer, filler: f"order:{placer}")
    assert linked == 1
    results, _ = rig.store.search_results(LabResultQuery())
    assert {r.specimen_id: r.order_ref for r in results} == {
        "ACC-77": "ServiceRequest/77",
        "ACC-78": "order:PL-ACC-78",
    }
    assert rig.store.search_results(LabResultQuery(unmatched=True))[1] == 0


@pytest.mark.network
def test_critical_values_reach_the_webhook_and_the_feed(settings: Settings) -> None:
    with webhook_receiver() as (url, received):
        custom = lab_settings(settings, critical={"2823-3": {"high": 6.2}},
                              critical_webhook_url=url)
        with open_rig(custom) as rig:
            before = time.time()
            _write(rig.inbox() / "crit.hl7", oru(value="7.1"))
            _write(rig.inbox() / "fine.hl7", oru(specimen="S-OK", value="4.0", control="C7"))
            rig.run()
            wait_until(lambda: received, message="no notice reached the webhook")
            (notice,) = received
            assert notice["event"] == "lab-result.critical"
            assert (notice["code"], notice["value"], notice["reason"]) == (
                "2823-3",
                7.1,
                "above critical high 6.2",
            )
            assert "PAT-1" not in json.dumps(notice)  # id-only: no patient data
            with TestClient(create_app(rig.settings)) as client:
                since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(before - 1))
                feed = client.get(
                    "/fhir/Observation",
                    params={
                        "_tag": "critical",
                        "_lastUpdated": f"gt{since}",
                        "_sort": "_lastUpdated",
                    },
                ).json()
                (entry,) = feed["entry"]
                assert entry["resource"]["id"] == notice["id"]


class _HeldHook(BaseHTTPRequestHandler):
    """A webhook receiver that holds its answer until the test releases it."""

    release = threading.Event()
    arrived = threading.Event()
    answered = threading.Event()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        _HeldHook.arrived.set()
        _HeldHook.release.wait(30)
        self.send_response(204)
        self.end_headers()
        _HeldHook.answered.set()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize("receiver", ["refusing", "hanging"])
def test_webhook_failure_never_blocks_ingestion(settings: Settings, receiver: str) -> None:
    # Causal, not timed: the file is filed while the webhook's answer is still held
    # (had ingestion waited for it, run() would return only after the answer).
    server = HTTPServer(("127.0.0.1", 0), _HeldHook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    for event in (_HeldHook.release, _HeldHook.arrived, _HeldHook.answered):
        event.clear()
    url = (
        "http://127.0.0.1:9/x"  # discard port: connection refused
        if receiver == "refusing"
        else f"http://127.0.0.1:{server.server_address[1]}/hook"
    )
    custom = lab_settings(settings, critical={"2823-3": {"high": 6.2}}, critical_webhook_url=url)
    try:
        with open_rig(custom) as rig:
            _write(rig.inbox() / "crit.hl7", oru(value="9.9"))
            (outcome,) = rig.run()
            assert outcome.status == "ingested"
            assert not _HeldHook.answered.is_set()
            (stored,), _ = rig.store.search_results(LabResultQuery())
            assert stored.value == 9.9
            if receiver == "hanging":
                wait_until(_HeldHook.arrived.is_set, message="the notice never left")
            _HeldHook.release.set()  # before the rig stops its webhook thread
    finally:
        _HeldHook.release.set()
        server.shutdown()


def test_watchdog_events_pick_up_a_dropped_file(settings: Settings) -> None:
    custom = lab_settings(settings)
    custom = custom.model_copy(
        update={
            "ingest": custom.ingest.model_copy(update={"lab_stable_s": 0.1, "lab_rescan_s": 60})
        }
    )
    with open_rig(custom, use_events=True) as rig:
        rig.watcher.start()
        time.sleep(0.2)
        tmp = rig.inbox() / "live.hl7.tmp"
        tmp.write_bytes(oru())
        os.replace(tmp, rig.inbox() / "live.hl7")
        wait_until(lambda: rig.watcher.outcomes, message="the dropped file was not picked up")
        assert [(o.name, o.status) for o in rig.watcher.outcomes] == [("live.hl7", "ingested")]
