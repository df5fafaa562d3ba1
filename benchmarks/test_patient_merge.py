"""Time from a patient merge (IHE PIR A40 / FHIR $merge, issue 17) to every answer showing it.

A patient with ``studies`` studies (2 with --benchmark-disable, 200 when measuring),
as many worklist orders and lab results as studies, is merged into another patient
through :class:`services.patients.PatientIdentityService` (what the ADT reader and the
FHIR route call), then undone, round after round. The merge is one transaction: once
``apply`` returns, the Q/R and QIDO-RS study query (:meth:`SqlIndex.find`), the
worklist's order query and the lab results all show the surviving patient, which each
round checks. The anchor beside it is one study query by Patient ID on the same index
(what a C-FIND or QIDO-RS asking "did it merge?" costs).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select

from benchmarks.support import Goal, benchmarks_enabled, quick, record
from core.patients import MergePatients, PatientRef
from core.settings import Settings
from services.patients import PatientIdentityService
from storage.index.queries import Match, Query
from storage.index.schema import (
    lab_files,
    lab_reports,
    lab_results,
    orders,
    patients,
    series,
    studies,
)
from storage.index.sql import SqlIndex


def _fill(index: SqlIndex, n: int) -> None:
    now = datetime.now(UTC)
    with index.write() as conn:
        old = conn.execute(
            patients.insert()
            .values(patient_id="OLD", issuer="", name="A^B", name_key="a^b", updated_at=now)
            .returning(patients.c.id)
        ).scalar_one()
        conn.execute(
            patients.insert().values(
                patient_id="NEW", issuer="", name="C^D", name_key="c^d", updated_at=now
            )
        )
        conn.execute(
            studies.insert(),
            [
                {
                    "study_instance_uid": f"1.2.3.{i}",
                    "patient_pk": old,
                    "created_at": now,
                    "updated_at": now,
                }
                for i in range(n)
            ],
        )
        # Each study with a series holding a current instance, as a received one has
        # (a study without one is hidden, storage/index/queries.py _visible).
        pks = conn.execute(
            select(studies.c.id).where(studies.c.patient_pk == old).order_by(studies.c.id)
        ).scalars()
        conn.execute(
            series.insert(),
            [
                {"series_instance_uid": f"1.2.3.{pk}.1", "study_pk": pk, "updated_at": now,
                 "num_instances": 1}
                for pk in pks
            ],
        )
        item = {
            "patient": {"id": "OLD", "issuer": "", "name": "A^B", "birth_date": None, "sex": ""},
            "order": {},
            "steps": [],
        }
        conn.execute(
            orders.insert(),
            [
                {
                    "public_id": f"o{i}",
                    "accession_number": f"A{i}",
                    "status": "SCHEDULED",
                    "version": 1,
                    "patient_id": "OLD",
                    "issuer": "",
                    "patient_name": "A^B",
                    "item_json": json.dumps(item),
                    "created_at": now,
                    "updated_at": now,
                }
                for i in range(n)
            ],
        )
        file_pk = conn.execute(
            lab_files.insert()
            .values(
                sha256="0" * 64,
                name="f",
                profile="auto",
                format="hl7",
                status="filed",
                message_count=1,
                result_count=n,
                received_at=now,
            )
            .returning(lab_files.c.id)
        ).scalar_one()
        report = conn.execute(
            lab_reports.insert()
            .values(
                report_id="r",
                patient_id="OLD",
                patient_pk=old,
                is_qc=False,
                unmatched=True,
                created_at=now,
                updated_at=now,
            )
            .returning(lab_reports.c.id)
        ).scalar_one()
        conn.execute(
            lab_results.insert(),
            [
                {
                    "observation_id": f"obs{i}",
                    "version": 1,
                    "is_current": True,
                    "file_pk": file_pk,
                    "report_pk": report,
                    "message_index": 0,
                    "position": i,
                    "test_code": "X",
                    "is_qc": False,
                    "patient_id": "OLD",
                    "patient_pk": old,
                    "is_critical": False,
                    "unmatched": True,
                    "created_at": now,
                    "updated_at": now,
                }
                for i in range(n)
            ],
        )


@pytest.fixture
def service(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[PatientIdentityService, SqlIndex, int]]:
    for key in [k for k in os.environ if k.startswith("PACSLAB_")]:
        monkeypatch.delenv(key)
    n = 200 if benchmarks_enabled(request.config) and not quick() else 2
    settings = Settings(data_dir=tmp_path / "data", auth={"enabled": False})
    index = SqlIndex(settings.index)
    _fill(index, n)
    try:
        yield PatientIdentityService(index), index, n
    finally:
        index.close()


def _shows(index: SqlIndex, patient_id: str, n: int) -> bool:
    found = index.find(Query(level="study", matches=(Match("PatientID", patient_id),)))
    with index.read() as conn:
        moved_orders = conn.execute(
            select(func.count()).select_from(orders).where(orders.c.patient_id == patient_id)
        ).scalar_one()
        moved_lab = conn.execute(
            select(func.count())
            .select_from(lab_results)
            .where(lab_results.c.patient_id == patient_id)
        ).scalar_one()
    return len(found) == n and moved_orders == n and moved_lab == n


def test_merge_to_visible(
    service: tuple[PatientIdentityService, SqlIndex, int], request: pytest.FixtureRequest
) -> None:
    svc, index, n = service
    rounds = 20 if benchmarks_enabled(request.config) and not quick() else 2
    merge_ms: list[float] = []
    undo_ms: list[float] = []
    query_ms: list[float] = []
    command = MergePatients(surviving=PatientRef("NEW"), obsolete=PatientRef("OLD"))
    for _ in range(rounds):
        t0 = time.perf_counter()
        change = svc.apply(command, source="bench", agent="bench")
        assert _shows(index, "NEW", n)  # every store answers with the survivor
        merge_ms.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        index.find(Query(level="study", matches=(Match("PatientID", "NEW"),)))
        query_ms.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        svc.undo(change.change_id, source="bench", agent="bench")
        assert _shows(index, "OLD", n)
        undo_ms.append((time.perf_counter() - t0) * 1000)
    case = f"patient merge to visible everywhere ({n} studies, orders, lab results), median ms"
    record(
        case,
        "pacslab merge",
        statistics.median(merge_ms),
        "ms",
        samples=merge_ms,
        goal=Goal("<", 1000.0),
    )
    record(case, "pacslab undo", statistics.median(undo_ms), "ms", samples=undo_ms)
    record(
        case,
        "anchor: one study query by Patient ID",
        statistics.median(query_ms),
        "ms",
        samples=query_ms,
    )
