"""Per-member memory the rules need between events, stored by the adapter as JSONB.

Everything here is what a later event must know about earlier ones (streaks, first
purchase, paid share ids, what an order earned so a refund can be recomputed). It is
kept compact: day counters and old orders are pruned as events move time forward.

The types are frozen msgspec structs, not pydantic models: the evaluator copies the state
several times per event (`replace`) and the backtest runs it for every recorded event in
two lanes, where pydantic's copies cost most of the time. The JSON (`dump_state` /
`load_state`) omits default values, so a row holds only what a member has actually done.
"""

from __future__ import annotations

import calendar
from datetime import date, datetime, timedelta
from decimal import Decimal
from operator import attrgetter
from typing import Any, Final, TypeVar

import msgspec
from msgspec.structs import replace
from pydantic import BaseModel

from schemas.grants import Tier

B = TypeVar("B", bound=BaseModel)
_DEFAULTS: dict[type[BaseModel], tuple[dict[str, Any], dict[str, Any], frozenset[str]]] = {}

__all__ = ["replace"]


def _defaults(cls: type[BaseModel]) -> tuple[dict[str, Any], dict[str, Any], frozenset[str]]:
    known = _DEFAULTS.get(cls)
    if known is None:
        fields = cls.model_fields
        plain = {
            n: f.default
            for n, f in fields.items()
            if not f.is_required() and f.default_factory is None
        }
        factories = {n: f.default_factory for n, f in fields.items() if f.default_factory}
        required = frozenset(n for n, f in fields.items() if f.is_required())
        known = _DEFAULTS[cls] = (plain, factories, required)
    return known


def trusted(cls: type[B], **values: Any) -> B:
    """Build a pydantic model (a grant event) from values the evaluator computed, unvalidated.

    The evaluator builds grants on the live path; validating values it typed itself
    (mypy strict) cost most of its time. A unit test checks that what this builds equals
    the validated model and serialises identically.
    """
    plain, factories, required = _defaults(cls)
    if not required <= values.keys():
        raise TypeError(f"{cls.__name__}: missing {sorted(required - values.keys())}")
    # Field order matters: it is the order of the serialised JSON (byte-identical grants).
    fields: dict[str, Any] = {}
    for name in cls.model_fields:
        if name in values:
            fields[name] = values[name]
        elif name in plain:
            fields[name] = plain[name]
        else:
            fields[name] = factories[name]()
    new = cls.__new__(cls)
    object.__setattr__(new, "__dict__", fields)
    object.__setattr__(new, "__pydantic_fields_set__", set(values))
    object.__setattr__(new, "__pydantic_extra__", None)
    object.__setattr__(new, "__pydantic_private__", None)
    return new


# Every state type is frozen (lanes and callers may share states), keyword-only, omits
# defaults in JSON, refuses unknown keys, and is skipped by the cyclic GC (no cycles).
# (Spelled out per class: mypy reads struct options only from the class statement.)
class OtherPaid(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    omit_defaults=True,
    forbid_unknown_fields=True,
    gc=False,
):
    """Points an order paid to another member (referral), so a full refund can undo them."""

    member_id: str
    rule_id: str
    points: int


class BigTicketSnapshot(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    omit_defaults=True,
    forbid_unknown_fields=True,
    gc=False,
):
    min_amount: Decimal
    points: int


class Order(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    omit_defaults=True,
    forbid_unknown_fields=True,
    gc=False,
):
    """An order as it was priced, so refunds recompute under the rules of the purchase."""

    order_id: str
    at: datetime
    amount: Decimal
    refunded: Decimal = Decimal(0)
    ruleset_version: str
    store_id: str | None = None
    # Points per CNY after every factor; the factors themselves are kept for audit.
    base_rate: Decimal
    factors: dict[str, Decimal] = msgspec.field(default_factory=dict)
    # Amount-independent bonus candidates (first purchase, new project, combo).
    fixed_bonuses: dict[str, int] = msgspec.field(default_factory=dict)
    big_ticket: tuple[BigTicketSnapshot, ...] = ()
    base_rule: str = "base"
    big_ticket_rule: str = "big_ticket"
    stack: bool = False
    paid: dict[str, int] = msgspec.field(default_factory=dict)
    others: tuple[OtherPaid, ...] = ()
    tier_before: Tier = "member"
    tier_after: Tier = "member"
    valid_until_before: datetime | None = None

    @property
    def net(self) -> Decimal:
        return self.amount - self.refunded


class ReviewMark(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    omit_defaults=True,
    forbid_unknown_fields=True,
    gc=False,
):
    """What a review id has already been credited with, so a re-sent review pays once."""

    day: date
    points_due: int = 0
    suggestion: bool = False


class MemberState(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    omit_defaults=True,
    forbid_unknown_fields=True,
    gc=False,
):
    member_id: str
    tier: Tier = "member"
    tier_valid_until: datetime | None = None
    orders: dict[str, Order] = msgspec.field(default_factory=dict)
    first_purchase_done: bool = False
    new_projects_bought: tuple[str, ...] = ()
    visit_streak: int = 0
    visits_seen: dict[str, date] = msgspec.field(default_factory=dict)
    sign_in_last_day: date | None = None
    sign_in_streak: int = 0
    shares_paid: dict[str, date] = msgspec.field(default_factory=dict)
    shares_by_day: dict[date, int] = msgspec.field(default_factory=dict)
    reviews: dict[str, ReviewMark] = msgspec.field(default_factory=dict)
    engagement_by_day: dict[date, int] = msgspec.field(default_factory=dict)
    recent_engagement: tuple[datetime, ...] = ()
    referrer_id: str | None = None
    referral_paid: bool = False
    birthday: str | None = None


# Decimals as strings: "1.20" stays "1.20" (a JSON number would go through float).
_ENCODER: Final = msgspec.json.Encoder(decimal_format="string")
_DECODER: Final = msgspec.json.Decoder(MemberState)


def dump_state(state: MemberState) -> bytes:
    """The JSON stored in rules_member_state.state; `load_state` reads it back equal."""
    return _ENCODER.encode(state)


def load_state(raw: bytes | str) -> MemberState:
    """Raises msgspec.ValidationError / DecodeError on a row that is not a member state."""
    return _DECODER.decode(raw)


D = TypeVar("D", date, datetime)
_AT = attrgetter("at")
_DAY = attrgetter("day")
_TWO_DAYS: Final = timedelta(days=2)


def add_months(dt: D, months: int) -> D:
    """Calendar months, clipping to month end (31 Jan + 1 month = 28/29 Feb)."""
    total = dt.month - 1 + months
    year, month = dt.year + total // 12, total % 12 + 1
    day = dt.day
    if day > 28:
        day = min(day, calendar.monthrange(year, month)[1])
    return dt.replace(year=year, month=month, day=day)


_DAY_BOUNDS: dict[tuple[date, int], tuple[date, date]] = {}


def _day_bounds(today: date, keep_months: int) -> tuple[date, date]:
    """(oldest day counter kept, newest id-dedupe day dropped) for `today`: the same for
    every event of a day, so computed once per day (a pure function of its key)."""
    key = (today, keep_months)
    known = _DAY_BOUNDS.get(key)
    if known is None:
        if len(_DAY_BOUNDS) > 4096:
            _DAY_BOUNDS.clear()
        known = _DAY_BOUNDS[key] = (today - _TWO_DAYS, add_months(today, -keep_months))
    return known


def prune(state: MemberState, now: datetime, today: date, keep_months: int) -> MemberState:
    """Forget what can no longer influence a rule, so the JSONB row stays small.

    Most events prune nothing, so each map is rebuilt only when it holds something stale
    (the result is the same as always rebuilding, at a fraction of the cost).
    """
    changes: dict[str, Any] = {}
    by_day, shares_by_day = state.engagement_by_day, state.shares_by_day
    shares_paid, reviews, visits = state.shares_paid, state.reviews, state.visits_seen
    if by_day or shares_by_day or shares_paid or reviews or visits:
        # Day counters: kept while (today - day).days <= 2, i.e. day >= today - 2 days.
        oldest_counter, day_horizon = _day_bounds(today, keep_months)
        if by_day and min(by_day) < oldest_counter:
            changes["engagement_by_day"] = {d: v for d, v in by_day.items() if d >= oldest_counter}
        if shares_by_day and min(shares_by_day) < oldest_counter:
            changes["shares_by_day"] = {
                d: v for d, v in shares_by_day.items() if d >= oldest_counter
            }
        if shares_paid and min(shares_paid.values()) <= day_horizon:
            changes["shares_paid"] = {k: d for k, d in shares_paid.items() if d > day_horizon}
        if reviews and min(map(_DAY, reviews.values())) <= day_horizon:
            changes["reviews"] = {k: r for k, r in reviews.items() if r.day > day_horizon}
        if visits and min(visits.values()) <= day_horizon:
            changes["visits_seen"] = {k: d for k, d in visits.items() if d > day_horizon}
    orders = state.orders
    if orders:
        oldest = min(map(_AT, orders.values()))
        # `keep_months` back is at least 28 days a month (one day of slack for a DST hour):
        # the exact calendar horizon is only worth computing past that.
        if (now - oldest).days >= 28 * keep_months - 1:
            horizon = add_months(now, -keep_months)
            if oldest <= horizon:
                changes["orders"] = {k: o for k, o in orders.items() if o.at > horizon}
    return replace(state, **changes) if changes else state
