"""Pruning reads only the first entry of each dated map: the maps must stay oldest first.

The reference below is the scan-based pruning `prune` replaced; over streams that span
more than the kept months and arrive partly out of order, every state the evaluator
produces keeps its maps in day order and holds nothing the reference would still drop.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from rules_factories import DEFAULT, T0, Run, purchase, refund, review, share, sign_in, visit

from schemas.activity import Activity
from services.rules.pruning import (
    COUNTER_DAYS,
    add_months,
    put_count,
    put_day,
    put_order,
    put_review,
)
from services.rules.ruleset import derived
from services.rules.state import (
    MemberState,
    Order,
    ReviewMark,
    dump_state,
    in_day_order,
    load_state,
    replace,
)

KEEP = derived(DEFAULT).keep_months


def reference_prune(state: MemberState, now: datetime, today: date) -> MemberState:
    """Drop everything stale, scanning every entry (no reliance on order)."""
    counter_floor, horizon = today - COUNTER_DAYS, add_months(today, -KEEP)
    order_horizon = add_months(now, -KEEP)
    by_day = {d: v for d, v in state.engagement_by_day.items() if d >= counter_floor}
    shares_by_day = {d: v for d, v in state.shares_by_day.items() if d >= counter_floor}
    since = state.counters_since
    if by_day != state.engagement_by_day or shares_by_day != state.shares_by_day:
        since = counter_floor if since is None else max(since, counter_floor)
    history = tuple(m for m in state.spend_history if m.at > add_months(now, -(KEEP + 12)))
    shares_paid = {k: d for k, d in state.shares_paid.items() if d > horizon}
    reviews = {k: r for k, r in state.reviews.items() if r.day > horizon}
    visits = {k: d for k, d in state.visits_seen.items() if d > horizon}
    ids_since = state.ids_since
    if (shares_paid, reviews, visits) != (state.shares_paid, state.reviews, state.visits_seen):
        ids_since = horizon if ids_since is None else max(ids_since, horizon)
    return replace(
        state,
        spend_history=history,
        engagement_by_day=by_day,
        shares_by_day=shares_by_day,
        counters_since=since,
        ids_since=ids_since,
        shares_paid=shares_paid,
        reviews=reviews,
        visits_seen=visits,
        orders={k: o for k, o in state.orders.items() if o.at > order_horizon},
    )


def oldest_first(state: MemberState) -> bool:
    def ascending(values: list[Any]) -> bool:
        return values == sorted(values)

    return (
        ascending(list(state.engagement_by_day))
        and ascending(list(state.shares_by_day))
        and ascending(list(state.shares_paid.values()))
        and ascending(list(state.visits_seen.values()))
        and ascending([r.day for r in state.reviews.values()])
        and ascending([o.at for o in state.orders.values()])
        # Forgotten orders' spend, oldest first. Not necessarily older than every order
        # kept: a purchase from before the orders' horizon that arrives late is kept until
        # an event of the member's present forgets it (so its refund is still honoured),
        # and nothing reads the two as one sequence (a refund's replay merges them).
        and ascending([m.at for m in state.spend_history])
    )


step = st.tuples(
    st.sampled_from(["purchase", "refund", "visit", "sign_in", "review", "share"]),
    st.integers(min_value=0, max_value=40 * 24 * 3600),  # up to 40 days after the last event
    st.integers(min_value=0, max_value=400),  # days back, for an event from the past
    st.booleans(),  # whether this event comes from the past
    st.integers(min_value=0, max_value=20),
)


def build(steps: list[tuple[str, int, int, bool, int]]) -> list[Activity]:
    events: list[Activity] = []
    clock = T0
    orders: list[str] = []
    for i, (kind, gap, back, late, n) in enumerate(steps):
        clock += timedelta(seconds=gap)
        at = clock - timedelta(days=back) if late else clock
        eid = f"ev-{i}"
        if kind == "purchase":
            orders.append(f"o-{i}")
            events.append(purchase(amount=Decimal(100 + n), at=at, order_id=f"o-{i}", event_id=eid))
        elif kind == "refund" and orders:
            events.append(refund("m-1", orders[n % len(orders)], "10.00", at=at, event_id=eid))
        elif kind == "visit":
            lead = timedelta(hours=30)
            events.append(visit(slot=at, lead=lead, late=None, booking_id=f"b-{i}", event_id=eid))
        elif kind == "sign_in":
            events.append(sign_in(at=at, event_id=eid))
        elif kind == "review":
            events.append(review(at=at, featured=n > 10, event_id=eid))
        elif kind == "share":
            events.append(share(at=at, approved=True, likes=n, share_id=f"s-{i}", event_id=eid))
    return events


streams = st.lists(step, min_size=1, max_size=60).map(build)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams)
# Purchases a year late on both sides of the orders' horizon: one forgotten, then one
# older than it kept (hypothesis found it on 2026-11-28).
@example(build([("purchase", 0, 0, False, 0), ("purchase", 0, 365, True, 0),
                ("purchase", 0, 0, False, 0), ("purchase", 0, 366, True, 0)]))  # fmt: skip
def test_states_stay_in_day_order_and_hold_nothing_stale(events: list[Activity]) -> None:
    run = Run()
    zone = derived(DEFAULT).zone
    for event in events:
        run.feed(event)
        state = run.state()
        assert oldest_first(state)
        assert (
            reference_prune(state, event.occurred_at, event.occurred_at.astimezone(zone).date())
            == state
        )
        assert load_state(dump_state(state)) == state


def test_inserting_from_the_past_keeps_day_order() -> None:
    d = date(2026, 5, 10)
    counts = put_count(put_count({}, d, 1), d - timedelta(days=1), 2)
    assert list(counts) == [d - timedelta(days=1), d]
    seen = put_day(put_day({"a": d}, "b", d - timedelta(days=3)), "c", d)
    assert list(seen.items()) == [("b", d - timedelta(days=3)), ("a", d), ("c", d)]
    reviews = put_review({"r1": ReviewMark(day=d)}, "r0", ReviewMark(day=d - timedelta(days=1)))
    assert list(reviews) == ["r0", "r1"]
    # Re-putting a known key with the same day keeps its place (a featured re-send).
    assert list(put_review(reviews, "r0", ReviewMark(day=reviews["r0"].day, points_due=50))) == [
        "r0",
        "r1",
    ]
    early, later = (
        Order(order_id=o, at=T0 + timedelta(days=k), amount=Decimal(1), ruleset_version="v",
              base_rate=Decimal(1))
        for o, k in (("early", 0), ("later", 5))
    )  # fmt: skip
    assert list(put_order(put_order({}, later), early)) == ["early", "later"]


def test_a_stored_state_out_of_order_is_read_back_in_day_order() -> None:
    d = date(2026, 5, 10)
    state = MemberState(
        member_id="m-1",
        visits_seen={"late": d, "early": d - timedelta(days=30)},
        engagement_by_day={d: 5, d - timedelta(days=1): 10},
    )
    assert not oldest_first(state)
    loaded = load_state(dump_state(state))
    assert oldest_first(loaded)
    assert loaded.visits_seen == state.visits_seen  # same content, other order
    assert list(loaded.visits_seen) == ["early", "late"]
    assert in_day_order(loaded) is loaded  # already in order: no copy


def test_an_order_is_forgotten_just_after_the_kept_months() -> None:
    run = Run()
    run.feed(purchase(amount=Decimal(500), at=T0, order_id="o-1"))
    run.feed(sign_in(at=add_months(T0, KEEP) - timedelta(hours=1)))
    assert list(run.state().orders) == ["o-1"]
    run.feed(sign_in(at=add_months(T0, KEEP) + timedelta(hours=1)))
    assert run.state().orders == {}


@settings(max_examples=300, deadline=None)
@given(
    instant=st.datetimes(
        min_value=datetime(2020, 1, 1), max_value=datetime(2030, 1, 1), timezones=st.just(UTC)
    ),
    months=st.integers(min_value=-24, max_value=24),
    zone=st.sampled_from(["Asia/Shanghai", "Europe/Berlin", "America/New_York"]),
)
def test_months_are_counted_on_the_zones_calendar_whatever_offset_the_moment_carries(
    instant: datetime, months: int, zone: str
) -> None:
    """The rules' and the ledger's `months_later` agree, and give the same instant for a
    moment written in UTC, in the zone, or in the zone's offset of that moment (the fast
    path), summer time included."""
    from services.ledger.accounting import months_later as ledger_months_later
    from services.rules.pruning import months_later

    tz = ZoneInfo(zone)
    local = instant.astimezone(tz)
    fixed = instant.astimezone(timezone(local.utcoffset() or timedelta(0)))
    expected = months_later(local, months, tz)
    # Compared as UTC instants: a result inside a summer-time gap (02:30 on the day New
    # York springs forward) never equals a datetime of another zone under PEP 495, even
    # at the same instant.
    instant_of = expected.astimezone(UTC)
    for written in (instant, local, fixed):
        got = months_later(written, months, tz)
        assert got.astimezone(UTC) == instant_of
        assert got.tzinfo is written.tzinfo  # written as the moment was
        assert ledger_months_later(written, months, tz).astimezone(UTC) == instant_of


def test_an_engagement_event_of_a_day_whose_ids_are_forgotten_earns_nothing() -> None:
    """A booking, share or review id is kept `keep_months`; re-sent under a new event id
    with its own dates after that (a backfill exported again), it could not be told from
    the one paid, and was paid again. Within the months it is still recognised."""
    for days, paid_again in ((300, {}), (400, {})):
        run = Run()
        run.feed(visit(slot=T0, booking_id="b-1"), review(at=T0, review_id="r-1", suggestion=True),
                 share(at=T0, share_id="s-1"))  # fmt: skip
        first = run.by_rule()
        assert first == {"on_time_visit": 50, "review": 50, "suggestion_adopted": 200,
                         "share": 100}  # fmt: skip
        run.feed(sign_in(at=T0 + timedelta(days=days)))
        before = len(run.grants)
        run.feed(visit(slot=T0, booking_id="b-1"), review(at=T0, review_id="r-1", suggestion=True),
                 share(at=T0, share_id="s-1"))  # fmt: skip
        again = {
            g.data.rule_id: g.data.points for g in run.grants[before:] if g.type == "points_granted"
        }
        assert again == paid_again, days
    assert run.state().ids_since == add_months(T0.date() + timedelta(days=400), -KEEP)


def test_a_new_engagement_event_after_the_forgotten_days_still_pays() -> None:
    run = Run()
    run.feed(visit(slot=T0, booking_id="b-1"))
    run.feed(sign_in(at=T0 + timedelta(days=400)))
    since = run.state().ids_since
    assert since is not None
    new = run.feed(visit(slot=T0 + timedelta(days=399), booking_id="b-2"))
    assert [g.data.rule_id for g in new.grants if g.type == "points_granted"] == ["on_time_visit"]
