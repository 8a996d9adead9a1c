"""DOMAIN.md edges no other test pins: tier thresholds from both sides, and the calendar
conventions (birthday month, daily cap) decided in Asia/Shanghai whatever offset the
producer stamped the event with."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from rules_factories import (
    CST,
    T0,
    Run,
    by_rule,
    purchase,
    review,
    share,
    state_with,
)


def _returning_member(**fields: object) -> Run:
    run = Run()
    run.states["m-1"] = state_with(first_purchase_done=True, **fields)
    return run


def test_spend_a_fen_short_of_silver_keeps_the_member_tier() -> None:
    run = _returning_member()
    run.feed(purchase(amount="9999.99"))
    assert run.state().tier == "member"
    later = run.feed(purchase(amount=100, at=T0 + timedelta(hours=1)))
    assert by_rule(later.grants) == {"base": 100}  # 10,099.99 now: the upgrade is for the next


def test_spend_a_fen_short_of_gold_stays_silver() -> None:
    run = _returning_member()
    run.feed(purchase(amount="29999.99"))
    assert run.state().tier == "silver"
    later = run.feed(purchase(amount=100, at=T0 + timedelta(hours=1)))
    assert by_rule(later.grants) == {"base": 120}
    assert run.state().tier == "gold"


def test_reaching_100000_makes_diamond_and_the_next_purchase_earns_double() -> None:
    run = _returning_member()
    crossing = run.feed(purchase(amount=100000))
    # Earned at the old (member) multiplier; the big-ticket bonus is not multiplied.
    assert by_rule(crossing.grants) == {"base": 100000, "big_ticket": 600}
    assert run.state().tier == "diamond"
    after = run.feed(purchase(amount=100, at=T0 + timedelta(hours=1)))
    assert by_rule(after.grants) == {"base": 200}


def test_birthday_month_is_the_shanghai_month_of_a_utc_stamped_purchase() -> None:
    # 16:30 UTC on 31 March is 00:30 on 1 April in Shanghai.
    at = datetime(2026, 3, 31, 16, 30, tzinfo=UTC)
    april = _returning_member(birthday="04-20").feed(purchase(amount=300, at=at))
    march = _returning_member(birthday="03-20").feed(purchase(amount=300, at=at))
    assert by_rule(april.grants) == {"base": 600}
    assert by_rule(march.grants) == {"base": 300}


def test_daily_engagement_cap_resets_at_shanghai_midnight_not_utc_midnight() -> None:
    evening = datetime(2026, 3, 2, 23, 0, tzinfo=CST)  # 15:00 UTC
    run = Run()
    run.feed(review(featured=True, at=evening), review(featured=True, at=evening))
    same_day = run.feed(share(at=evening + timedelta(minutes=50)))
    assert by_rule(same_day.grants) == {}  # the Shanghai day's 200 are used up
    # 00:30 in Shanghai is still 2 March in UTC: a new day's budget all the same.
    next_day = run.feed(share(at=evening + timedelta(hours=1, minutes=30)))
    assert by_rule(next_day.grants) == {"share": 100}


# 17:00 UTC on 28 February 2023 is 01:00 on 1 March in Shanghai.
INSTANT = datetime(2023, 2, 28, 17, 0, tzinfo=UTC)
SH = ZoneInfo("Asia/Shanghai")


def test_a_tier_is_kept_12_shanghai_calendar_months_whatever_the_events_offset() -> None:
    """Counted on UTC's calendar, 28 Feb 2023 + 12 months is 28 Feb 2024, 01:00 on 29 Feb
    in Shanghai: silver would lapse a day early, and a purchase that day earn x1."""
    until: dict[str, datetime | None] = {}
    for label, at in (("utc", INSTANT), ("shanghai", INSTANT.astimezone(SH))):
        run = Run()
        run.states["m-1"] = state_with(first_purchase_done=True)
        run.feed(purchase(amount=10000, at=at))
        until[label] = run.state().tier_valid_until
    assert until["utc"] == until["shanghai"] == datetime(2024, 3, 1, 1, 0, tzinfo=SH)


def test_a_silver_members_purchase_on_29_february_still_earns_the_silver_rate() -> None:
    run = Run()
    run.states["m-1"] = state_with(first_purchase_done=True)
    run.feed(purchase(amount=10000, at=INSTANT))  # silver from 01:00 on 1 March 2023, Shanghai
    noon = datetime(2024, 2, 29, 12, 0, tzinfo=SH).astimezone(UTC)
    assert by_rule(run.feed(purchase(amount=500, at=noon)).grants) == {"base": 600}


def test_a_purchase_a_year_late_counts_spend_already_forgotten_in_its_window() -> None:
    """20,000 spent 390 days back is forgotten (moved to `spend_history`) once today's
    purchase arrives; a purchase from 380 days back that arrives after it still has those
    20,000 in its window, as a refund's replay of that order would count them."""
    run = Run()
    run.feed(purchase(amount=20000, at=T0 - timedelta(days=390), order_id="p1"))
    run.feed(purchase(amount=100, at=T0, order_id="p2"))
    assert "p1" not in run.state().orders
    late = run.feed(purchase(amount=100, at=T0 - timedelta(days=380), order_id="p3"))
    report = next(g for g in late.grants if g.type == "tier_evaluated")
    assert report.data.qualifying_spend == 20100
    assert (report.data.previous_tier, report.data.tier) == ("member", "silver")
    assert run.state().orders["p3"].tier_after == "silver"


def test_a_late_purchase_does_not_cut_short_the_months_a_later_dated_one_gave() -> None:
    """Gold reached 10 days ago holds 12 months from then. A small purchase from 380 days
    back, delivered now, qualifies for gold again at its own date (the forgotten 30,000 is
    in its window) but must not move the tier's end back to 12 months after itself, or the
    member would lapse at once."""
    run = Run()
    run.feed(purchase(amount=30000, at=T0 - timedelta(days=395), order_id="p1"))
    run.feed(purchase(amount=30000, at=T0 - timedelta(days=10), order_id="p3"))
    held = run.state().tier_valid_until
    assert (run.state().tier, held) == ("gold", datetime(2027, 2, 20, 10, tzinfo=CST))
    run.feed(purchase(amount=100, at=T0 - timedelta(days=380), order_id="late"))
    assert (run.state().tier, run.state().tier_valid_until) == ("gold", held)
    later = run.feed(purchase(amount=1000, at=T0 + timedelta(hours=1), order_id="p4"))
    assert by_rule(later.grants)["base"] == 1500  # still earning at gold's x1.5
