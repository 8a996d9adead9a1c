"""Forgetting what can no longer influence a rule, so a member's state stays small.

Kept apart from the state types (`state.py`, msgspec structs) because this runs on every
event and is compiled with the rest of the evaluator (see services/common/native.py);
the struct definitions stay plain Python.
"""

from __future__ import annotations

import calendar
from datetime import date, datetime, timedelta, tzinfo
from typing import Any, Final, TypeVar

from services.rules.state import (
    MemberState,
    Order,
    ReviewMark,
    SpendMark,
    counter_day,
    order_at,
    replace,
    review_day,
    seen_day,
)

D = TypeVar("D", date, datetime)
# Day counters (engagement points, shares) are kept this long after their day, so an
# engagement event that comes late, or a burst that ops release after review, still meets
# the day's cap. An event for a day older than the counters kept earns no capped points
# (`MemberState.counters_since`).
COUNTER_DAYS: Final = timedelta(days=35)
_ONE_DAY: Final = timedelta(days=1)


def add_months(dt: D, months: int) -> D:
    """Calendar months, clipping to month end (31 Jan + 1 month = 28/29 Feb)."""
    total = dt.month - 1 + months
    year, month = dt.year + total // 12, total % 12 + 1
    day = dt.day
    if day > 28:
        day = min(day, calendar.monthrange(year, month)[1])
    return dt.replace(year=year, month=month, day=day)


def months_later(moment: datetime, months: int, zone: tzinfo | None = None) -> datetime:
    """`moment` plus calendar months counted on `zone`'s calendar, in `moment`'s offset.

    The rule set's zone (DOMAIN: days are Asia/Shanghai days): a producer's UTC stamp for
    01:00 on 1 March in Shanghai still reads 28 February, and counted there a tier held 12
    months would lapse on 29 February of a leap year, a day early. None: `moment`'s own
    calendar. The result keeps `moment`'s offset, so stored times and ids that print it
    read as before.
    """
    if zone is None:
        return add_months(moment, months)
    offset = moment.utcoffset()
    if offset == zone.utcoffset(moment):
        # Written in the zone's offset (the usual case): its calendar as it reads, at a
        # fifth of the cost of converting there and back (this runs on every purchase),
        # unless the zone's offset changes in between (summer time).
        later = add_months(moment, months)
        if zone.utcoffset(later) == offset:
            return later
    return add_months(moment.astimezone(zone), months).astimezone(moment.tzinfo)


def latest_start(end: datetime, months: int, zone: tzinfo | None = None) -> datetime:
    """The latest moment `months` before `end`: the latest whose `months_later` is `end`.

    Clipping maps several days onto a month's last day (29 February + 12 months = 28
    February), so `months_later(end, -months)` is the earliest of them, not the latest: a
    tier reached on 29 February and held to 28 February would be re-decided on a window
    that still holds the very order that reached it. Same wall time, the earlier month's
    last day, when `end` is on its month's last day.
    """
    start = months_later(end, -months, zone)
    local_end = end if zone is None else end.astimezone(zone)
    day = local_end.day
    if day < 28 or day != calendar.monthrange(local_end.year, local_end.month)[1]:
        return start
    local_start = start if zone is None else start.astimezone(zone)
    last = calendar.monthrange(local_start.year, local_start.month)[1]
    if local_start.day == last:
        return start
    moved = local_start.replace(day=last)
    return moved if zone is None else moved.astimezone(end.tzinfo)


_DAY_BOUNDS: dict[tuple[date, int], tuple[date, date]] = {}


def _day_bounds(today: date, keep_months: int) -> tuple[date, date]:
    """(oldest day counter kept, newest id-dedupe day dropped) for `today`: the same for
    every event of a day, so computed once per day (a pure function of its key)."""
    key = (today, keep_months)
    known = _DAY_BOUNDS.get(key)
    if known is None:
        if len(_DAY_BOUNDS) > 4096:
            _DAY_BOUNDS.clear()
        known = _DAY_BOUNDS[key] = (today - COUNTER_DAYS, add_months(today, -keep_months))
    return known


def prune(
    state: MemberState, now: datetime, today: date, keep_months: int, history_months: int,
    zone: tzinfo | None = None,
) -> MemberState:  # fmt: skip
    """Forget what can no longer influence a rule, so the JSONB row stays small.

    Every dated map of the state iterates oldest first (see `in_day_order`), so whether a
    map holds anything stale is a look at its first entry, not a scan: this runs on every
    event, and most events prune nothing. A map is rebuilt only when it holds something
    stale (the same result as always rebuilding).
    """
    changes: dict[str, Any] = {}
    by_day, shares_by_day = state.engagement_by_day, state.shares_by_day
    shares_paid, reviews, visits = state.shares_paid, state.reviews, state.visits_seen
    if by_day or shares_by_day or shares_paid or reviews or visits:
        # Day counters: kept while day >= today - COUNTER_DAYS. Dropping one moves
        # `counters_since` up: the days before it have lost their counts.
        oldest_counter, day_horizon = _day_bounds(today, keep_months)
        if by_day and next(iter(by_day)) < oldest_counter:
            changes["engagement_by_day"] = {d: v for d, v in by_day.items() if d >= oldest_counter}
        if shares_by_day and next(iter(shares_by_day)) < oldest_counter:
            changes["shares_by_day"] = {
                d: v for d, v in shares_by_day.items() if d >= oldest_counter
            }
        since = state.counters_since
        if changes and (since is None or since < oldest_counter):  # only counters so far
            changes["counters_since"] = oldest_counter
        forgot = False
        if shares_paid and next(iter(shares_paid.values())) <= day_horizon:
            changes["shares_paid"] = {k: d for k, d in shares_paid.items() if d > day_horizon}
            forgot = True
        if reviews and next(iter(reviews.values())).day <= day_horizon:
            changes["reviews"] = {k: r for k, r in reviews.items() if r.day > day_horizon}
            forgot = True
        if visits and next(iter(visits.values())) <= day_horizon:
            changes["visits_seen"] = {k: d for k, d in visits.items() if d > day_horizon}
            forgot = True
        if forgot and (state.ids_since is None or state.ids_since < day_horizon):
            changes["ids_since"] = day_horizon
    runs, known_from = state.sign_in_runs, state.sign_in_known_from
    if runs and runs[0].last < today - COUNTER_DAYS - _ONE_DAY:
        # A run that ended before the day before the counters' horizon can no longer be
        # joined by a day that pays (one that old earns nothing capped): forgotten.
        horizon = today - COUNTER_DAYS - _ONE_DAY
        changes["sign_in_runs"] = tuple(r for r in runs if r.last >= horizon)
    if known_from is not None and known_from < today - COUNTER_DAYS:
        changes["sign_in_known_from"] = None  # the days before the horizon pay nothing anyway
    orders = state.orders
    if orders:
        oldest = next(iter(orders.values())).at
        # `keep_months` back is at least 28 days a month (one day of slack for a DST hour):
        # the exact calendar horizon is only worth computing past that.
        if (now - oldest).days >= 28 * keep_months - 1:
            horizon = months_later(now, -keep_months, zone)
            if oldest <= horizon:
                changes["orders"] = {k: o for k, o in orders.items() if o.at > horizon}
                gone = [SpendMark(at=o.at, net=o.amount - o.refunded)
                        for o in orders.values() if o.at <= horizon]  # fmt: skip
                marks = [*state.spend_history, *(m for m in gone if m.net > 0)]
                # Oldest first; an order that came late can be older than what went before.
                marks.sort(key=spend_at)
                changes["spend_history"] = tuple(marks)
    early = state.early_refunds
    if early and (now - min(r.at for r in early)).days >= 28 * keep_months - 1:
        # A refund waits for its order as long as an order is kept: one older than that
        # is of an order forgotten already (or never sent).
        horizon = months_later(now, -keep_months, zone)
        changes["early_refunds"] = tuple(r for r in early if r.at > horizon)
    history: tuple[SpendMark, ...] = changes.get("spend_history", state.spend_history)
    if history and (now - history[0].at).days >= 28 * history_months - 1:
        forget = months_later(now, -history_months, zone)
        if history[0].at <= forget:
            changes["spend_history"] = tuple(m for m in history if m.at > forget)
            since = state.spend_since
            if since is None or since < forget:
                changes["spend_since"] = forget
    return replace(state, **changes) if changes else state


# Inserting into the dated maps keeps them oldest first. Events mostly arrive in time
# order, so an insert is an append; an event from the past re-sorts that one map.


def spend_at(mark: SpendMark) -> datetime:
    return mark.at


def put_count(counts: dict[date, int], day: date, value: int) -> dict[date, int]:
    """A day counter map with `day` set (engagement and shares per day)."""
    if day in counts or not counts or next(reversed(counts)) < day:
        return {**counts, day: value}
    return dict(sorted([*counts.items(), (day, value)], key=counter_day))


def put_day(seen: dict[str, date], key: str, day: date) -> dict[str, date]:
    """An id-dedupe map (visits, shares paid) with `key` seen on `day`."""
    if key not in seen and (not seen or next(reversed(seen.values())) <= day):
        return {**seen, key: day}
    return dict(sorted({**seen, key: day}.items(), key=seen_day))


def put_review(reviews: dict[str, ReviewMark], key: str, mark: ReviewMark) -> dict[str, ReviewMark]:
    old = reviews.get(key)
    if (old is not None and old.day == mark.day) or (
        old is None and (not reviews or next(reversed(reviews.values())).day <= mark.day)
    ):
        return {**reviews, key: mark}
    return dict(sorted({**reviews, key: mark}.items(), key=review_day))


def put_order(orders: dict[str, Order], order: Order) -> dict[str, Order]:
    key = order.order_id
    old = orders.get(key)
    if (old is not None and old.at == order.at) or (
        old is None and (not orders or next(reversed(orders.values())).at <= order.at)
    ):
        return {**orders, key: order}
    return dict(sorted({**orders, key: order}.items(), key=order_at))
