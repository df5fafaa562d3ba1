"""ATNA: what sending every action-log entry to a syslog collector costs (issue 17.5).

Two figures, each beside its anchor measured in the same run:

* the cost on the request path — one ``AuditLog.record()`` call (what a C-STORE, a
  QIDO query or a login pays) with ATNA over TLS to a live Debian ``rsyslogd``, beside
  the same call with ATNA off (the anchor);
* delivery — entries per second from the first ``record()`` until rsyslog has
  written all of them (A.5.1 XML built, RFC 5425 TLS framed, received), beside the
  hash-chained log's own write rate for the same entries (the anchor).

A normal run is a smoke run with a few hundred entries; ``--benchmark-enable``
measures with 5,000.
"""

from __future__ import annotations

import time
from pathlib import Path

from pytest_benchmark.fixture import BenchmarkFixture

from benchmarks.support import Goal, record
from core.audit import AuditEntry
from core.settings import AtnaSettings, Settings
from storage.audit import AuditLog
from storage.index.sql import SqlIndex
from tests.security.rsyslog_peer import rsyslog
from tests.support import wait_until


def _entries(n: int) -> list[AuditEntry]:
    return [
        AuditEntry(
            action="C",
            event_type="dicom.c-store",
            outcome="0",
            agent="MODALITY1",
            agent_type="ae",
            source="10.0.0.7",
            resource=f"Instance/1.2.3.{i}",
            patient_key="0123456789abcdef0123456789abcdef",
            detail=AuditEntry.details(
                {"sop_class_uid": "1.2.840.10008.5.1.4.1.1.2", "study_instance_uid": "1.2.3"}
            ),
        )
        for i in range(n)
    ]


def _log(settings: Settings, atna: AtnaSettings | None) -> tuple[SqlIndex, AuditLog]:
    from pacslab.wiring import build_index

    index = build_index(settings, migrate=True)
    audit = settings.audit.model_copy(
        update={"atna": atna or AtnaSettings(), "max_pending": 1_000_000}
    )
    return index, AuditLog(index.engine, audit, url=index.url)


def test_atna_cost_and_delivery(
    benchmark: BenchmarkFixture, measuring: bool, tmp_path: Path
) -> None:
    n = 5000 if measuring else 300
    entries = _entries(n)
    base = Settings(data_dir=tmp_path / "off", auth={"enabled": False})
    with rsyslog("tls", tmp_path / "rsyslog") as c:
        assert c.pki is not None
        atna = AtnaSettings(
            url=c.url,
            ca_file=c.pki.ca,
            client_cert=c.pki.client_cert,
            client_key=c.pki.client_key,
            queue_max=n + 10,
        )
        # anchor: ATNA off
        index, off = _log(base, None)
        t0 = time.perf_counter()
        for e in entries:
            off.record(e)
        record_off = (time.perf_counter() - t0) / n
        assert off.flush(timeout=120)
        chain_rate = n / (time.perf_counter() - t0)
        off.close()
        index.close()
        # pacslab with ATNA over TLS
        on_settings = Settings(data_dir=tmp_path / "on", auth={"enabled": False})
        index, on = _log(on_settings, atna)

        def run() -> tuple[float, float]:
            t0 = time.perf_counter()
            for e in entries:
                on.record(e)
            per_call = (time.perf_counter() - t0) / n
            wait_until(
                lambda: len(c.messages()) >= n,
                timeout=300,
                message=lambda: f"{len(c.messages())}/{n} received",
            )
            return per_call, n / (time.perf_counter() - t0)

        record_on, delivered = benchmark.pedantic(run, rounds=1, iterations=1)  # type: ignore[no-untyped-call]
        assert on.atna is not None and on.atna.dropped == 0
        on.close()
        index.close()
    benchmark.extra_info.update(
        {
            "record_us_atna_tls": round(record_on * 1e6, 2),
            "record_us_atna_off": round(record_off * 1e6, 2),
            "atna_delivered_per_s": round(delivered),
            "chain_written_per_s": round(chain_rate),
            "entries": n,
        }
    )
    print(
        f"record(): {record_on * 1e6:.1f} µs with ATNA/TLS, {record_off * 1e6:.1f} µs "
        f"without; delivered {delivered:,.0f}/s to rsyslog, chain {chain_rate:,.0f}/s"
    )
    record(
        "audit record() per entry, µs",
        "pacslab (ATNA over TLS)",
        record_on * 1e6,
        "µs",
        goal=Goal("<=", 3.0, on="ratio", anchor="pacslab (ATNA off)"),
    )
    record("audit record() per entry, µs", "pacslab (ATNA off)", record_off * 1e6, "µs")
    record(
        "audit entries delivered, entries/s",
        "pacslab ATNA to rsyslog (TLS)",
        delivered,
        "entries/s",
    )
    record(
        "audit entries delivered, entries/s", "hash-chained log (SQLite)", chain_rate, "entries/s"
    )
