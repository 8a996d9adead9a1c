"""Boundaries of the ledger's accounting that no other unit test pinned (found by moving
each one: mutation testing by hand). Each test fails when its boundary moves."""

from __future__ import annotations

from datetime import timedelta

from rules_factories import T0

from services.ledger import accounting as acc


def test_a11_a_deduction_of_exactly_the_spendable_balance_is_allowed() -> None:
    """accounting.py `need > balance`: only a deduction *larger* than spendable is refused."""
    book, _ = acc.apply(
        acc.Book(member_id="m"),
        acc.Earn(
            entry_id="e1",
            points=600,
            occurred_at=T0,
            rule_id="base",
            ruleset_version="v",
            source_event_id="s1",
        ),
    )
    book, entries = acc.apply(
        book,
        acc.Adjust(
            entry_id="a1",
            points=-600,
            at=T0 + timedelta(hours=1),
            reason="fraud",
            operator="ops-1",
            adjustment_id="adj-1",
        ),
    )
    assert entries[0].points == -600
    assert entries[0].debt_delta == 0
    assert acc.available(book, T0 + timedelta(hours=1)) == 0
    assert book.debt == 0


def test_a18_points_are_warned_30_and_7_days_before_they_expire() -> None:
    """DOMAIN: "warned 30 days and 7 days before"; only an integration test held it."""
    assert acc.WARNING_DAYS == (30, 7)
