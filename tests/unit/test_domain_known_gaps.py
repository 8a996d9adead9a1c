"""Where the code departs from DOMAIN.md today (audit findings), pinned as strict xfails:
each starts to pass once fixed, and strict=True then fails the suite so the marker goes."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from rules_factories import Run, purchase, state_with

SH = ZoneInfo("Asia/Shanghai")
# 17:00 UTC on 28 February 2023 is 01:00 on 1 March in Shanghai.
INSTANT = datetime(2023, 2, 28, 17, 0, tzinfo=UTC)


@pytest.mark.xfail(strict=True, reason="months are added in the producer's UTC offset")
def test_a_tier_is_kept_12_shanghai_calendar_months_whatever_the_events_offset() -> None:
    until: dict[str, datetime | None] = {}
    for label, at in (("utc", INSTANT), ("shanghai", INSTANT.astimezone(SH))):
        run = Run()
        run.states["m-1"] = state_with(first_purchase_done=True)
        run.feed(purchase(amount=10000, at=at))
        until[label] = run.state().tier_valid_until
    assert until["utc"] == until["shanghai"] == datetime(2024, 3, 1, 1, 0, tzinfo=SH)
