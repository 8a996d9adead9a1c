"""Events delivered out of their time order, and arithmetic at the edges: what a
reviewing helper found (2026-11-29), each test failing on the code before its fix."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rules_factories import (
    DEFAULT,
    T0,
    Run,
    by_rule,
    purchase,
    refund,
    registered,
    review,
    ruleset,
    share,
    sign_in,
    state_with,
)

from schemas.activity import activity_adapter
from schemas.envelope import STORED
from schemas.grants import PointsGranted, PointsRevoked, TierEvaluated
from services.rules.purchase_rules import MAX_EARLY_REFUNDS, base_points
from services.rules.state import EarlyRefund, dump_state, load_state

D = timedelta(days=1)
S = timedelta(seconds=1)


def _returning() -> Run:
    run = Run()
    run.states["m-1"] = state_with(first_purchase_done=True)
    return run


# --- Bursts ---------------------------------------------------------------------------


def test_a_late_engagement_event_is_not_held_for_the_events_after_it() -> None:
    """'More than 20 engagement events from one member in a minute': 20 in one minute, then
    a review written 5 days earlier arrives. Its own minute holds nothing else."""
    run = Run()
    run.feed(*[review(at=T0 + 2 * i * S) for i in range(20)])
    late = run.feed(review(at=T0 - 5 * D))
    assert run.held == []
    assert by_rule(late.grants) == {"review": 50}


def test_a_late_event_inside_a_burst_is_still_held() -> None:
    """Late, but the minute up to it already holds 20: held, as it would have been on
    time."""
    run = Run()
    run.feed(*[review(at=T0 + i * S) for i in range(20)])
    run.feed(review(at=T0 + 45 * S))  # 20 in the minute before it: held
    assert len(run.held) == 1
    run.feed(review(at=T0 + 30 * S))  # late: the 20 from T0 on are in its minute too
    assert len(run.held) == 2
    run.feed(review(at=T0 + 70 * S))  # from T0 + 10 s: 10 + the two held ones
    assert len(run.held) == 2


def test_a_tier_expiry_caught_up_by_a_held_event_is_reported() -> None:
    """A burst straddling the end of a silver tier: the held 21st event applies the expiry
    to the state. It used to be reported by nobody (the state already said member, so
    neither the next event nor the tier sweep would), and the ledger kept silver."""
    run = Run()
    run.feed(purchase(amount=10000, at=T0, order_id="A"))
    until = run.state().tier_valid_until
    assert run.state().tier == "silver"
    assert until is not None
    run.feed(*[share(at=until - 30 * S + i * S) for i in range(3)])
    run.feed(*[review(at=until - 27 * S + i * S) for i in range(17)])
    before = len(run.tiers)
    held = run.feed(review(at=until + 5 * S))  # 21st in a minute: held
    assert len(run.held) == 1
    assert run.state().tier == "member"
    reports = [(t.data.previous_tier, t.data.tier) for t in run.tiers[before:]]
    assert reports == [("silver", "member")]
    assert [g.type for g in held.grants] == ["tier_evaluated"]
    run.feed(sign_in(at=until + 2 * D))
    assert len(run.tiers) == before + 1  # reported once


# --- Rounding -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "rate", "divisor", "points"),
    [
        ("999.99999999999999999999999999", "1.2", "1", 1199),
        ("0.99999999999999999999999999999", "1", "1", 0),
        ("99999999999999999999999999999.99", "1.5", "1", 149999999999999999999999999999),
        ("400", "4", "3", 533),  # a campaign on a third of the order: 400 x 4/3
        ("300", "4", "3", 400),  # whole quotients stay whole
        ("0.999999999999999999999999999999999999999999999999999999999999999", "3", "3", 0),
    ],
)
def test_base_points_are_rounded_down_never_up(
    amount: str, rate: str, divisor: str, points: int
) -> None:
    """'Fractions are rounded down': under the default 28-digit context the product was
    rounded (half even) before the floor, so 999.99999999999999999999999999 x 1.2 paid
    1,200."""
    from decimal import Decimal

    assert base_points(Decimal(amount), Decimal(rate), Decimal(divisor)) == points


def test_a_stored_purchase_of_many_decimals_is_paid_the_floor() -> None:
    # The contract stops amounts at the fen now; one the rules kept before is read back.
    raw = purchase(amount=1000).model_dump(mode="json")
    raw["data"]["amount"] = "999.99999999999999999999999999"
    run = Run()
    run.states["m-1"] = state_with(
        first_purchase_done=True, tier="silver", tier_valid_until=T0 + 100 * D
    )
    r = run.feed(activity_adapter.validate_python(raw, context=STORED))
    assert by_rule(r.grants) == {"base": 1199}


# --- A refund delivered before its purchase -------------------------------------------


def _totals(run: Run, member: str = "m-1") -> dict[str, int]:
    return {k: v for k, v in run.by_rule(member).items() if v}


@pytest.mark.parametrize("refunded", [1000, 400, 2600, 5000])
def test_a_refund_delivered_before_its_purchase_takes_back_what_it_would_have(
    refunded: int,
) -> None:
    """DOMAIN: 'A refund of a purchase takes back the points that purchase earned'. A
    refund that came first used to be dropped, and the purchase then paid in full. Now
    the purchase pays net of it: what purchase-then-refund leaves, and the same state."""
    buy = purchase(
        amount=5000, at=T0, order_id="A", items=["facial-package", "gold-rf-microneedle"]
    )
    back = refund("m-1", "A", refunded, at=T0 + D)
    in_order, reversed_ = _returning(), _returning()
    in_order.feed(buy, back)
    reversed_.feed(back, buy)
    assert _totals(reversed_) == _totals(in_order)
    assert reversed_.state().orders == in_order.state().orders
    assert reversed_.state().tier == in_order.state().tier
    assert reversed_.state().early_refunds == ()
    # Paid once, net: no grant taken back in the same breath.
    assert not [g for g in reversed_.grants if isinstance(g, PointsRevoked)]
    spend = reversed_.tiers[-1].data.qualifying_spend if reversed_.tiers else 0
    assert spend == in_order.tiers[-1].data.qualifying_spend


def test_a_full_refund_before_a_first_purchase_pays_the_referrer_nothing() -> None:
    run = Run()
    run.feed(registered("m-new", referrer="m-ref"))
    run.feed(refund("m-new", "A", 1200, at=T0 + D))
    r = run.feed(purchase("m-new", amount=1200, at=T0 + S, order_id="A"))
    assert [g for g in r.grants if isinstance(g, PointsGranted)] == []
    assert run.balance("m-ref") == 0


def test_two_refunds_before_their_purchase_are_both_applied() -> None:
    in_order, reversed_ = _returning(), _returning()
    buy = purchase(amount=3000, at=T0, order_id="A")
    first, second = refund("m-1", "A", 500, at=T0 + D), refund("m-1", "A", 700, at=T0 + 2 * D)
    in_order.feed(buy, first, second)
    reversed_.feed(second, first, buy)
    assert _totals(reversed_) == _totals(in_order)
    assert reversed_.state().orders["A"].refunded == 1200


def test_a_refund_of_another_order_waits_and_the_state_keeps_it_through_storage() -> None:
    run = _returning()
    run.feed(refund("m-1", "B", 300, at=T0 + D))
    run.feed(purchase(amount=1000, at=T0, order_id="A"))
    state = run.state()
    assert [r.order_id for r in state.early_refunds] == ["B"]
    assert load_state(dump_state(state)) == state


def test_early_refunds_are_forgotten_with_the_orders_and_bounded() -> None:
    run = _returning()
    run.feed(refund("m-1", "gone", 300, at=T0))
    run.feed(sign_in(at=T0 + 400 * D))  # more than keep_months later
    assert run.state().early_refunds == ()
    run.feed(*[refund("m-1", f"o-{i}", 10, at=T0 + 401 * D + i * S) for i in range(40)])
    kept = run.state().early_refunds
    assert len(kept) == MAX_EARLY_REFUNDS
    assert kept[-1] == EarlyRefund(order_id="o-39", at=T0 + 401 * D + 39 * S, amount=10)


def test_a_refund_before_a_repeated_order_id_is_not_applied_twice() -> None:
    """The purchase sent again (same order id) pays nothing, and settles nothing again."""
    run = _returning()
    run.feed(refund("m-1", "A", 1000, at=T0 + D))
    run.feed(purchase(amount=1000, at=T0, order_id="A"))
    again = run.feed(purchase(amount=1000, at=T0, order_id="A"))
    assert again.grants == ()
    assert run.state().orders["A"].refunded == 1000


def test_the_backtest_lane_prices_an_early_refund_too() -> None:
    """`step` is what the backtest runs: the same answer there."""
    from services.rules.engine import step

    state = state_with(first_purchase_done=True)
    s = step(state, refund("m-1", "A", 1000, at=T0 + D), DEFAULT, {}, report_tier=False)
    s = step(s.state, purchase(amount=1000, at=T0, order_id="A"), DEFAULT, {},
             report_tier=False)  # fmt: skip
    assert s.payouts == []


def test_rule_sets_with_stacking_bonuses_net_the_same_way() -> None:
    rules = ruleset(purchase={"stack_purchase_bonuses": True})
    buy = purchase(
        amount=3500, at=T0, order_id="A", items=["facial-package", "gold-rf-microneedle"]
    )
    back = refund("m-1", "A", 1500, at=T0 + D)
    in_order, reversed_ = Run(rules=rules), Run(rules=rules)
    in_order.feed(buy, back)
    reversed_.feed(back, buy)
    assert _totals(reversed_) == _totals(in_order)


# --- A purchase delivered after later-dated ones ----------------------------------------


def test_a_late_purchase_earns_at_the_tier_held_at_its_own_time() -> None:
    """A (10 days later) made the member silver; B, dated before A but delivered after
    it, was made while the member was still 'member': 500 x 1.0, not x 1.2."""
    run = _returning()
    run.feed(purchase(amount=10000, at=T0 + 10 * D, order_id="A"))
    assert run.state().tier == "silver"
    late = run.feed(purchase(amount=500, at=T0, order_id="B"))
    assert by_rule(late.grants) == {"base": 500}
    assert run.state().orders["B"].tier_before == "member"
    assert run.state().tier == "silver"


def test_a_late_purchase_replays_the_tier_of_the_orders_after_it() -> None:
    """B (2,000, earlier) + A (9,000, later) = 11,000: in time order A crossed silver, so
    C earns x1.2. The member used to stay 'member' (B was only checked at its own
    moment), and C earned x1.0."""
    run = _returning()
    run.feed(purchase(amount=9000, at=T0 + 10 * D, order_id="A"))
    late = run.feed(purchase(amount=2000, at=T0, order_id="B"))
    assert run.state().tier == "silver"
    reports = [g.data for g in late.grants if isinstance(g, TierEvaluated)]
    assert [(t.previous_tier, t.tier) for t in reports] == [("member", "silver")]
    c = run.feed(purchase(amount=100, at=T0 + 20 * D, order_id="C"))
    assert by_rule(c.grants) == {"base": 120}
    assert run.state().orders["A"].tier_after == "silver"


def test_a_purchase_before_a_tier_expiry_already_applied_keeps_the_tier() -> None:
    """Silver from A ends 6 months on (a rule set with 6-month tiers and windows, so A is
    still kept then); the next event applied the drop. A purchase dated just before that
    end, delivered after, qualifies again at its moment (A's spend is in its window): in
    time order the member never dropped."""
    run = Run(rules=ruleset(tiers={"window_months": 6, "keep_months": 6}))
    run.states["m-1"] = state_with(first_purchase_done=True)
    run.feed(purchase(amount=10000, at=T0, order_id="A"))
    until = run.state().tier_valid_until
    assert until is not None
    run.feed(sign_in(at=until + D))
    assert run.state().tier == "member"
    late = run.feed(purchase(amount=100, at=until - D, order_id="B"))
    assert by_rule(late.grants) == {"base": 120}  # earned at silver, held then
    assert run.state().tier == "silver"


@settings(max_examples=150, deadline=None)
@given(
    orders=st.lists(
        st.tuples(st.integers(0, 300), st.sampled_from([500, 3000, 8000, 12000, 25000])),
        min_size=2, max_size=7, unique_by=lambda o: o[0],
    ),
    seed=st.randoms(use_true_random=False),
)  # fmt: skip
def test_orders_in_any_arrival_order_leave_the_tiers_of_time_order(
    orders: list[tuple[int, int]], seed: Any
) -> None:
    """Whatever order a member's purchases arrive in (none forgotten: all within 300
    days), every order records the tier it was made at and reached, and the member ends
    at the tier and end date time order gives."""
    events = [purchase(amount=a, at=T0 + d * D, order_id=f"o{d}") for d, a in orders]
    in_time, shuffled = _returning(), _returning()
    in_time.feed(*sorted(events, key=lambda e: e.occurred_at))
    arrival = list(events)
    seed.shuffle(arrival)
    shuffled.feed(*arrival)
    a, b = in_time.state(), shuffled.state()
    assert (b.tier, b.tier_valid_until) == (a.tier, a.tier_valid_until)
    assert {k: (o.tier_before, o.tier_after) for k, o in b.orders.items()} == {
        k: (o.tier_before, o.tier_after) for k, o in a.orders.items()
    }


# --- Sign-ins delivered late ----------------------------------------------------------


def test_a_late_sign_in_fills_its_day_and_mends_the_streak() -> None:
    """Seven consecutive days, day 4's sign-in arriving after day 7's: 7 x 5 + 20. It
    used to earn nothing, and the streak bonus was lost."""
    days = [sign_in(at=T0 + i * D) for i in range(7)]
    run = Run()
    run.feed(*days[:3], *days[4:], days[3])
    assert run.by_rule() == {"sign_in": 35, "sign_in_streak": 20}
    assert [(r.first, r.last) for r in run.state().sign_in_runs] == [
        (T0.date(), (T0 + 6 * D).date())
    ]


def test_the_streak_bonus_of_a_filled_run_counts_on_the_day_it_falls_due() -> None:
    """Day 7's budget is spent (reviews up to the 200 cap): the bonus that filling day 4
    completes falls due on day 7, and is cut there, as it would have been on time."""
    run = Run()
    run.feed(*[sign_in(at=T0 + i * D) for i in (0, 1, 2, 4, 5)])
    run.feed(*[review(at=T0 + 6 * D + i * S) for i in range(4)])  # day 7: 200 by reviews
    run.feed(sign_in(at=T0 + 6 * D + 10 * S))  # day 7's sign-in: capped to nothing
    late = run.feed(sign_in(at=T0 + 3 * D))
    assert by_rule(late.grants) == {"sign_in": 5}  # day 4's; the bonus cut on day 7


def test_a_held_sign_in_released_after_the_next_days_one_still_pays() -> None:
    """README: a release pays under the rules of the event's time, with its own day's
    cap. A sign-in held in a burst and released after the member signed in the next day
    paid nothing (any day up to the last one was dropped)."""
    from services.rules.engine import release

    rules = ruleset(engagement={"burst_max_events": 3})
    run = Run(rules=rules)
    run.feed(*[review(at=T0 + i * S) for i in range(3)])
    run.feed(sign_in(at=T0 + 10 * S))  # the 4th engagement event in a minute: held
    assert len(run.held) == 1
    run.feed(sign_in(at=T0 + D))
    released = release(run.state(), run.held[0], rules)
    assert by_rule(released.grants) == {"sign_in": 5}


def test_a_state_written_before_the_runs_reads_its_streak_as_one() -> None:
    """Stored states hold the last day and the streak ending on it: day 7 of a streak
    still pays its bonus, and the state is written back as runs."""
    run = Run()
    run.states["m-1"] = state_with(sign_in_last_day=(T0 + 5 * D).date(), sign_in_streak=6)
    r = run.feed(sign_in(at=T0 + 6 * D))
    assert by_rule(r.grants) == {"sign_in": 5, "sign_in_streak": 20}
    state = run.state()
    assert (state.sign_in_last_day, state.sign_in_streak) == (None, 0)
    assert [(x.first, x.last) for x in state.sign_in_runs] == [(T0.date(), (T0 + 6 * D).date())]
    assert load_state(dump_state(state)) == state
    assert b"sign_in_last_day" not in dump_state(state)


def test_sign_in_runs_are_forgotten_with_the_day_counters() -> None:
    run = Run()
    run.feed(sign_in(at=T0), sign_in(at=T0 + D))
    run.feed(sign_in(at=T0 + 40 * D))
    assert [(x.first, x.last) for x in run.state().sign_in_runs] == [
        ((T0 + 40 * D).date(), (T0 + 40 * D).date())
    ]


@settings(max_examples=200, deadline=None)
@given(
    days=st.lists(st.integers(0, 30), min_size=1, max_size=30, unique=True),
    seed=st.randoms(use_true_random=False),
)
def test_sign_ins_in_any_arrival_order_pay_what_time_order_pays(days: list[int], seed: Any) -> None:
    """The bonuses paid when a day is filled in are what the joined run owes beyond what
    its parts were paid, so however the days arrive the total is time order's (no cap is
    reached by sign-ins alone)."""
    events = [sign_in(at=T0 + d * D) for d in days]
    in_time, shuffled = Run(), Run()
    in_time.feed(*sorted(events, key=lambda e: e.occurred_at))
    arrival = list(events)
    seed.shuffle(arrival)
    shuffled.feed(*arrival)
    assert shuffled.by_rule() == in_time.by_rule()
    assert shuffled.state().sign_in_runs == in_time.state().sign_in_runs


def test_a_first_purchase_refunded_before_it_arrived_owes_no_late_referral() -> None:
    """B's full refund arrives before B's purchase: the purchase pays nothing, and it must
    not be recorded as a referral that paid no indirect bonus, or the referrer's referrer
    (learnt later, step 2 of the referral chain) would be paid for a refunded order."""
    from services.rules import referral_chain as chain
    from services.rules.engine import evaluate
    from services.rules.ruleset import RuleBook
    from services.rules.state import MemberState

    book = RuleBook([DEFAULT])
    state = evaluate(MemberState(member_id="B"), registered("B", referrer="A"), DEFAULT, {}).state
    work = chain.ChainWork()
    for event in (refund("B", "o-B", 800, at=T0 + D), purchase("B", 800, at=T0, order_id="o-B")):
        result = evaluate(state, event, DEFAULT, {})
        work.observe(state, result.state, event, book, result.grants)
        state = result.state
    assert work.referrals == []
    # A partial early refund keeps the referral (paid, and recorded for the chain).
    state = evaluate(MemberState(member_id="D"), registered("D", referrer="A"), DEFAULT, {}).state
    for event in (refund("D", "o-D", 300, at=T0 + D), purchase("D", 800, at=T0, order_id="o-D")):
        result = evaluate(state, event, DEFAULT, {})
        work.observe(state, result.state, event, book, result.grants)
        state = result.state
    assert [r[0] for r in work.referrals] == ["D"]


# --- Found reviewing the above (2026-11-29) -------------------------------------------

H = timedelta(hours=1)


def test_a_state_written_before_the_runs_does_not_pay_an_old_day_again() -> None:
    """Old code: any day <= sign_in_last_day earns nothing. A stored state that signed in
    on days 1-3, missed day 4 and signed in on day 5 reads as the run [5, 5]; a second
    sign-in for day 3 (a resend under a new event id) is now paid 5 again."""
    run = Run()
    run.states["m-1"] = state_with(
        sign_in_last_day=(T0 + 4 * D).date(),
        sign_in_streak=1,
        engagement_by_day={(T0 + i * D).date(): 5 for i in (0, 1, 2, 4)},
    )
    again = run.feed(sign_in(at=T0 + 2 * D + H))
    assert by_rule(again.grants) == {}, "second sign-in on day 3 paid"


def test_the_bonus_a_filled_day_completes_is_booked_on_its_own_day() -> None:
    """Days 0-5 and 7-14 signed in, day 6 arrives last. Time order: bonuses fall on day 6
    and day 13. Day 13's budget is spent by reviews before its sign-in, so time order pays
    the day-6 bonus only (20). Filling day 6 books the owed bonus on day 13 (already the
    after-run's bonus day, and full), so it is cut: 0."""

    def events() -> list[Any]:
        ev = [sign_in(at=T0 + i * D) for i in range(15) if i not in (6, 13)]
        ev += [review(at=T0 + 13 * D + i * S) for i in range(4)]  # day 13: 200 by reviews
        ev += [sign_in(at=T0 + 13 * D + 10 * S)]
        return ev

    in_time = Run()
    in_time.feed(*sorted([*events(), sign_in(at=T0 + 6 * D)], key=lambda e: e.occurred_at))
    late = Run()
    late.feed(*events())
    late.feed(sign_in(at=T0 + 6 * D))
    assert in_time.by_rule().get("sign_in_streak") == 20
    assert late.by_rule().get("sign_in_streak") == in_time.by_rule().get("sign_in_streak")


def test_a_run_is_kept_while_the_day_after_it_still_pays() -> None:
    """Six days signed in ending on day L; an event on L + 36 prunes the run (L < today -
    35) but day L + 1 = today - 35 is still counted (counters kept from today - 35). The
    late sign-in of day L + 1 is paid 5 but does not join the run: the 7th-day bonus (20)
    that time order pays is lost."""
    run = Run()
    run.feed(*[sign_in(at=T0 + i * D) for i in range(6)])  # days 0..5
    run.feed(sign_in(at=T0 + 41 * D))  # today = day 41: day 5 < 41 - 35 = day 6
    late = run.feed(sign_in(at=T0 + 6 * D))
    assert by_rule(late.grants) == {"sign_in": 5, "sign_in_streak": 20}


def test_a_late_purchase_after_fully_refunded_orders_earns_at_member() -> None:
    """A (10,000) makes silver; B (100) is placed at silver; both are refunded in full
    (B first, then A): nothing was spent, the member is 'member'. C (100), dated after
    both refunds, earns x1.0 in time order. Delivered after a later order D, `held_at`
    starts from B's recorded tier_before (silver: a fully refunded order is skipped by the
    replay, so its record is stale) and C earns x1.2 and leaves the member silver."""
    evs = [
        purchase(amount=10000, at=T0, order_id="A"),
        purchase(amount=100, at=T0 + 5 * D, order_id="B"),
        refund("m-1", "B", 100, at=T0 + 6 * D),
        refund("m-1", "A", 10000, at=T0 + 7 * D),
    ]
    c = purchase(amount=100, at=T0 + 8 * D, order_id="C")
    d = purchase(amount=100, at=T0 + 20 * D, order_id="D")
    in_time, late = _returning(), _returning()
    in_time.feed(*evs, c, d)
    late.feed(*evs, d)
    r = late.feed(c)
    assert in_time.state().tier == "member"
    assert by_rule(r.grants) == {"base": 100}
    assert late.state().tier == in_time.state().tier
