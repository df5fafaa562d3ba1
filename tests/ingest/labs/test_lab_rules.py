"""Pure rules of the lab inbox: completion, naming, series keys, critical values, profiles."""

from __future__ import annotations

from datetime import datetime

import pytest

from core.errors import LabMessageError
from core.labs import Coding, LabObservation
from core.settings import LabCriticalLimit, LabProfileSettings, LabSettings, Settings
from ingest.labs.inbox import Stability, filed_name, is_candidate
from ingest.labs.profiles import InboxProfile, parse_file, parse_profile
from services.lab_results import critical_reason, report_key, series_key


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("r.hl7", True),
        ("R.ASTM", True),
        ("r.hl7.tmp", False),
        ("r.hl7.PART", False),
        (".hidden", False),
        ("~$lock", False),
        ("x.summary.json", False),
        ("x.error.json", False),
    ],
)
def test_candidate_names(name: str, expected: bool) -> None:
    assert is_candidate(name) is expected


def test_stability_waits_for_quiet_size_and_mtime() -> None:
    s = Stability(stable_s=1.0)
    wall = 1_000.0
    fresh = int(wall * 1e9)
    assert not s.observe("a", size=10, mtime_ns=fresh, wall=wall, mono=0.0)
    assert not s.observe("a", size=20, mtime_ns=fresh + 1, wall=wall + 0.5, mono=0.5)  # grew
    assert not s.observe("a", size=20, mtime_ns=fresh + 1, wall=wall + 1.2, mono=1.2)
    assert s.observe("a", size=20, mtime_ns=fresh + 1, wall=wall + 1.6, mono=1.6)


def test_stability_accepts_an_old_file_at_once_and_a_renamed_one() -> None:
    s = Stability(stable_s=1.0)
    assert s.observe("old", size=5, mtime_ns=int(990 * 1e9), wall=1_000.0, mono=0.0)
    s.renamed("new")
    assert s.observe("new", size=5, mtime_ns=int(1_000 * 1e9), wall=1_000.0, mono=0.0)
    s.forget("new")
    assert not s.observe("new", size=5, mtime_ns=int(1_000 * 1e9), wall=1_000.0, mono=0.0)


def test_filed_name_keeps_both_files() -> None:
    taken = {"r.hl7", "noext"}
    assert filed_name("s.hl7", "ab" * 32, taken.__contains__) == "s.hl7"
    assert filed_name("r.hl7", "ab" * 32, taken.__contains__) == "r.abababab.hl7"
    assert filed_name("noext", "cd" * 32, taken.__contains__) == "noext.cdcdcdcd"


def _obs(**kw: object) -> LabObservation:
    base: dict[str, object] = {"where": "x", "test": Coding("K", "Potassium", "local")}
    base.update(kw)
    return LabObservation(**base)  # type: ignore[arg-type]


def test_series_key_separates_result_kinds_and_qc_runs() -> None:
    f = _obs(test_raw="^^^580^A^UNDILUTED^F")
    i = _obs(test_raw="^^^580^A^UNDILUTED^I")
    args = {"sample": "S1", "occurrence": 0, "file_sha256": "h", "position": 0}
    assert series_key(f, fmt="astm", **args) != series_key(i, fmt="astm", **args)  # type: ignore[arg-type]
    assert series_key(f, fmt="hl7v2", **args) == series_key(i, fmt="hl7v2", **args)  # type: ignore[arg-type]
    qc1 = _obs(is_qc=True, performed_at=datetime(2024, 3, 15, 8, 0))
    qc2 = _obs(is_qc=True, performed_at=datetime(2024, 3, 16, 8, 0))
    assert series_key(qc1, fmt="astm", **args) != series_key(qc2, fmt="astm", **args)  # type: ignore[arg-type]
    no_sample = {**args, "sample": ""}
    assert series_key(f, fmt="astm", **no_sample).startswith("file|h|0")  # type: ignore[arg-type]


def test_report_key_prefers_the_order() -> None:
    assert (
        report_key(is_qc=False, sample="S", placer="P", filler="F", fallback="x") == "pt|placer|P"
    )
    assert report_key(is_qc=False, sample="S", placer="", filler="F", fallback="x") == "pt|filler|F"
    assert report_key(is_qc=True, sample="S", placer="", filler="", fallback="x") == "qc|specimen|S"
    assert report_key(is_qc=False, sample="", placer="", filler="", fallback="x") == "pt|x"


@pytest.mark.parametrize(
    ("value", "comparator", "flags", "reason"),
    [
        (6.5, None, (), "above critical high 6.2"),
        (6.2, None, (), ""),
        (2.0, None, (), "below critical low 2.8"),
        (7.0, ">", (), "above critical high 6.2"),
        (7.0, "<", (), ""),  # "<7" may be normal
        (2.5, "<", (), "below critical low 2.8"),
        (4.0, None, ("HH",), "flag HH"),
        (None, None, (), ""),
    ],
)
def test_critical_reason(
    value: float | None, comparator: str | None, flags: tuple[str, ...], reason: str
) -> None:
    limits = {"2823-3": LabCriticalLimit(low=2.8, high=6.2)}
    obs = _obs(
        test=Coding("K", "Potassium", "L"),
        test_alternates=(Coding("2823-3", "", "LN"),),
        value=value,
        comparator=comparator,
        flags=flags,
    )
    assert critical_reason(obs, limits) == reason
    assert critical_reason(_obs(value=value, flags=flags, is_qc=True), limits) == ""


def test_profile_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="unknown format 'sysmex'"):
        parse_profile("x", LabProfileSettings(format="sysmex"))
    with pytest.raises(ValueError, match="unknown encoding"):
        parse_profile("x", LabProfileSettings(encoding="klingon"))
    with pytest.raises(ValueError, match="iff format=delimited"):
        LabProfileSettings(format="delimited")
    with pytest.raises(ValueError, match="cannot be an inbox folder name"):
        LabSettings(profiles={"processed": LabProfileSettings()})
    with pytest.raises(ValueError, match="IANA"):
        LabSettings(local_timezone="Mars/Olympus")
    assert set(LabSettings(profiles={"x": LabProfileSettings()}).profiles) == {"x", "auto"}


def test_lab_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACSLAB_LAB__CRITICAL", '{"2823-3": {"low": 2.8, "high": 6.2}}')
    monkeypatch.setenv("PACSLAB_LAB__PROFILES", '{"cobas": {"format": "cobas_c111"}}')
    monkeypatch.setenv("PACSLAB_LAB__CRITICAL_WEBHOOK_URL", "http://127.0.0.1:1/x")
    lab = Settings().lab
    assert lab.critical["2823-3"].high == 6.2
    assert set(lab.profiles) == {"cobas", "auto"}


def test_astm_falls_back_to_latin1_only_for_undecodable_bytes() -> None:
    raw = "H|\\^&|||A\rP|1||P1||Müller\rO|1|S1\rR|1|^^^K|4.0\rL|1\r".encode("latin-1")
    fmt, result = parse_file(raw, InboxProfile(name="auto"))
    assert fmt == "astm" and result.messages[0].patients[0].name == "Müller"
    utf8 = raw.decode("latin-1").encode("utf-8")
    assert parse_file(utf8, InboxProfile(name="auto"))[1].messages[0].patients[0].name == "Müller"
    with pytest.raises(LabMessageError, match="not valid ascii"):
        parse_file(raw, InboxProfile(name="a", format="astm", encoding="ascii"))
