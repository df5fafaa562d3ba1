"""Migration 0014_pir_change_patients (issue 21): the link table as
storage/index/pir_tables.py declares it, up, down, up; and the backfill of a change log
written before it, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from core.settings import IndexSettings
from services.patients import PatientIdentityService
from storage.index.migrate import upgrade
from storage.index.pir_tables import patient_change_patients, patient_changes
from storage.index.sql import SqlIndex
from tests.storage.migration_checks import (
    assert_table_migration,
    empty_index_url,
    on_both_backends,
)

T0 = datetime(2026, 12, 1, tzinfo=UTC)


def test_migration_0014_matches_the_table_and_goes_down(tmp_path: Path) -> None:
    assert_table_migration(tmp_path, "0014_pir_change_patients", "0013_pir_jobs_kind_pattern",
                           patient_change_patients, patient_changes)


def _rows(
    patients: list[list[Any]] | None = None,
    created: list[int] | None = None,
    link: list[int] | None = None,
    relinked: list[int] | None = None,
) -> str:
    """``rows_json`` as storage/index/patients.py ``_commit`` writes it."""
    return json.dumps(
        {
            "rows": {"patients": patients} if patients else {},
            "created": created or [],
            "link": link,
            "relinked": relinked or [],
        }
    )


def _text(pks: list[int]) -> str:
    return ("," + ",".join(map(str, pks)) + ",")[:255]


@on_both_backends
def test_migration_0014_backfills_the_change_log(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = empty_index_url(backend, tmp_path, request)
    index = SqlIndex(IndexSettings(url=url, migrate=False))
    try:
        upgrade(index.engine, "0013_pir_jobs_kind_pattern")
        many = [1_000_000 + i for i in range(45)]  # 8 characters each: cut after 31
        cut = _text(many)
        assert len(cut) == 255 and not cut.endswith(",")  # ends in part of a pk
        logged = [
            # an update of one row
            ("c1", ",5,", _rows(patients=[[5, {"name": "A"}, {"name": "B"}]]), "", ""),
            # a merge into a patient it created (6 into 7)
            ("c2", ",7,6,", _rows(created=[7], link=[6, 7]), "", ""),
            # a change whose text was cut: rows_json names the rest (link, relinked)
            ("c3", cut, _rows(link=[many[1], many[0]], relinked=many[2:]), "", "c4"),
            # its undo: the rows_json of an undo names no rows, the undone change does
            ("c4", cut, _rows(), "c3", ""),
        ]
        with index.engine.begin() as conn:
            conn.execute(
                patient_changes.insert(),
                [
                    {
                        "change_id": cid,
                        "kind": "undo" if undoes else "merge",
                        "patient_pks": text,
                        "rows_json": rows,
                        "undoes": undoes,
                        "undone_by": undone_by,
                        "created_at": T0,
                    }
                    for cid, text, rows, undoes, undone_by in logged
                ],
            )
        upgrade(index.engine)
        with index.engine.connect() as conn:
            found = conn.execute(
                select(patient_changes.c.change_id, patient_change_patients.c.patient_pk)
                .select_from(
                    patient_change_patients.join(
                        patient_changes, patient_changes.c.id == patient_change_patients.c.change_pk
                    )
                )
                .order_by(patient_changes.c.id, patient_change_patients.c.position)
            ).all()
        by_change: dict[str, list[int]] = {}
        for cid, pk in found:
            by_change.setdefault(cid, []).append(int(pk))
        # The text's whole pks first, in its order, then what rows_json adds; the
        # broken-off piece of the cut text (1000031's first characters) is no pk.
        assert by_change == {"c1": [5], "c2": [7, 6], "c3": many, "c4": many}
        svc = PatientIdentityService(index, default_issuer="HOSP")
        assert [svc.version(pk) for pk in (5, 6, 7, many[0], many[-1], 10**9)] == [
            2, 2, 2, 3, 3, 1,
        ]  # fmt: skip
        assert [c.change_id for c in svc.changes(patient_pk=many[-1])] == ["c4", "c3"]
        assert svc.change("c3").patient_pks == tuple(many)
    finally:
        index.close()
