"""A Storage Commitment SCU (pynetdicom) run as its own process by the tests.

Its own process because pynetdicom 3.0.4 cannot take an N-EVENT-REPORT request when
``_config.PASS_CONTEXTVARS`` is on (``make_target`` wraps the handler thread's target
in a lambda that takes no arguments), and the receiver in the test process turns it
on. A modality is another process anyway.

usage: commit_scu.py PORT MODE(same|new|away|listen) LISTEN_PORT SCU_AE REQUEST_JSON
prints one JSON line: the N-ACTION status and the report received. ``away`` sends the
N-ACTION and leaves without listening (a modality switched off); ``listen`` sends
nothing and waits for a report on LISTEN_PORT (the same modality back on).
"""

from __future__ import annotations

import json
import sys
import threading
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
)


def main() -> int:
    port, mode, listen_port, scu_ae, raw = sys.argv[1:6]
    spec = json.loads(raw)
    got = threading.Event()
    report: dict[str, object] = {}

    def on_report(event: evt.Event) -> tuple[int, None]:
        info = event.event_information
        report["type"] = int(event.request.EventTypeID)  # type: ignore[union-attr, arg-type]
        report["transaction"] = str(info.TransactionUID)
        report["committed"] = [
            str(i.ReferencedSOPInstanceUID) for i in info.get("ReferencedSOPSequence", [])
        ]
        report["failed"] = {
            str(i.ReferencedSOPInstanceUID): int(i.FailureReason)
            for i in info.get("FailedSOPSequence", [])
        }
        report["same_association"] = mode == "same"
        got.set()
        return 0x0000, None

    server = None
    if mode in ("new", "listen"):
        listener = AE(ae_title=scu_ae)
        listener.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
        server = listener.start_server(("127.0.0.1", int(listen_port)), block=False,
                                       evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    if mode == "listen":
        print(json.dumps({"listening": True}), flush=True)
        outcome: dict[str, object] = {} if got.wait(60) else {"error": "no N-EVENT-REPORT"}
        if server is not None:
            server.shutdown()
        outcome.update(report)
        print(json.dumps(outcome))
        return 0
    ae = AE(ae_title=scu_ae)
    ae.add_requested_context(StorageCommitmentPushModel)
    # ``away`` takes no report at all: without a handler pynetdicom answers one with
    # 0x0110. Bound, a report the receiver sent before this SCU's release left was
    # taken on a loaded machine (CI), and the test found it delivered, not owed.
    handlers: list[Any] = [] if mode == "away" else [(evt.EVT_N_EVENT_REPORT, on_report)]
    assoc = ae.associate("127.0.0.1", int(port), ae_title="PACSLAB", evt_handlers=handlers)
    if not assoc.is_established:
        print(json.dumps({"error": "association refused"}))
        return 1
    ds = Dataset()
    ds.TransactionUID = spec["transaction"]
    items = []
    for sop_class, uid in spec["references"]:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = uid
        items.append(item)
    if items:
        ds.ReferencedSOPSequence = items
    status, _ = assoc.send_n_action(ds, int(spec.get("action", 1)), StorageCommitmentPushModel,
                                    StorageCommitmentPushModelInstance)
    result: dict[str, object] = {"status": int(status.Status) if status else None}
    if mode in ("new", "away"):
        assoc.release()  # at once: the report has to come on a new association
    if mode == "away":
        print(json.dumps(result))
        return 0
    if result["status"] == 0 and not got.wait(30):
        result["error"] = "no N-EVENT-REPORT"
    if mode == "same" and assoc.is_established:
        assoc.release()
    if server is not None:
        server.shutdown()
    result.update(report)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
