"""Retention classes: rules, the expiry report and refused early deletion (issue 7 §4)."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest

from core.errors import RetentionError
from core.retention import RetentionFacts, add_years, decide
from core.settings import RetentionRule, RetentionSettings, Settings

RULES = RetentionSettings(rules=[
    RetentionRule(years=30, deceased=True, name="deceased"),
    RetentionRule(years=20, kind="result", code=["F32"], name="mental health"),
    RetentionRule(years=20, modality=["MG"], department=["Oncology"], name="screening"),
])


def test_rules_longest_match_wins() -> None:
    day = date(2026, 1, 15)
    assert decide(RetentionFacts("study", day, modalities=frozenset({"CT"})), RULES).years == 10
    assert decide(RetentionFacts("result", day, codes=frozenset({"F32"})), RULES).rule == \
        "mental health"
    assert decide(RetentionFacts("study", day, codes=frozenset({"F32"})), RULES).years == 10
    mg = RetentionFacts("study", day, modalities=frozenset({"MG"}),
                        departments=frozenset({"oncology"}))
    assert decide(mg, RULES).years == 20
    dead = RetentionFacts("result", day, codes=frozenset({"F32"}), deceased=True)
    decision = decide(dead, RULES)
    assert (decision.years, decision.rule, decision.expires_on) == (30, "deceased",
                                                                    date(2056, 1, 15))


def test_leap_day() -> None:
    assert add_years(date(2024, 2, 29), 10) == date(2034, 2, 28)


@pytest.mark.network
def test_study_deletion_refused_before_expiry_and_reported_after(receiver,
                                                                 tmp_path: Path) -> None:
    from core.synthetic import write_ct_series
    from storage.originals import FileOriginalStore
    from storage.retention import RetentionStore
    from tests.support import run_dcmtk

    files = write_ct_series(tmp_path / "ct", slices=3, rows=16, columns=16)
    assert run_dcmtk(["storescu", "+sd", "127.0.0.1", str(receiver.port),
                      str(tmp_path / "ct")], nodelay=True).returncode == 0
    settings: Settings = receiver.settings
    store = RetentionStore(receiver.index.engine, settings.retention)
    assert store.assign_studies() == 1
    (row,) = store.all()
    assert row.years == 10 and row.target_kind == "study"
    ref = date.fromisoformat(row.reference_date)
    assert settings.storage.originals_dir is not None
    originals = FileOriginalStore(settings.storage.originals_dir)
    with pytest.raises(RetentionError):
        store.delete_study(row.target_id, ref, originals)
    assert store.expired(add_years(ref, 9)) == []
    assert [r.target_id for r in store.expired(add_years(ref, 10))] == [row.target_id]
    with pytest.raises(RetentionError):  # no class, no deletion
        store.check_delete("study", "1.2.3.unknown", date(2100, 1, 1))
    assert store.delete_study(row.target_id, add_years(ref, 10), originals) == len(files)
    assert receiver.index.counts()["instances"] == 0  # type: ignore[attr-defined]
    assert list(settings.storage.originals_dir.rglob("*.dcm")) == []
