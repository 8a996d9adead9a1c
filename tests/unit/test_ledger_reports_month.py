"""The dashboard's "points expiring next month" is the calendar month after now's, in the
rule set's zone (Asia/Shanghai by default), whatever offset `now` is given in."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from services.ledger.reports import next_month

SH = ZoneInfo("Asia/Shanghai")


def test_next_month_follows_the_shanghai_calendar_at_a_utc_month_end() -> None:
    # 17:00 UTC on 31 January is already 1 February in Shanghai: next month is March.
    start, end = next_month(datetime(2026, 1, 31, 17, 0, tzinfo=UTC), SH)
    assert start == datetime(2026, 3, 1, tzinfo=SH)
    assert end == datetime(2026, 4, 1, tzinfo=SH)


def test_next_month_of_december_is_january_of_the_next_year() -> None:
    start, end = next_month(datetime(2026, 12, 15, 9, 0, tzinfo=SH), SH)
    assert (start, end) == (datetime(2027, 1, 1, tzinfo=SH), datetime(2027, 2, 1, tzinfo=SH))
