"""The daily report's days are the dates of the rule set's calendar that the period
touches, every one of them, and one request charts at most a (leap) year."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from services.ledger.reports import MAX_DAYS, Flows, local_days

SH = ZoneInfo("Asia/Shanghai")


def test_days_follow_the_shanghai_calendar_not_utcs() -> None:
    # 15:30Z and 16:30Z on 20 November are 23:30 that day and 00:30 the next in Shanghai.
    days = local_days(
        datetime(2026, 11, 20, 15, 30, tzinfo=UTC), datetime(2026, 11, 20, 16, 31, tzinfo=UTC), SH
    )
    assert days == [date(2026, 11, 20), date(2026, 11, 21)]


def test_an_end_at_midnight_does_not_add_that_day_and_an_empty_period_has_none() -> None:
    start, end = datetime(2026, 11, 1, tzinfo=SH), datetime(2026, 12, 1, tzinfo=SH)
    days = local_days(start, end, SH)
    assert (days[0], days[-1], len(days)) == (date(2026, 11, 1), date(2026, 11, 30), 30)
    assert local_days(start, start, SH) == []


def test_a_leap_year_fits_and_a_day_more_is_refused() -> None:
    start = datetime(2028, 1, 1, tzinfo=SH)
    assert len(local_days(start, datetime(2029, 1, 1, tzinfo=SH), SH)) == MAX_DAYS == 366
    with pytest.raises(ValueError, match="touches 367 days in Asia/Shanghai, at most 366"):
        local_days(start, datetime(2029, 1, 1, 0, 0, 1, tzinfo=SH), SH)


def test_a_daylight_saving_year_from_midnight_to_midnight_fits() -> None:
    """These 366 days in New York are 366 x 24 hours and one more (two autumn changes, one
    spring one): the bound counts dates, not hours."""
    ny = ZoneInfo("America/New_York")
    start, end = datetime(2027, 11, 6, tzinfo=ny), datetime(2028, 11, 6, tzinfo=ny)
    assert end.astimezone(UTC) - start.astimezone(UTC) == timedelta(days=366, hours=1)
    assert len(local_days(start, end, ny)) == 366


def test_a_period_past_the_calendars_end_is_refused_not_a_crash() -> None:
    with pytest.raises(ValueError, match="outside the years 1 to 9999"):
        local_days(datetime(9999, 12, 31, tzinfo=UTC), datetime(9999, 12, 31, 23, tzinfo=UTC), SH)


def test_flows_count_what_left_as_positive_points_and_issued_per_rule() -> None:
    flows = Flows()
    for kind, rule, points in [("earn", "base", 500), ("earn", None, 20), ("redeem", None, -300),
                               ("expire", "base", -70), ("revoke", "base", -40),
                               ("adjust", None, -5)]:  # fmt: skip
        flows.add(kind, rule, points)
    assert flows.doc() == {
        "issued": 520, "redeemed": 300, "expired": 70, "revoked": 40, "adjusted": -5,
        "by_rule": {"base": 500, "unknown": 20},
    }  # fmt: skip
