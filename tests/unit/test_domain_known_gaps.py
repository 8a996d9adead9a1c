"""Where the code departs from DOMAIN.md today (audit findings), pinned as strict xfails:
each starts to pass once fixed, and strict=True then fails the suite so the marker goes."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from rules_factories import Run, purchase, state_with

from services.ledger.accounting import Book, Earn, apply

SH = ZoneInfo("Asia/Shanghai")
# 17:00 UTC on 28 February 2023 is 01:00 on 1 March in Shanghai.
INSTANT = datetime(2023, 2, 28, 17, 0, tzinfo=UTC)


def _lot_expiry(occurred_at: datetime) -> datetime | None:
    book = Book(member_id="m-1")
    _, [entry] = apply(
        book,
        Earn(entry_id="e1", points=100, occurred_at=occurred_at, rule_id="base",
             ruleset_version="2026.1", source_event_id="ev-1"),
    )  # fmt: skip
    return entry.expires_at


@pytest.mark.xfail(strict=True, reason="months are added in the producer's UTC offset")
def test_a_lot_expires_12_shanghai_calendar_months_later_whatever_the_events_offset() -> None:
    expected = datetime(2024, 3, 1, 1, 0, tzinfo=SH)
    assert _lot_expiry(INSTANT.astimezone(SH)) == expected
    assert _lot_expiry(INSTANT) == expected


@pytest.mark.xfail(strict=True, reason="months are added in the producer's UTC offset")
def test_a_tier_is_kept_12_shanghai_calendar_months_whatever_the_events_offset() -> None:
    until: dict[str, datetime | None] = {}
    for label, at in (("utc", INSTANT), ("shanghai", INSTANT.astimezone(SH))):
        run = Run()
        run.states["m-1"] = state_with(first_purchase_done=True)
        run.feed(purchase(amount=10000, at=at))
        until[label] = run.state().tier_valid_until
    assert until["utc"] == until["shanghai"] == datetime(2024, 3, 1, 1, 0, tzinfo=SH)
