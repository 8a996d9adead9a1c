"""Per-member memory the rules need between events, stored by the adapter as JSONB.

Everything here is what a later event must know about earlier ones (streaks, first
purchase, paid share ids, what an order earned so a refund can be recomputed). It is
kept compact: day counters and old orders are pruned as events move time forward.
"""

from __future__ import annotations

import calendar
from datetime import date, datetime
from decimal import Decimal
from operator import attrgetter
from typing import Any, TypeVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from schemas.envelope import Money
from schemas.grants import Tier


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


M = TypeVar("M", bound=_Frozen)
B = TypeVar("B", bound=BaseModel)
_DEFAULTS: dict[type[BaseModel], tuple[dict[str, Any], dict[str, Any], frozenset[str]]] = {}


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
    """Build a model from values the evaluator computed, skipping validation.

    The evaluator builds several models per event (orders, grants); validating values
    it typed itself (mypy strict) cost most of its time. A unit test checks that what
    this builds equals the validated model and serialises identically.
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


def evolve(model: M, **changes: Any) -> M:
    """`model_copy(update=...)` minus its overhead: the evaluator copies state several times
    per event and the backtest runs it for every recorded event twice.

    Values are not validated (as with model_copy); callers pass the field's own types.
    """
    cls = type(model)
    new = cls.__new__(cls)
    fields = dict(model.__dict__)
    fields.update(changes)
    object.__setattr__(new, "__dict__", fields)
    object.__setattr__(
        new, "__pydantic_fields_set__", model.__pydantic_fields_set__ | changes.keys()
    )
    object.__setattr__(new, "__pydantic_extra__", None)
    object.__setattr__(new, "__pydantic_private__", None)
    return new


class OtherPaid(_Frozen):
    """Points an order paid to another member (referral), so a full refund can undo them."""

    member_id: str
    rule_id: str
    points: int


class BigTicketSnapshot(_Frozen):
    min_amount: Money
    points: int


class Order(_Frozen):
    """An order as it was priced, so refunds recompute under the rules of the purchase."""

    order_id: str
    at: AwareDatetime
    amount: Money
    refunded: Money = Decimal(0)
    ruleset_version: str
    store_id: str | None = None
    # Points per CNY after every factor; the factors themselves are kept for audit.
    base_rate: Decimal
    factors: dict[str, Decimal] = Field(default_factory=dict)
    # Amount-independent bonus candidates (first purchase, new project, combo).
    fixed_bonuses: dict[str, int] = Field(default_factory=dict)
    big_ticket: tuple[BigTicketSnapshot, ...] = ()
    base_rule: str = "base"
    big_ticket_rule: str = "big_ticket"
    stack: bool = False
    paid: dict[str, int] = Field(default_factory=dict)
    others: tuple[OtherPaid, ...] = ()
    tier_before: Tier = "member"
    tier_after: Tier = "member"
    valid_until_before: AwareDatetime | None = None

    @property
    def net(self) -> Decimal:
        return self.amount - self.refunded


class ReviewMark(_Frozen):
    """What a review id has already been credited with, so a re-sent review pays once."""

    day: date
    points_due: int = 0
    suggestion: bool = False


class MemberState(_Frozen):
    member_id: str
    tier: Tier = "member"
    tier_valid_until: AwareDatetime | None = None
    orders: dict[str, Order] = Field(default_factory=dict)
    first_purchase_done: bool = False
    new_projects_bought: tuple[str, ...] = ()
    visit_streak: int = 0
    visits_seen: dict[str, date] = Field(default_factory=dict)
    sign_in_last_day: date | None = None
    sign_in_streak: int = 0
    shares_paid: dict[str, date] = Field(default_factory=dict)
    shares_by_day: dict[date, int] = Field(default_factory=dict)
    reviews: dict[str, ReviewMark] = Field(default_factory=dict)
    engagement_by_day: dict[date, int] = Field(default_factory=dict)
    recent_engagement: tuple[AwareDatetime, ...] = ()
    referrer_id: str | None = None
    referral_paid: bool = False
    birthday: str | None = None


D = TypeVar("D", date, datetime)
_AT = attrgetter("at")
_DAY = attrgetter("day")


def add_months(dt: D, months: int) -> D:
    """Calendar months, clipping to month end (31 Jan + 1 month = 28/29 Feb)."""
    total = dt.month - 1 + months
    year, month = dt.year + total // 12, total % 12 + 1
    day = dt.day
    if day > 28:
        day = min(day, calendar.monthrange(year, month)[1])
    return dt.replace(year=year, month=month, day=day)


def prune(state: MemberState, now: datetime, today: date, keep_months: int) -> MemberState:
    """Forget what can no longer influence a rule, so the JSONB row stays small.

    Most events prune nothing, so each map is rebuilt only when it holds something stale
    (the result is the same as always rebuilding, at a fraction of the cost).
    """
    changes: dict[str, Any] = {}
    # min() over the keys/values runs in C; the comprehensions run only when needed.
    if state.engagement_by_day and (today - min(state.engagement_by_day)).days > 2:
        changes["engagement_by_day"] = {
            d: v for d, v in state.engagement_by_day.items() if (today - d).days <= 2
        }
    if state.shares_by_day and (today - min(state.shares_by_day)).days > 2:
        changes["shares_by_day"] = {
            d: v for d, v in state.shares_by_day.items() if (today - d).days <= 2
        }
    if state.orders:
        horizon = add_months(now, -keep_months)
        if min(map(_AT, state.orders.values())) <= horizon:
            changes["orders"] = {k: o for k, o in state.orders.items() if o.at > horizon}
    if state.shares_paid or state.reviews or state.visits_seen:
        day_horizon = add_months(today, -keep_months)
        if state.shares_paid and min(state.shares_paid.values()) <= day_horizon:
            changes["shares_paid"] = {k: d for k, d in state.shares_paid.items() if d > day_horizon}
        if state.reviews and min(map(_DAY, state.reviews.values())) <= day_horizon:
            changes["reviews"] = {k: r for k, r in state.reviews.items() if r.day > day_horizon}
        if state.visits_seen and min(state.visits_seen.values()) <= day_horizon:
            changes["visits_seen"] = {k: d for k, d in state.visits_seen.items() if d > day_horizon}
    return evolve(state, **changes) if changes else state
