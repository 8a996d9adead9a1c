"""Purchase and refund rules: base points, purchase bonuses, referral payouts.

A purchase records how it was priced (rate, factors, bonus candidates, rule-set version)
on its order, so a later refund is recomputed under the rules of the purchase, not of
the refund, and a full refund takes back exactly what the purchase paid.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from decimal import Decimal

from schemas.activity import Purchase, Refund
from schemas.grants import GrantEvent
from services.rules import tiers
from services.rules.emit import granted, revoked
from services.rules.ruleset import PurchaseRules, RuleSet
from services.rules.state import BigTicketSnapshot, MemberState, Order, OtherPaid, evolve, trusted

_SNAPSHOTS: dict[int, tuple[PurchaseRules, tuple[BigTicketSnapshot, ...]]] = {}


def _snapshots(rules: PurchaseRules) -> tuple[BigTicketSnapshot, ...]:
    """The big-ticket steps as stored on an order, built once per (immutable) rule set."""
    known = _SNAPSHOTS.get(id(rules))
    if known is None or known[0] is not rules:
        steps = tuple(
            BigTicketSnapshot(min_amount=s.min_amount, points=s.points) for s in rules.big_ticket
        )
        if len(_SNAPSHOTS) > 64:  # rule sets are few; bound the cache anyway
            _SNAPSHOTS.clear()
        known = _SNAPSHOTS[id(rules)] = (rules, steps)
    return known[1]


def floor_points(value: Decimal) -> int:
    return max(math.floor(value), 0)


def big_ticket_points(amount: Decimal, steps: Iterable[BigTicketSnapshot]) -> int:
    """Steps carry totals (+100 at 1,000; +600 at 3,000): the highest step reached wins."""
    return max((s.points for s in steps if amount >= s.min_amount), default=0)


def select_bonuses(candidates: Mapping[str, int], stack: bool) -> dict[str, int]:
    """Non-stacking pays only the largest; ties go to the first rule in rule-set order."""
    positive = {k: v for k, v in candidates.items() if v > 0}
    if stack or not positive:
        return positive
    best = max(positive, key=lambda k: positive[k])
    return {best: positive[best]}


def _campaign_factor(event: Purchase, ruleset: RuleSet) -> Decimal:
    """Overlapping campaigns do not compound: the most generous one applies.

    A campaign limited to projects multiplies only the matching items' share of the
    amount paid (item amounts are used as weights, since discounts apply to the order).
    """
    items_total = sum((i.amount for i in event.data.items), Decimal(0))
    best: Decimal | None = None
    for c in ruleset.campaigns:
        if not c.starts_at <= event.occurred_at < c.ends_at:
            continue
        if c.store_ids is not None and event.store_id not in c.store_ids:
            continue
        share = Decimal(1)
        if c.project_codes is not None:
            codes = set(c.project_codes)
            matching = sum(
                (i.amount for i in event.data.items if i.project_code in codes), Decimal(0)
            )
            share = min(matching / items_total, Decimal(1)) if items_total > 0 else Decimal(0)
            if share == 0:
                continue
        factor = 1 + (c.multiplier - 1) * share
        best = factor if best is None else max(best, factor)
    return Decimal(1) if best is None else best


def _birthday_factor(state: MemberState, event: Purchase, ruleset: RuleSet) -> Decimal:
    if state.birthday is None:
        return Decimal(1)
    local = event.occurred_at.astimezone(ruleset.zone)
    same_month = int(state.birthday[:2]) == local.month
    return ruleset.purchase.birthday_multiplier if same_month else Decimal(1)


def on_purchase(
    state: MemberState, event: Purchase, ruleset: RuleSet, referrers: Mapping[str, str | None]
) -> tuple[MemberState, list[GrantEvent]]:
    """Earn at the tier held before this purchase; the upgrade applies from the next one."""
    d, ids, pr = event.data, ruleset.rule_ids, ruleset.purchase
    if d.order_id in state.orders or d.amount <= 0:
        return state, []
    factors = {
        "points_per_cny": pr.points_per_cny,
        "tier": ruleset.tiers.multipliers[state.tier],
        "birthday": _birthday_factor(state, event, ruleset),
        "campaign": _campaign_factor(event, ruleset),
    }
    rate = math.prod(factors.values(), start=Decimal(1))
    codes = {i.project_code for i in d.items}
    fresh = sorted(c for c in codes & set(pr.new_projects) if c not in state.new_projects_bought)
    fixed = {
        ids.first_purchase: 0 if state.first_purchase_done else pr.first_purchase_points,
        ids.new_project: pr.new_project_points * len(fresh),
        ids.combo: sum(c.points for c in pr.combos if set(c.projects) <= codes),
    }
    steps = _snapshots(pr)
    candidates = {ids.big_ticket: big_ticket_points(d.amount, steps), **fixed}
    paid = {ids.base: floor_points(d.amount * rate)}
    paid.update(select_bonuses(candidates, pr.stack_purchase_bonuses))

    others: list[OtherPaid] = []
    referral_due = state.referrer_id is not None and not state.referral_paid
    referral_due = referral_due and not state.first_purchase_done
    if referral_due and state.referrer_id is not None:
        rr = ruleset.referral
        paid[ids.referral_new_member] = rr.new_member_points
        others.append(
            trusted(
                OtherPaid,
                member_id=state.referrer_id,
                rule_id=ids.referral_referrer,
                points=rr.referrer_points,
            )
        )
        indirect = referrers.get(state.referrer_id)
        if indirect is not None and indirect not in {state.referrer_id, event.member_id}:
            others.append(
                trusted(
                    OtherPaid,
                    member_id=indirect,
                    rule_id=ids.referral_indirect,
                    points=rr.indirect_points,
                )
            )
    paid = {k: v for k, v in paid.items() if v > 0}
    others = [o for o in others if o.points > 0]

    order = trusted(
        Order, order_id=d.order_id, at=event.occurred_at, amount=d.amount,
        ruleset_version=ruleset.version, store_id=event.store_id, base_rate=rate,
        factors=factors, fixed_bonuses=fixed, big_ticket=steps, base_rule=ids.base,
        big_ticket_rule=ids.big_ticket, stack=pr.stack_purchase_bonuses, paid=paid,
        others=tuple(others), tier_before=state.tier, tier_after=state.tier,
        valid_until_before=state.tier_valid_until,
    )  # fmt: skip
    new = evolve(
        state,
        orders={**state.orders, d.order_id: order},
        first_purchase_done=True,
        new_projects_bought=(*state.new_projects_bought, *fresh),
        referral_paid=state.referral_paid or referral_due,
    )
    new = tiers.after_purchase(new, event.occurred_at, ruleset.tiers)
    order = evolve(order, tier_after=new.tier)
    new = evolve(new, orders={**new.orders, d.order_id: order})

    grants: list[GrantEvent] = []
    for rule_id, points in paid.items():
        grants += granted(event, ruleset, rule_id, points, order_id=d.order_id)
    for o in others:
        grants += granted(event, ruleset, o.rule_id, o.points, member_id=o.member_id,
                          order_id=d.order_id)  # fmt: skip
    return new, grants


def _targets(order: Order, net: Decimal) -> dict[str, int]:
    """What the order would have earned had only `net` been paid, bonuses included."""
    if net <= 0:
        return {}
    candidates = {order.big_ticket_rule: big_ticket_points(net, order.big_ticket)}
    candidates.update(order.fixed_bonuses)
    targets = {order.base_rule: floor_points(net * order.base_rate)}
    targets.update(select_bonuses(candidates, order.stack))
    # Referral points are a fixed reward for becoming a customer: kept unless fully refunded.
    bonus_rules = {order.base_rule, *candidates}
    targets.update({k: v for k, v in order.paid.items() if k not in bonus_rules})
    return targets


def on_refund(
    state: MemberState, event: Refund, ruleset: RuleSet
) -> tuple[MemberState, list[GrantEvent]]:
    """Proportional take-back; refunds past the order's amount, or of unknown orders, do nothing."""
    order = state.orders.get(event.data.order_id)
    if order is None:
        return state, []
    effective = min(event.data.amount, order.net)
    if effective <= 0:
        return state, []
    order = evolve(order, refunded=order.refunded + effective)
    targets = _targets(order, order.net)
    grants: list[GrantEvent] = []
    oid, version = order.order_id, order.ruleset_version
    for rule_id in sorted({*order.paid, *targets}):
        diff = targets.get(rule_id, 0) - order.paid.get(rule_id, 0)
        if diff < 0:
            grants += revoked(event, rule_id, -diff, order_id=oid, version=version)
        elif diff > 0:
            grants += granted(event, ruleset, rule_id, diff, order_id=oid, version=version)
    others = order.others
    if order.net <= 0:
        for o in others:
            grants += revoked(event, o.rule_id, o.points, order_id=oid, version=version,
                              member_id=o.member_id)  # fmt: skip
        others = ()
    order = evolve(order, paid=targets, others=others)
    new = evolve(state, orders={**state.orders, oid: order})
    return tiers.after_refund(new, order, event.occurred_at, ruleset.tiers), grants
