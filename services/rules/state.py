"""Per-member memory the rules need between events, stored by the adapter as JSONB.

Everything here is what a later event must know about earlier ones (streaks, first
purchase, paid share ids, what an order earned so a refund can be recomputed). It is
kept compact: day counters and old orders are pruned as events move time forward.
"""

from __future__ import annotations

import calendar
from datetime import date, datetime
from decimal import Decimal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from schemas.envelope import Money
from schemas.grants import Tier


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


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


def add_months(dt: datetime, months: int) -> datetime:
    """Calendar months, clipping to month end (31 Jan + 1 month = 28/29 Feb)."""
    total = dt.month - 1 + months
    year, month = dt.year + total // 12, total % 12 + 1
    day = min(dt.day, calendar.monthrange(year, month)[1])
    return dt.replace(year=year, month=month, day=day)


def prune(state: MemberState, now: datetime, today: date, keep_months: int) -> MemberState:
    """Forget what can no longer influence a rule, so the JSONB row stays small."""
    horizon = add_months(now, -keep_months)
    day_horizon = add_months(datetime(today.year, today.month, today.day), -keep_months).date()
    orders = {k: o for k, o in state.orders.items() if o.at > horizon}
    recent_days = {d: v for d, v in state.engagement_by_day.items() if (today - d).days <= 2}
    share_days = {d: v for d, v in state.shares_by_day.items() if (today - d).days <= 2}
    shares = {k: d for k, d in state.shares_paid.items() if d > day_horizon}
    reviews = {k: r for k, r in state.reviews.items() if r.day > day_horizon}
    visits = {k: d for k, d in state.visits_seen.items() if d > day_horizon}
    return state.model_copy(
        update={
            "orders": orders,
            "engagement_by_day": recent_days,
            "shares_by_day": share_days,
            "shares_paid": shares,
            "reviews": reviews,
            "visits_seen": visits,
        }
    )
