"""Tier logic: rolling 12-month net spend, immediate upgrades, 12 months of grace.

Tiers are evaluated only when an event arrives (the core has no clock), but an expiry
that fell between two events is replayed at its own moment (`catch_up`), so the outcome
does not depend on when the member next shows up.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta, tzinfo
from decimal import (
    Context,
    Decimal,
    DivisionByZero,
    Inexact,
    InvalidOperation,
    Overflow,
    localcontext,
)
from typing import Final

from schemas.grants import TIERS, Tier
from services.rules.pruning import latest_start, months_later
from services.rules.ruleset import TierRules
from services.rules.state import MemberState, Order, SpendMark, replace

_RANK: dict[str, int] = {t: i for i, t in enumerate(TIERS)}
# The tier rules of the rule-set version in force at a moment (a `RuleBook`'s): an expiry,
# or an order a refund replays, is decided under its own moment's version, as the tier
# sweep and the purchase itself decided it. None: the one version given is used for all.
TiersAt = Callable[[datetime], TierRules]


def rank(tier: Tier) -> int:
    return _RANK[tier]


def qualified_tier(spend: Decimal, rules: TierRules) -> Tier:
    best: Tier = "member"
    for tier in TIERS[1:]:
        threshold = rules.thresholds.get(tier)
        if threshold is not None and spend >= threshold:
            best = tier
    return best


def next_tier(tier: Tier, rules: TierRules) -> tuple[Tier, Decimal] | None:
    """The next tier up that the rule set defines, with the qualifying spend it needs."""
    for higher in TIERS[rank(tier) + 1 :]:
        threshold = rules.thresholds.get(higher)
        if threshold is not None:
            return higher, threshold
    return None


def rolling_spend(
    orders: Mapping[str, Order], at: datetime, window_months: int, zone: tzinfo | None = None
) -> Decimal:
    """Net spend of orders in (at - window, at]: refunds already reduce each order.

    Every purchase sums a member's orders (in both lanes of a backtest), so the loop skips
    the subtraction for orders with nothing refunded, most of them. `zone`: whose calendar
    counts the months (the rule set's; every function here takes it the same way).
    """
    return _net_between(orders, months_later(at, -window_months, zone), at)


def _net_between(orders: Mapping[str, Order], start: datetime, at: datetime) -> Decimal:
    total = Decimal(0)
    for o in orders.values():
        if start < o.at <= at:
            refunded = o.refunded
            total += o.amount - refunded if refunded else o.amount
    return total


def hold_until(
    tier: Tier, since: datetime, rules: TierRules, zone: tzinfo | None = None
) -> datetime | None:
    """When a tier reached at `since` expires; "member" is the floor: nothing to expire."""
    return None if tier == "member" else months_later(since, rules.keep_months, zone)


_hold = hold_until


def on_qualifying(
    tier: Tier, until: datetime | None, q: Tier, at: datetime, rules: TierRules,
    zone: tzinfo | None = None,
) -> tuple[Tier, datetime | None]:  # fmt: skip
    """The tier and its end after an order at `at` whose spend qualifies for `q`.

    An upgrade, or the tier held qualified for again, holds from `at`; but a tier is kept
    12 months from the order that last qualified for it by date, so an order delivered
    late (or a month-end clipped to an earlier day) does not cut short the months a
    later-dated one already gave.
    """
    if rank(q) < rank(tier):
        return tier, until
    hold = _hold(q, at, rules, zone)
    if q == tier and until is not None and hold is not None and until > hold:
        return tier, until
    return q, hold


def window_spend(
    orders: Mapping[str, Order], history: tuple[SpendMark, ...], at: datetime, window: int,
    zone: tzinfo | None = None, start: datetime | None = None,
) -> Decimal:  # fmt: skip
    """Rolling spend counting forgotten orders too (`MemberState.spend_history`).

    Orders are forgotten a full window (or more) behind the member's latest event, so
    their spend counts only at a moment further back: an event that arrived late, or an
    order or expiry a refund replays. The marks are oldest first, so the newest are read
    until one falls before the window: nothing, usually. `start`: the window's start, when
    not `window` months before `at` (a tier expiry, `expiry_window_start`).
    """
    if start is None:
        start = months_later(at, -window, zone)
    total = _net_between(orders, start, at)
    for m in reversed(history):
        if m.at <= start:
            break
        if m.at <= at:
            total += m.net
    return total


_DAY: Final = timedelta(days=1)
# A zone's summer-time gap can make the calendar arithmetic run back by up to an hour.
_GAP: Final = timedelta(hours=1)


def leaves_window(at: datetime, window: int, zone: tzinfo | None = None) -> datetime:
    """The first moment an order placed at `at` no longer counts in the rolling spend.

    An order counts at t while `months_later(t, -window)` is before it: up to `window`
    months after it, unless clipping made that day its month's last (29 February + 12
    months is 28 February; 31 March + 1 month, 30 April). The window then still reaches
    back past `at` through that day, so the order leaves at the next day's start, in the
    zone whose calendar counts the months.
    """
    end = months_later(at, window, zone)
    if at.day <= 28 and (zone is None or zone.utcoffset(at) == at.utcoffset()):
        return end  # a day every month has, on the zone's calendar: nothing was clipped
    while months_later(end, -window, zone) < at:
        local = end if zone is None else end.astimezone(zone)
        midnight = (local + _DAY).replace(hour=0, minute=0, second=0, microsecond=0)
        end = midnight if zone is None else midnight.astimezone(at.tzinfo)
    return end


def next_spend_change(
    orders: dict[str, Order], history: tuple[SpendMark, ...], at: datetime, window: int,
    zone: tzinfo | None = None,
) -> datetime | None:  # fmt: skip
    """The first moment after `at` at which the rolling spend at `at` no longer stands by
    time alone; None: it stands for good.

    The spend drops when the oldest order counted at `at` (net of refunds, a forgotten
    one too) leaves the window (`leaves_window`); every later one leaves no earlier. A
    report dated before later orders (a late event's) missed them: from the latest
    order's moment on they all count. Orders and marks are kept oldest first and the
    evaluator forgets orders a window behind the member's latest event, so this reads the
    first order or two, not them all: the rules service computes it at every tier report.
    The answer is always after `at`, so a sweep that reports at it moves on.
    """
    oldest: datetime | None = None
    start: datetime | None = None
    if history:
        start = months_later(at, -window, zone)
        for m in reversed(history):  # newest first: usually none is in the window
            if m.at <= start:
                break
            if m.at <= at:
                oldest = m.at
    for o in orders.values():  # oldest first
        if o.at > at or (oldest is not None and o.at >= oldest):
            break
        if o.amount - o.refunded <= 0:
            continue
        # Within 28 days a month of `at` (a day's slack for a summer-time hour) an order
        # is counted for sure: the window's start is only worth computing past that.
        if (at - o.at).days < 28 * window - 1:
            oldest = o.at
            break
        if start is None:
            start = months_later(at, -window, zone)
        if o.at > start:
            oldest = o.at
            break
    change = None if oldest is None else leaves_window(oldest, window, zone)
    if orders:
        latest = next(reversed(orders.values())).at
        if latest > at and (change is None or latest < change):
            change = latest
    if change is not None and change <= at:  # the calendar ran back (`_GAP`): move on
        change = at + _GAP
    return change


# The default context's precision and traps, and a rounded sum raises (`SpendIndex`).
_EXACT = Context(prec=28, traps=[Inexact, InvalidOperation, DivisionByZero, Overflow])


class SpendIndex:
    """Net spend by moment as running totals, for a refund's replay of the tier.

    The replay asks for the rolling spend at every later order and expiry of the member;
    summing the orders each time made one refund cost orders² (a member with 300 orders
    a quarter: most of a backtest's time). With running totals a window is two
    bisections. Orders and forgotten spend are each kept oldest first already, so the
    sort that merges them is one pass.

    A difference of totals is the window's sum only while every total is exact: nets are
    never negative, so if the last total fits the context's 28 digits, every total and
    every difference of two does. Amounts past that (the contract caps no amount's digits)
    are summed window by window as before, rounding as before.
    """

    __slots__ = ("_ats", "_history", "_orders", "_sums", "_zone")

    def __init__(
        self, orders: Mapping[str, Order], history: tuple[SpendMark, ...], zone: tzinfo | None
    ) -> None:
        self._orders, self._history, self._zone = orders, history, zone
        moments: list[tuple[datetime, Decimal]] = []
        for o in orders.values():
            refunded = o.refunded
            moments.append((o.at, o.amount - refunded if refunded else o.amount))
        moments.extend((m.at, m.net) for m in history)
        moments.sort(key=_moment)
        sums: list[Decimal] = [Decimal(0)]
        ats: list[datetime] | None = None
        try:
            with localcontext(_EXACT):
                total = Decimal(0)
                for _, net in moments:
                    total += net
                    sums.append(total)
            ats = [at for at, _ in moments]
        except Inexact:
            pass  # summed window by window instead
        self._ats = ats
        self._sums = sums

    def spend(self, at: datetime, window: int, start: datetime | None = None) -> Decimal:
        """What `window_spend(orders, history, at, window, zone, start)` sums: (start, at],
        the start `window` months before `at` unless given."""
        ats = self._ats
        if ats is None:
            return window_spend(self._orders, self._history, at, window, self._zone, start)
        if start is None:
            start = months_later(at, -window, self._zone)
        sums = self._sums
        return sums[bisect_right(ats, at)] - sums[bisect_right(ats, start)]


def _moment(m: tuple[datetime, Decimal]) -> datetime:
    return m[0]


def expiry_window_start(until: datetime, rules: TierRules, zone: tzinfo | None) -> datetime:
    """Where the window re-deciding a tier at its expiry `until` starts.

    The tier was last qualified for `keep_months` before `until`. When the window is as
    long as the months kept, it is meant to start right after that moment, so the order
    that qualified is not counted again; but where clipping made several days end on
    `until` (29 February and 28 February both + 12 months), `window_months` back from
    `until` is the earliest of them. So the window starts at the latest: without this,
    one order of 29 February held the tier two years. With other lengths the rolling
    window is all there is (a window longer than the months kept counts the qualifying
    order again by design; a shorter one is a month or more past it).
    """
    start = months_later(until, -rules.window_months, zone)
    if rules.keep_months != rules.window_months:
        return start
    return max(start, latest_start(until, rules.keep_months, zone))


def _caught_up(
    tier: Tier, until: datetime | None, orders: Mapping[str, Order], at: datetime,
    rules: TierRules, history: tuple[SpendMark, ...] = (), rules_at: TiersAt | None = None,
    zone: tzinfo | None = None, index: SpendIndex | None = None,
) -> tuple[Tier, datetime | None]:  # fmt: skip
    """Every tier expiry up to `at`, each re-evaluated on the spend at its own moment,
    under the version in force then (`rules_at`, else `rules`)."""
    while until is not None and until <= at:
        r = rules if rules_at is None else rules_at(until)
        start = expiry_window_start(until, r, zone)
        spend = (
            window_spend(orders, history, until, r.window_months, zone, start)
            if index is None
            else index.spend(until, r.window_months, start)
        )
        q = qualified_tier(spend, r)
        tier = q if rank(q) < rank(tier) else tier
        until = _hold(tier, until, r, zone)
    return tier, until


def catch_up(
    state: MemberState, at: datetime, rules: TierRules, rules_at: TiersAt | None = None,
    zone: tzinfo | None = None,
) -> MemberState:  # fmt: skip
    """Apply every tier expiry up to `at`, each re-evaluated on the spend at its moment
    under the version in force then."""
    tier, until = _caught_up(state.tier, state.tier_valid_until, state.orders, at, rules,
                             state.spend_history, rules_at, zone)  # fmt: skip
    if tier == state.tier and until == state.tier_valid_until:
        return state
    checked = state.tier_checked_at
    return replace(state, tier=tier, tier_valid_until=until,
                   tier_checked_at=at if checked is None or checked < at else checked)  # fmt: skip


def after_refund(
    state: MemberState, order: Order, at: datetime, rules: TierRules,
    rules_at: TiersAt | None = None, zone: tzinfo | None = None,
) -> MemberState:  # fmt: skip
    """The tier re-decided as if the refunded money had never been paid.

    Tier follows spend net of refunds, so the refund reaches back to its order: from the
    tier the member held just before that order (recorded on it), every order from then
    on is replayed at its own moment with its amount net of refunds (an order refunded in
    full as if never placed), with the expiries between them as `catch_up` applies them.
    So an upgrade that needed the refunded money is undone whichever order crossed the
    threshold, and a refund does not restart a tier's 12 months. The replayed orders
    record the tiers of the replay, so a later refund of one of them starts right. Each
    order and expiry is decided under the version in force at its moment (`rules_at`).
    """
    orders, history, since = state.orders, state.spend_history, state.spend_since
    if since is not None and months_later(order.at, -rules.window_months, zone) < since:
        return _without_replay(state, order, at, rules, zone)
    tier, until = order.tier_before, order.valid_until_before
    replayed: dict[str, Order] = {}
    started = False
    index = SpendIndex(orders, history, zone)
    for key, o in orders.items():  # oldest first: the refunded order, then those after it
        started = started or key == order.order_id
        if not started or o.amount - o.refunded <= 0:
            continue
        tier, until = _caught_up(tier, until, orders, o.at, rules, history, rules_at, zone,
                                 index)  # fmt: skip
        before, until_before = tier, until
        r = rules if rules_at is None else rules_at(o.at)
        q = qualified_tier(index.spend(o.at, r.window_months), r)
        tier, until = on_qualifying(tier, until, q, o.at, r, zone)
        if (o.tier_before, o.tier_after, o.valid_until_before) != (before, tier, until_before):
            replayed[key] = replace(o, tier_before=before, tier_after=tier,
                                    valid_until_before=until_before)  # fmt: skip
    # Up to the refund, or to any later moment expiries were already applied up to: the
    # tier's clock never goes back (an expiry reported stays applied).
    checked = state.tier_checked_at
    tier, until = _caught_up(tier, until, orders, at if checked is None else max(at, checked),
                             rules, history, rules_at, zone, index)  # fmt: skip
    if replayed:
        state = replace(state, orders={k: replayed.get(k, o) for k, o in orders.items()})
    if tier == state.tier and until == state.tier_valid_until:
        return state
    return replace(state, tier=tier, tier_valid_until=until)


def held_at(
    state: MemberState, at: datetime, rules: TierRules, rules_at: TiersAt | None = None,
    zone: tzinfo | None = None,
) -> tuple[Tier, datetime | None] | None:  # fmt: skip
    """The tier held just before `at` and its end, for a purchase delivered after ones
    dated later (or after a later tier expiry): from the tier the member's last order
    before `at` records it started from, that order qualified at its moment, then the
    expiries up to `at`. With no order before `at` and no spend forgotten, nothing was
    spent before it: "member". None when the orders kept cannot tell (the orders before
    `at` are forgotten, their tiers with them)."""
    orders, history = state.orders, state.spend_history
    before: Order | None = None
    for o in orders.values():  # oldest first
        if o.at > at:
            break
        if o.amount - o.refunded > 0:  # a replay skips one refunded in full: its record too
            before = o
    if before is not None:
        r = rules if rules_at is None else rules_at(before.at)
        q = qualified_tier(window_spend(orders, history, before.at, r.window_months, zone), r)
        tier, until = on_qualifying(before.tier_before, before.valid_until_before, q,
                                    before.at, r, zone)  # fmt: skip
    elif not history and state.spend_since is None:
        tier, until = "member", None
    else:
        return None
    return _caught_up(tier, until, orders, at, rules, history, rules_at, zone)


def _without_replay(
    state: MemberState, order: Order, at: datetime, rules: TierRules, zone: tzinfo | None
) -> MemberState:
    """A refund whose order's window reaches back past the spend no longer known (state
    written before `spend_history` existed): the replay would count too little. Decided on
    the spend in the window at the refund (all still here): a tier still qualified for
    stands, unchanged; one the refunded order itself reached and that no longer qualifies
    is undone."""
    q = qualified_tier(rolling_spend(state.orders, at, rules.window_months, zone), rules)
    if rank(q) >= rank(state.tier):
        return state
    caused = order.tier_after == state.tier and rank(order.tier_after) > rank(order.tier_before)
    if not caused:
        return state
    if rank(q) >= rank(order.tier_before):
        return replace(state, tier=q, tier_valid_until=_hold(q, order.at, rules, zone))
    until = order.valid_until_before if order.tier_before != "member" else None
    return replace(state, tier=order.tier_before, tier_valid_until=until)
