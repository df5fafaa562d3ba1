"""Retention classes: how long a study or result must be kept, as pure rules.

Circular 13/2025/TT-BYT keeps ordinary medical records 10 years, some (e.g. mental
health, occupational accidents) 20, and records of a patient who died 30. Rules come
from :class:`core.settings.RetentionSettings`; every condition of a rule must hold
and the longest matching period wins (keeping longer is always lawful, shorter never).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date

from core.errors import RetentionError
from core.settings import RetentionRule, RetentionSettings

__all__ = ["RetentionDecision", "RetentionFacts", "add_years", "check_deletable", "decide"]


@dataclass(frozen=True, slots=True)
class RetentionFacts:
    """What the rules may look at, for one study or result."""

    kind: str  # study | result
    reference_date: date
    modalities: frozenset[str] = field(default_factory=frozenset)
    departments: frozenset[str] = field(default_factory=frozenset)
    codes: frozenset[str] = field(default_factory=frozenset)
    deceased: bool = False


@dataclass(frozen=True, slots=True)
class RetentionDecision:
    years: int
    rule: str
    expires_on: date


def add_years(start: date, years: int) -> date:
    """``start`` plus whole years; 29 February becomes 28 February in common years."""
    try:
        return start.replace(year=start.year + years)
    except ValueError:
        return start.replace(year=start.year + years, day=28)


def _matches(rule: RetentionRule, facts: RetentionFacts) -> bool:
    def hit(wanted: Iterable[str], have: frozenset[str]) -> bool:
        wanted = {w.upper() for w in wanted}
        return not wanted or bool(wanted & {h.upper() for h in have})

    return (
        rule.kind in ("any", facts.kind)
        and hit(rule.modality, facts.modalities)
        and hit(rule.department, facts.departments)
        and hit(rule.code, facts.codes)
        and (rule.deceased is None or rule.deceased == facts.deceased)
    )


def decide(facts: RetentionFacts, settings: RetentionSettings) -> RetentionDecision:
    """The retention period for ``facts``: the longest matching rule, else the default."""
    years, name = settings.default_years, "default"
    for i, rule in enumerate(settings.rules):
        if _matches(rule, facts) and rule.years > years:
            years, name = rule.years, rule.name or f"rule {i + 1}"
    return RetentionDecision(years, name, add_years(facts.reference_date, years))


def check_deletable(what: str, expires_on: date | None, today: date) -> None:
    """Raise :class:`RetentionError` unless ``what``'s retention has ended by ``today``."""
    if expires_on is None:
        raise RetentionError(f"{what} has no retention class: it cannot be deleted")
    if today < expires_on:
        raise RetentionError(f"{what} must be kept until {expires_on.isoformat()}")
