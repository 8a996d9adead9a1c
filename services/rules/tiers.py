"""Tier logic: rolling 12-month net spend, immediate upgrades, 12 months of grace.

Tiers are evaluated only when an event arrives (the core has no clock), but an expiry
that fell between two events is replayed at its own moment (`catch_up`), so the outcome
does not depend on when the member next shows up.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal

from schemas.grants import TIERS, Tier
from services.rules.pruning import add_months
from services.rules.ruleset import TierRules
from services.rules.state import MemberState, Order, replace

_RANK: dict[str, int] = {t: i for i, t in enumerate(TIERS)}


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


def rolling_spend(orders: Mapping[str, Order], at: datetime, window_months: int) -> Decimal:
    """Net spend of orders in (at - window, at]: refunds already reduce each order.

    Every purchase sums a member's orders (in both lanes of a backtest), so the loop skips
    the subtraction for orders with nothing refunded, most of them.
    """
    start = add_months(at, -window_months)
    total = Decimal(0)
    for o in orders.values():
        if start < o.at <= at:
            refunded = o.refunded
            total += o.amount - refunded if refunded else o.amount
    return total


def hold_until(tier: Tier, since: datetime, rules: TierRules) -> datetime | None:
    """When a tier reached at `since` expires; "member" is the floor: nothing to expire."""
    return None if tier == "member" else add_months(since, rules.keep_months)


_hold = hold_until


def catch_up(state: MemberState, at: datetime, rules: TierRules) -> MemberState:
    """Apply every tier expiry up to `at`, each re-evaluated on the spend at its moment."""
    tier, until = state.tier, state.tier_valid_until
    while until is not None and until <= at:
        spend = rolling_spend(state.orders, until, rules.window_months)
        q = qualified_tier(spend, rules)
        tier = q if rank(q) < rank(tier) else tier
        until = _hold(tier, until, rules)
    if tier == state.tier and until == state.tier_valid_until:
        return state
    return replace(state, tier=tier, tier_valid_until=until)


def after_purchase(state: MemberState, at: datetime, rules: TierRules) -> MemberState:
    """Upgrade at once; qualifying again for the current tier restarts its 12 months."""
    q = qualified_tier(rolling_spend(state.orders, at, rules.window_months), rules)
    if rank(q) < rank(state.tier):
        return state
    return replace(state, tier=q, tier_valid_until=_hold(q, at, rules))


def after_refund(state: MemberState, order: Order, at: datetime, rules: TierRules) -> MemberState:
    """A refund cannot leave a tier standing on spend that no longer exists.

    Only the upgrade the refunded order itself caused is undone; a tier reached earlier
    keeps its 12 months of grace, as any tier does when old spend leaves the window.
    """
    q = qualified_tier(rolling_spend(state.orders, at, rules.window_months), rules)
    if rank(q) >= rank(state.tier):
        return after_purchase(state, at, rules)
    caused = order.tier_after == state.tier and rank(order.tier_after) > rank(order.tier_before)
    if not caused:
        return state
    if rank(q) >= rank(order.tier_before):
        return replace(state, tier=q, tier_valid_until=_hold(q, at, rules))
    until = order.valid_until_before if order.tier_before != "member" else None
    return replace(state, tier=order.tier_before, tier_valid_until=until)
