"""DOMAIN.md edges no other test pins: tier thresholds from both sides, and the calendar
conventions (birthday month, daily cap) decided in Asia/Shanghai whatever offset the
producer stamped the event with."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from rules_factories import (
    CST,
    DEFAULT,
    T0,
    Run,
    by_rule,
    purchase,
    review,
    ruleset,
    share,
    sign_in,
    state_with,
)

from services.rules.engine import expire_tier
from services.rules.pruning import latest_start, months_later


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


def _gold_on(at: datetime, rules: object = None) -> Run:
    run = _returning_member()
    if rules is not None:
        run.rules = rules  # type: ignore[assignment]
    run.feed(purchase(amount=30000, at=at))
    return run


def test_a_tier_reached_on_29_february_is_not_kept_a_second_year_by_the_same_order() -> None:
    """29 February + 12 months is clipped to 28 February, whose window reaching 12 months
    back starts on 28 February: it still held the order that reached gold, so that one
    order kept gold two years. Reached on 28 February or 1 March it lapsed after one."""
    for at in (datetime(2028, 2, 28, 10, tzinfo=CST), datetime(2028, 3, 1, 10, tzinfo=CST),
               datetime(2028, 2, 29, 10, tzinfo=CST)):  # fmt: skip
        run = _gold_on(at)
        until = run.state().tier_valid_until
        assert until == months_later(at, 12)
        swept = expire_tier(run.state(), DEFAULT)
        assert swept is not None
        state, report = swept
        assert (state.tier, state.tier_valid_until) == ("member", None), at
        assert report.data.qualifying_spend == 0
        # An event after the expiry catches up on it the same way.
        later = _gold_on(at)
        later.feed(sign_in(at=until + timedelta(days=1)))
        assert later.state().tier == "member", at


def test_a_one_month_tier_reached_on_31_january_lapses_at_the_end_of_february() -> None:
    """With months of one, every order on the 29th-31st was counted again at its expiry."""
    monthly = ruleset(tiers={"window_months": 1, "keep_months": 1})
    run = _gold_on(datetime(2027, 1, 31, 10, tzinfo=CST), monthly)
    assert run.state().tier_valid_until == datetime(2027, 2, 28, 10, tzinfo=CST)
    swept = expire_tier(run.state(), monthly)
    assert swept is not None
    assert swept[0].tier == "member"


def test_a_tier_kept_six_months_counts_the_whole_twelve_month_window_at_its_expiry() -> None:
    """With `keep_months` shorter than the window, the rolling window is all there is: an
    end clipped to 28 February (31 August + 6 months) must not cut the window's first day
    (a first fix started it at 29 February and dropped A, found by the review)."""
    rules = ruleset(tiers={"window_months": 12, "keep_months": 6})
    run = _returning_member()
    run.rules = rules
    run.feed(purchase(amount=10000, at=datetime(2028, 2, 28, 12, tzinfo=CST), order_id="A"))
    run.feed(purchase(amount=20000, at=datetime(2028, 8, 31, 10, tzinfo=CST), order_id="B"))
    assert run.state().tier_valid_until == datetime(2029, 2, 28, 10, tzinfo=CST)
    swept = expire_tier(run.state(), rules)
    assert swept is not None
    state, report = swept
    assert report.data.qualifying_spend == 30000
    assert state.tier == "gold"


def test_latest_start_is_the_latest_moment_the_months_reach_the_end_from() -> None:
    for end, months, start in (
        (datetime(2029, 2, 28, 10, tzinfo=CST), 12, datetime(2028, 2, 29, 10, tzinfo=CST)),
        (datetime(2027, 2, 28, 10, tzinfo=CST), 1, datetime(2027, 1, 31, 10, tzinfo=CST)),
        (datetime(2027, 3, 15, 10, tzinfo=CST), 1, datetime(2027, 2, 15, 10, tzinfo=CST)),
        (datetime(2027, 4, 30, 10, tzinfo=CST), 1, datetime(2027, 3, 31, 10, tzinfo=CST)),
    ):
        assert latest_start(end, months, SH) == start
        assert months_later(start, months, SH) == end
        assert months_later(start + timedelta(days=1), months, SH) > end
    # No moment is 2 months before 30 April (28 February + 2 months is 28 April): the
    # plain calendar answer.
    assert latest_start(datetime(2027, 4, 30, 10, tzinfo=CST), 2, SH) == datetime(
        2027, 2, 28, 10, tzinfo=CST
    )
    # A UTC stamp is read on the zone's calendar: 16:00 UTC on 28 Feb is 29 Feb's midnight
    # in Shanghai, not a month end there.
    utc = datetime(2029, 2, 28, 15, 0, tzinfo=UTC)  # 23:00 on 28 Feb in Shanghai
    assert latest_start(utc, 12, SH) == datetime(2028, 2, 29, 23, tzinfo=SH)
    assert latest_start(utc, 12, SH).utcoffset() == timedelta(0)
