"""A quiet member's qualifying spend is reported again when an order leaves the window.

The ledger shows the spend of the member's last tier report, and only purchases, refunds
and tier expiries make one: without a report when an order leaves the 12-month window, the
member view kept the old spend, and too little still needed for the next tier, for good.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from rules_factories import CST, DEFAULT, T0, Run, purchase, refund, ruleset, sign_in, state_with

from schemas.grants import TierEvaluated, grant_id
from services.ledger.reads import member_document
from services.rules import tiers
from services.rules.engine import (
    Evaluation,
    due_after,
    report_spend,
    spend_report_id,
    sweep_due,
    tier_due,
)
from services.rules.pruning import add_months, months_later
from services.rules.ruleset import RuleBook
from services.rules.state import MemberState, Order, SpendMark

SHANGHAI = ZoneInfo("Asia/Shanghai")
MONTHLY = ruleset(tiers={"window_months": 1, "keep_months": 1})


def _order(order_id: str, at: datetime, amount: int, refunded: int = 0) -> Order:
    return Order(order_id=order_id, at=at, amount=Decimal(amount), refunded=Decimal(refunded),
                 ruleset_version="2026.1", base_rate=Decimal(1))  # fmt: skip


def _orders(*orders: Order) -> dict[str, Order]:
    return {o.order_id: o for o in orders}


# -- when an order leaves the window --------------------------------------------------------


def test_an_order_leaves_the_window_exactly_window_months_later() -> None:
    assert tiers.leaves_window(T0, 12, SHANGHAI) == add_months(T0, 12)


@pytest.mark.parametrize(
    ("at", "window", "leaves"),
    [
        # 29 Feb + 12 months is 28 Feb, whose window still reaches back to 28 Feb 10:00:
        # the order counts through that day.
        (datetime(2028, 2, 29, 10, tzinfo=CST), 12, datetime(2029, 3, 1, tzinfo=CST)),
        # 31 Mar + 1 month is 30 Apr; 31 Jan + 1 month is 28 Feb.
        (datetime(2027, 3, 31, 10, tzinfo=CST), 1, datetime(2027, 5, 1, tzinfo=CST)),
        (datetime(2027, 1, 31, 10, tzinfo=CST), 1, datetime(2027, 3, 1, tzinfo=CST)),
        (datetime(2027, 1, 29, 10, tzinfo=CST), 1, datetime(2027, 3, 1, tzinfo=CST)),
        # Not clipped: 28 Feb and 31 Mar (a 12-month window) leave to the minute.
        (datetime(2027, 2, 28, 10, tzinfo=CST), 1, datetime(2027, 3, 28, 10, tzinfo=CST)),
        (datetime(2027, 3, 31, 10, tzinfo=CST), 12, datetime(2028, 3, 31, 10, tzinfo=CST)),
        # Written in UTC, 29 Feb 01:00 in Shanghai: the day starts there, not in UTC.
        (datetime(2028, 2, 28, 17, tzinfo=UTC), 12, datetime(2029, 2, 28, 16, tzinfo=UTC)),
    ],
)
def test_a_clipped_month_end_keeps_the_order_to_the_end_of_that_day(
    at: datetime, window: int, leaves: datetime
) -> None:
    assert tiers.leaves_window(at, window, SHANGHAI) == leaves
    assert tiers.leaves_window(at, window, SHANGHAI).utcoffset() == at.utcoffset()


@pytest.mark.parametrize("window", [1, 12])
def test_leaving_is_the_first_moment_the_window_no_longer_holds_the_order(window: int) -> None:
    # Every day of two years, at 00:00, mid-morning and just before midnight.
    start = datetime(2027, 1, 1, tzinfo=CST)
    for day in range(730):
        for at in (start + timedelta(days=day, hours=h) for h in (0, 10.5, 23.99)):
            leaves = tiers.leaves_window(at, window, SHANGHAI)
            assert months_later(leaves, -window, SHANGHAI) >= at  # gone at `leaves`
            before = leaves - timedelta(microseconds=1)
            assert months_later(before, -window, SHANGHAI) < at  # still counted just before
            assert tiers.window_spend(_orders(_order("o", at, 1)), (), before, window, SHANGHAI)
            assert not tiers.window_spend(_orders(_order("o", at, 1)), (), leaves, window,
                                          SHANGHAI)  # fmt: skip


# -- when the spend reported at a moment goes stale -----------------------------------------


def test_the_spend_changes_when_the_oldest_order_counted_leaves() -> None:
    orders = _orders(_order("a", T0, 8000), _order("b", add_months(T0, 3), 500))
    at = add_months(T0, 4)
    assert tiers.next_spend_change(orders, (), at, 12, SHANGHAI) == add_months(T0, 12)
    # At that moment, the next one counted: then nothing is left to change.
    first = add_months(T0, 12)
    assert tiers.next_spend_change(orders, (), first, 12, SHANGHAI) == add_months(T0, 15)
    assert tiers.next_spend_change(orders, (), add_months(T0, 15), 12, SHANGHAI) is None


def test_orders_refunded_in_full_or_already_out_of_the_window_change_nothing() -> None:
    orders = _orders(
        _order("old", add_months(T0, -13), 900),  # left before the report: not counted
        _order("refunded", T0, 8000, refunded=8000),
        _order("partly", add_months(T0, 2), 3000, refunded=1000),  # 2,000 still counts
    )
    at = add_months(T0, 3)
    assert tiers.window_spend(orders, (), at, 12, SHANGHAI) == 2000
    assert tiers.next_spend_change(orders, (), at, 12, SHANGHAI) == add_months(T0, 14)
    only_refunded = _orders(_order("refunded", T0, 8000, refunded=8000))
    assert tiers.next_spend_change(only_refunded, (), at, 12, SHANGHAI) is None


def test_spend_of_forgotten_orders_still_counted_changes_it_too() -> None:
    # A report dated a year back (a late event's) counts orders the state has forgotten:
    # their spend leaves the window at their own moment.
    out, mid, last = (SpendMark(at=add_months(T0, m), net=Decimal(700)) for m in (-11, -2, 0))
    orders = _orders(_order("a", add_months(T0, 1), 100))
    at = add_months(T0, 2)  # the window starts at T0 - 10 months: "out" is not counted
    assert tiers.next_spend_change(orders, (out, mid, last), at, 12, SHANGHAI) == add_months(T0, 10)
    # The oldest counted decides, mark or order.
    assert tiers.next_spend_change(orders, (out, last), at, 12, SHANGHAI) == add_months(T0, 12)


def test_a_report_dated_before_later_orders_goes_stale_when_the_latest_counts() -> None:
    orders = _orders(_order("a", T0, 100), _order("b", add_months(T0, 2), 100),
                     _order("c", add_months(T0, 3), 100))  # fmt: skip
    late = add_months(T0, 1)  # a late event's report: it missed "b" and "c"
    assert tiers.next_spend_change(orders, (), late, 12, SHANGHAI) == add_months(T0, 3)


def test_the_change_is_always_after_the_moment_reported() -> None:
    orders = _orders(*(_order(f"o-{i}", T0 + timedelta(days=37 * i), 100) for i in range(11)))
    at = T0 + timedelta(days=371)  # after every order; "o-0" is out of the window
    seen = []
    while (change := tiers.next_spend_change(orders, (), at, 12, SHANGHAI)) is not None:
        assert change > at
        seen.append(change)
        at = change
    assert seen == [tiers.leaves_window(o.at, 12, SHANGHAI) for o in orders.values()][1:]


@pytest.mark.parametrize("window", [1, 12])
def test_the_change_is_the_first_exit_of_what_the_window_counts(window: int) -> None:
    # Against the definition, on random members: orders (some refunded) and forgotten
    # spend over two years, many of them on month ends, asked at random moments.
    rng = random.Random(window)
    base = datetime(2027, 1, 1, tzinfo=CST)
    for _ in range(300):
        moments = sorted(
            base + timedelta(days=rng.choice([rng.randrange(730), 58 + 365 * rng.randrange(2)]),
                             hours=rng.randrange(24))
            for _ in range(rng.randrange(1, 8))
        )  # fmt: skip
        cut = rng.randrange(len(moments) + 1)
        history = tuple(SpendMark(at=m, net=Decimal(5)) for m in moments[:cut])
        orders = _orders(*(_order(f"o-{i}", m, 10, refunded=rng.choice([0, 0, 4, 10]))
                           for i, m in enumerate(moments[cut:])))  # fmt: skip
        at = base + timedelta(days=rng.randrange(800), minutes=rng.randrange(1440))
        start = months_later(at, -window, SHANGHAI)
        counted = [m.at for m in history if start < m.at <= at] + [
            o.at for o in orders.values() if start < o.at <= at and o.refunded < o.amount
        ]
        exits = [tiers.leaves_window(c, window, SHANGHAI) for c in counted]
        later = [o.at for o in orders.values() if o.at > at][-1:]
        expected = min(exits + later, default=None)
        assert tiers.next_spend_change(orders, history, at, window, SHANGHAI) == expected


# -- the engine: what the sweep reports ----------------------------------------------------


def _bought(amount: int = 8000, at: datetime = T0) -> Run:
    run = Run()
    run.states["m-1"] = state_with(first_purchase_done=True)
    run.feed(purchase(amount=amount, at=at))
    return run


def _view(report: TierEvaluated) -> dict[str, object]:
    """The ledger's member view from the last tier report, as its projector stores it."""
    d = report.data
    row = {"member_id": report.member_id, "tier": d.tier, "qualifying_spend": d.qualifying_spend,
           "tier_valid_until": d.tier_valid_until, "next_tier": d.next_tier,
           "next_tier_spend": d.next_tier_spend, "debt": 0, "earned": 0, "redeemed": 0,
           "expired": 0}  # fmt: skip
    return member_document(row, [], report.occurred_at)


def test_a_plain_members_spend_is_reported_when_their_order_leaves_the_window() -> None:
    # The reproduction: 8,000 at T0, then only a sign-in and a review 13 months on.
    run = _bought()
    (report,) = run.tiers
    due = tier_due(run.state(), report.occurred_at, DEFAULT)
    assert due == add_months(T0, 12)
    run.feed(sign_in(at=add_months(T0, 13)))
    assert run.tiers == [report]  # no event reports it
    state = run.state()
    # The due moment as Postgres gives it back, in UTC; the report is dated in Shanghai's.
    new, swept, next_due = sweep_due(state, due.astimezone(UTC), RuleBook([DEFAULT]).at)
    assert new is state  # the tier and its end stand
    assert swept.occurred_at.isoformat() == due.isoformat() == "2027-03-02T10:00:00+08:00"
    assert (swept.data.previous_tier, swept.data.tier) == ("member", "member")
    assert swept.data.qualifying_spend == 0
    source = spend_report_id("m-1", due, Decimal(0))
    assert swept.data.source_event_id == source
    assert swept.event_id == grant_id(source, "tier", "m-1", "tier")
    assert next_due is None
    assert _view(report)["next_tier"] == {"tier": "silver", "spend_needed": "2000.00"}
    view = _view(swept)
    assert (view["qualifying_spend"], view["next_tier"]) == (
        "0",
        {"tier": "silver", "spend_needed": "10000.00"},
    )
    # And a member who follows the view's advice reaches silver.
    run.feed(purchase(amount=10000, at=add_months(T0, 13) + timedelta(hours=1)))
    assert run.state().tier == "silver"


def test_expiries_and_spend_changes_are_swept_in_time_order() -> None:
    # Gold from 30,000, kept to month 23 by 100 at month 11; 12,000 at month 13.
    run = _bought(30000)
    run.feed(purchase(amount=100, at=add_months(T0, 11)))
    run.feed(purchase(amount=12000, at=add_months(T0, 13)))
    state = run.state()
    assert (state.tier, state.tier_valid_until) == ("gold", add_months(T0, 23))
    assert run.tiers[-1].data.qualifying_spend == 12100  # the 30,000 left at month 12
    due = tier_due(state, add_months(T0, 13), DEFAULT)
    book = RuleBook([DEFAULT])
    swept: list[tuple[datetime, str, Decimal, datetime | None]] = []
    while due is not None:
        new, report, due = sweep_due(state, due, book.at)
        assert (new is state) == (report.data.source_event_id.startswith("spend-lapse|"))
        d = report.data
        swept.append((report.occurred_at, d.tier, d.qualifying_spend, d.tier_valid_until))
        state = new
    assert swept == [
        # The 100 leaves with the tier's end: the expiry reports it (silver on 12,000).
        (add_months(T0, 23), "silver", 12000, add_months(T0, 35)),
        # The 12,000 leaves: silver stands to its end, on no spend.
        (add_months(T0, 25), "silver", 0, add_months(T0, 35)),
        (add_months(T0, 35), "member", 0, None),
    ]


def test_a_gold_members_spend_drops_before_the_tier_expires() -> None:
    # Gold from 30,000 at T0, kept to month 23 by a small order at month 11: the 30,000
    # leaves at month 12, the tier stands, and the view says what gold takes to keep.
    run = _bought(30000)
    run.feed(purchase(amount=100, at=add_months(T0, 11)))
    state = run.state()
    assert (state.tier, state.tier_valid_until) == ("gold", add_months(T0, 23))
    due = tier_due(state, add_months(T0, 11), DEFAULT)
    assert due == add_months(T0, 12)
    new, swept, due = sweep_due(state, due, RuleBook([DEFAULT]).at)
    assert new is state
    assert (swept.data.tier, swept.data.tier_valid_until) == ("gold", add_months(T0, 23))
    assert swept.data.qualifying_spend == 100
    assert (swept.data.next_tier, swept.data.next_tier_spend) == ("diamond", 100000)
    assert due == add_months(T0, 23)  # the 100 leaves at the expiry: the expiry's report


def test_a_refund_lowers_the_spend_the_sweep_later_reports() -> None:
    run = _bought(8000)
    run.feed(purchase(amount=3000, order_id="o-b", at=add_months(T0, 2)))
    run.feed(refund("m-1", "o-b", 1000, at=add_months(T0, 4)))
    last = run.tiers[-1]
    assert last.data.qualifying_spend == 10000
    due = tier_due(run.state(), last.occurred_at, DEFAULT)
    _, swept, due = sweep_due(run.state(), due, RuleBook([DEFAULT]).at)
    assert (swept.occurred_at, swept.data.qualifying_spend) == (add_months(T0, 12), 2000)
    assert due == add_months(T0, 14)


def test_the_sweep_reports_the_29_february_order_leaving_the_next_day() -> None:
    leap = datetime(2028, 2, 29, 10, tzinfo=CST)
    run = _bought(8000, at=leap)
    due = tier_due(run.state(), leap, DEFAULT)
    assert due == datetime(2029, 3, 1, tzinfo=CST)
    _, swept, _ = sweep_due(run.state(), due, RuleBook([DEFAULT]).at)
    assert swept.data.qualifying_spend == 0
    # Late on 28 February the order still counted: a report then would repeat 8,000.
    before = report_spend(run.state(), datetime(2029, 2, 28, 23, tzinfo=CST), DEFAULT)
    assert before.data.qualifying_spend == 8000


def test_sweeping_moves_on_until_nothing_is_left_to_report() -> None:
    # Several orders of a month window, one ending on the 31st: each sweep is later than
    # the last, and the spend reported falls to 0.
    run = Run(rules=MONTHLY)
    run.states["m-1"] = state_with(first_purchase_done=True)
    for day in (1, 10, 31):
        run.feed(purchase(amount=1000, at=datetime(2027, 1, day, 10, tzinfo=CST)))
    state, at = run.state(), datetime(2027, 1, 31, 10, tzinfo=CST)
    due = tier_due(state, at, MONTHLY)
    reported: list[tuple[datetime, Decimal]] = []
    while due is not None:
        assert due > at
        state, report, next_due = sweep_due(state, due, RuleBook([MONTHLY]).at)
        reported.append((report.occurred_at, report.data.qualifying_spend))
        at, due = report.occurred_at, next_due
    assert reported == [
        (datetime(2027, 2, 1, 10, tzinfo=CST), Decimal(2000)),
        (datetime(2027, 2, 10, 10, tzinfo=CST), Decimal(1000)),
        (datetime(2027, 3, 1, tzinfo=CST), Decimal(0)),  # 31 Jan + 1 month: end of 28 Feb
    ]


def test_after_an_event_the_due_moment_comes_from_its_report_or_is_kept() -> None:
    run = _bought(8000)
    result = run.feed(purchase(amount=500, at=add_months(T0, 1)))
    assert due_after(result, DEFAULT, None) == add_months(T0, 12)
    # An event that reports nothing keeps the due moment stored with the state ...
    quiet = run.feed(sign_in(at=add_months(T0, 14)))
    assert not [g for g in quiet.grants if isinstance(g, TierEvaluated)]
    assert due_after(quiet, DEFAULT, add_months(T0, 12)) == add_months(T0, 12)
    # ... but never after the tier's end (one a writer without the column left behind).
    silver = state_with(tier="silver", tier_valid_until=add_months(T0, 20))
    assert due_after(Evaluation(state=silver), DEFAULT, None) == add_months(T0, 20)
    assert due_after(Evaluation(state=silver), DEFAULT, add_months(T0, 30)) == add_months(T0, 20)
    assert due_after(Evaluation(state=silver), DEFAULT, add_months(T0, 15)) == add_months(T0, 15)


def test_a_member_without_spend_is_never_due() -> None:
    assert tier_due(MemberState(member_id="m-1"), T0, DEFAULT) is None


def test_a_moment_reported_again_with_another_spend_gets_its_own_id() -> None:
    """A purchase delivered late, dated before a moment the sweep already reported, brings
    the member due at that moment again; the ledger drops an id it holds, so the second
    answer needs an id of its own (the view kept the late purchase's spend for months)."""
    book = RuleBook([DEFAULT])
    run = Run()
    run.states["m-1"] = state_with(first_purchase_done=True)
    first = run.feed(purchase(amount=8000, order_id="o-1", at=T0))
    due = due_after(first, DEFAULT, None)
    _, swept, after = sweep_due(run.state(), due, book.at)
    assert (swept.data.qualifying_spend, after) == (0, None)
    late = run.feed(purchase(amount=3000, order_id="o-2", at=add_months(T0, 6)))
    assert due_after(late, DEFAULT, after) == due  # the 8,000 leaves at the same moment
    _, again, _ = sweep_due(run.state(), due, book.at)
    assert again.occurred_at == swept.occurred_at
    assert again.data.qualifying_spend == 3000
    assert again.event_id != swept.event_id
    # The same answer at the same moment (a sweep repeated after a crash) keeps its id.
    assert sweep_due(run.state(), due, book.at)[1].event_id == again.event_id
