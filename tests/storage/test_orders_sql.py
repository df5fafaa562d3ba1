"""Migration 0002 both ways, and webhook notices (queued with the version, never blocking)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import date, datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from sqlalchemy import create_engine, inspect

from core.orders import Order, OrderAction, Patient, PlacedOrder, ScheduledProcedureStep, SpsStatus
from core.settings import Settings
from pacslab.wiring import build_index, build_order_service
from pacslab.worker_process import build_worker
from storage.index.migrate import upgrade

ORDER_TABLES = {"orders", "order_versions", "scheduled_steps", "mpps", "study_links"}


def test_migration_0002_up_down_up(tmp_path: Path) -> None:
    from alembic import command

    from storage.index.migrate import alembic_config

    engine = create_engine(f"sqlite:///{tmp_path}/m.db")
    upgrade(engine, "0001")
    assert not ORDER_TABLES & set(inspect(engine).get_table_names())
    upgrade(engine, "0002")
    names = set(inspect(engine).get_table_names())
    assert names >= ORDER_TABLES
    indexes = {i["name"] for i in inspect(engine).get_indexes("scheduled_steps")}
    assert {
        "ix_sps_station_start",
        "ix_sps_modality_start",
        "ix_sps_start",
        "ix_sps_offered_start",
    } <= indexes
    cfg = alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0001")
    assert not ORDER_TABLES & set(inspect(engine).get_table_names())
    upgrade(engine)
    assert set(inspect(engine).get_table_names()) >= ORDER_TABLES


class _Hook(BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]] = []
    fail = False

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if type(self).fail:
            self.send_response(503)
        else:
            type(self).received.append(json.loads(body))
            self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        return None


@pytest.fixture
def hook() -> Iterator[tuple[str, type[_Hook]]]:
    class Hook(_Hook):
        received: ClassVar[list[dict[str, Any]]] = []
        fail = False

    server = HTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", Hook
    server.shutdown()


def _placed() -> PlacedOrder:
    return PlacedOrder(
        OrderAction.NEW,
        "W1",
        Patient("NGUYỄN^VĂN AN", "PW1", birth_date=date(1980, 1, 2)),
        Order("", ""),
        (ScheduledProcedureStep("", "CT1", "CT", datetime(2026, 11, 25, 9, 0)),),
        source="test",
    )


@pytest.mark.network
def test_webhook_posts_status_changes_and_retries(settings: Settings, hook: Any) -> None:
    url, Hook = hook
    settings = settings.model_copy(
        update={"orders": settings.orders.model_copy(update={"webhook_url": url})}
    )
    index = build_index(settings, migrate=True)
    service = build_order_service(settings, index)
    rec = service.place(_placed())
    Hook.fail = True  # the record system is down: the order flow does not wait
    service.step_status(
        accession=rec.accession_number, procedure_id="", step_id="", status=SpsStatus.STARTED
    )
    worker = build_worker(settings)
    worker.run_once()
    jobs = {j.target: j for j in index.get_jobs() if j.kind == "webhook"}
    assert jobs[f"{rec.id}:1"].status == "pending" and "503" in jobs[f"{rec.id}:1"].error
    Hook.fail = False
    index.engine.dispose()
    with index.write() as conn:  # skip the back-off wait
        from sqlalchemy import update

        from storage.index.schema import jobs as jobs_table

        conn.execute(update(jobs_table).values(not_before=0))
    while worker.run_once():  # a retried job is claimed on its own, then the rest
        pass
    assert [(n["versionId"], n["status"], n["procedureStatus"]) for n in Hook.received] == [
        ("1", "active", "scheduled"),
        ("2", "active", "in-progress"),
    ]
    assert "NGUY" not in json.dumps(Hook.received)  # no patient data in notices
    worker.index.close()
    index.close()
