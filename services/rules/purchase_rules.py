"""Purchase and refund rules: base points, purchase bonuses, referral payouts.

A purchase records how it was priced (rate, factors, bonus candidates, rule-set version)
on its order, so a later refund is recomputed under the rules of the purchase, not of
the refund, and a full refund takes back exactly what the purchase paid.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import date, datetime, tzinfo
from decimal import MAX_PREC, ROUND_FLOOR, Context, Decimal, localcontext
from typing import Final

from schemas.activity import Purchase, Refund
from services.rules import tiers
from services.rules.emit import GRANT, REVOKE, Payout
from services.rules.pruning import months_later, put_order
from services.rules.ruleset import PurchaseRules, RuleSet, derived
from services.rules.state import (
    BigTicketSnapshot,
    EarlyRefund,
    MemberState,
    Order,
    OtherPaid,
    replace,
)

_SNAPSHOTS: dict[int, tuple[PurchaseRules, tuple[BigTicketSnapshot, ...]]] = {}
_ZERO: Final = Decimal(0)
_ONE: Final = Decimal(1)
# Decimal digits for a project campaign's fraction (`base_points`): its products stay exact
# for any order a clinic takes, and the one division rounds far below a point.
EXACT_DIGITS: Final = 60


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


def base_points(amount: Decimal, rate: Decimal, divisor: Decimal = _ONE) -> int:
    """floor(amount x rate / divisor), rounded down only, never up, whatever the digits.

    `divisor` is 1 but for a project campaign (`_campaign_factor`). The product is exact
    (a context at the maximum precision sizes it by its operands), and the division
    rounds toward minus infinity at a precision holding every whole digit of the
    quotient, so the floor of the rounded quotient is the floor of the exact one. (Under
    the default context, 999.99999999999999999999999999 x 1.2 rounded to 1200 first.)
    """
    product = _EXACT_PRODUCT.multiply(amount, rate)
    if divisor == _ONE:
        return floor_points(product)
    whole_digits = product.adjusted() - divisor.adjusted() + 2
    ctx = _FLOOR if whole_digits <= EXACT_DIGITS else _floor_context(whole_digits + EXACT_DIGITS)
    return floor_points(ctx.divide(product, divisor))


def _floor_context(prec: int) -> Context:
    return Context(prec=prec, rounding=ROUND_FLOOR)


_EXACT_PRODUCT: Final = _floor_context(MAX_PREC)  # for products only: exact, never huge
_FLOOR: Final = _floor_context(EXACT_DIGITS)


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


def _campaign_factor(event: Purchase, ruleset: RuleSet) -> tuple[Decimal, Decimal]:
    """The campaign factor as an exact fraction (numerator, divisor).

    Overlapping campaigns do not compound: the most generous one applies. A campaign
    limited to projects multiplies only the matching items' share of the amount paid (item
    amounts are used as weights, since discounts apply to the order): its factor is
    (items + (multiplier - 1) x matching) / items, kept as a fraction because a share like
    1/3 as a Decimal (0.333...3) would pay 399 points where 400 are due.
    """
    if not ruleset.campaigns:
        return _ONE, _ONE
    with localcontext() as exact:
        exact.prec = EXACT_DIGITS  # the products here exact, however large the order
        return _most_generous(event, ruleset)


def _most_generous(event: Purchase, ruleset: RuleSet) -> tuple[Decimal, Decimal]:
    items_total = sum((i.amount for i in event.data.items), _ZERO)
    best: tuple[Decimal, Decimal] | None = None
    for c in ruleset.campaigns:
        if not c.starts_at <= event.occurred_at < c.ends_at:
            continue
        if c.store_ids is not None and event.store_id not in c.store_ids:
            continue
        factor = (c.multiplier, _ONE)
        if c.project_codes is not None:
            codes = set(c.project_codes)
            matching = sum((i.amount for i in event.data.items if i.project_code in codes), _ZERO)
            if items_total <= 0 or matching <= 0:
                continue
            if matching < items_total:
                factor = (items_total + (c.multiplier - 1) * matching, items_total)
        if best is None or factor[0] * best[1] > best[0] * factor[1]:
            best = factor
    return (_ONE, _ONE) if best is None else best


def _birthday_factor(state: MemberState, day: date, ruleset: RuleSet) -> Decimal:
    """`day` is the purchase's date in the rule set's zone (its month is the local month)."""
    if state.birthday is None:
        return _ONE
    same_month = int(state.birthday[:2]) == day.month
    return ruleset.purchase.birthday_multiplier if same_month else _ONE


def on_purchase(
    state: MemberState, event: Purchase, ruleset: RuleSet, referrers: Mapping[str, str | None],
    day: date, tiers_at: tiers.TiersAt | None = None,
) -> tuple[MemberState, list[Payout]]:  # fmt: skip
    """Earn at the tier held before this purchase; the upgrade applies from the next one.

    A purchase delivered after orders dated later (or after a later tier expiry) earns
    at the tier held at its own moment, and the member's tier is then replayed from it
    on, as a refund replays it (`tiers.after_refund`): what the orders would have made
    of it had they arrived in time order. The orders already paid keep their points.
    """
    d, ids, pr = event.data, ruleset.rule_ids, ruleset.purchase
    oid, amount, orders = d.order_id, d.amount, state.orders
    if oid in orders or amount <= 0:
        return state, []
    hot, member = derived(ruleset), event.member_id
    at, tr = event.occurred_at, ruleset.tiers
    tier, until_before = state.tier, state.tier_valid_until
    late = _late(state, at, tr.window_months, hot.zone)
    if late:
        held = tiers.held_at(state, at, tr, tiers_at, hot.zone)
        if held is None:
            late = False
        else:
            tier, until_before = held
    campaign, divisor = _campaign_factor(event, ruleset)
    factors = {
        "points_per_cny": pr.points_per_cny,
        "tier": ruleset.tiers.multipliers[tier],
        "birthday": _birthday_factor(state, day, ruleset),
        "campaign": campaign / divisor,  # for audit; the rate below keeps the fraction
    }
    rate = pr.points_per_cny * factors["tier"] * factors["birthday"]
    if divisor == _ONE:
        rate *= campaign
    else:
        with localcontext() as exact:
            exact.prec = EXACT_DIGITS
            rate *= campaign
    codes = {i.project_code for i in d.items}
    bought = state.new_projects_bought
    fresh = sorted(c for c in codes & hot.new_projects if c not in bought)
    fixed = {
        ids.first_purchase: 0 if state.first_purchase_done else pr.first_purchase_points,
        ids.new_project: pr.new_project_points * len(fresh),
        ids.combo: sum(points for projects, points in hot.combos if projects <= codes),
    }
    steps = _snapshots(pr)
    candidates = {ids.big_ticket: big_ticket_points(amount, steps), **fixed}
    paid = {ids.base: base_points(amount, rate, divisor)}
    paid.update(select_bonuses(candidates, pr.stack_purchase_bonuses))

    others: list[OtherPaid] = []
    referrer = state.referrer_id
    # Truthy, not `is not None`: a blank referrer stored before registrations refused it.
    referral_due = bool(referrer) and not state.referral_paid
    referral_due = referral_due and not state.first_purchase_done
    if referral_due and referrer is not None:
        rr = ruleset.referral
        paid[ids.referral_new_member] = rr.new_member_points
        if rr.referrer_points > 0:
            others.append(
                OtherPaid(member_id=referrer, rule_id=ids.referral_referrer,
                          points=rr.referrer_points)
            )  # fmt: skip
        indirect = referrers.get(referrer)
        if indirect and indirect not in {referrer, member} and rr.indirect_points > 0:
            others.append(
                OtherPaid(member_id=indirect, rule_id=ids.referral_indirect,
                          points=rr.indirect_points)
            )  # fmt: skip
    paid = {k: v for k, v in paid.items() if v > 0}

    # The tier after this purchase (an upgrade at once; qualifying again restarts the
    # tier's months): rolling spend is the earlier orders' plus this order's amount.
    spend = tiers.window_spend(orders, state.spend_history, at, tr.window_months, hot.zone)
    spend += amount
    q = tiers.qualified_tier(spend, tr)
    new_tier, until = tiers.on_qualifying(tier, until_before, q, at, tr, hot.zone)
    order = Order(
        order_id=oid, at=at, amount=amount, ruleset_version=ruleset.version,
        store_id=event.store_id, base_rate=rate, base_rate_divisor=divisor, factors=factors,
        fixed_bonuses=fixed,
        big_ticket=steps, base_rule=ids.base, big_ticket_rule=ids.big_ticket,
        stack=pr.stack_purchase_bonuses, paid=paid, others=tuple(others), tier_before=tier,
        tier_after=new_tier, valid_until_before=until_before,
    )  # fmt: skip
    new = replace(
        state,
        orders=put_order(orders, order),
        first_purchase_done=True,
        new_projects_bought=(*bought, *fresh) if fresh else bought,
        referral_paid=state.referral_paid or referral_due,
        tier=new_tier,
        tier_valid_until=until,
    )
    if late:  # the tier from this order on, as the orders in time order make it
        new = tiers.after_refund(new, order, at, tr, tiers_at, hot.zone)
    payouts: list[Payout] = [(GRANT, member, r, p, oid, None) for r, p in paid.items()]
    payouts += [(GRANT, o.member_id, o.rule_id, o.points, oid, None) for o in others]
    return new, payouts


def _late(state: MemberState, at: datetime, window_months: int, zone: tzinfo) -> bool:
    """Whether a purchase at `at` comes after a later-dated order or tier expiry, with
    all the spend its replay counts still known (`MemberState.spend_since`)."""
    orders, checked = state.orders, state.tier_checked_at
    if not (orders and next(reversed(orders.values())).at > at) and not (
        checked is not None and checked > at
    ):
        return False
    since = state.spend_since
    return since is None or months_later(at, -window_months, zone) >= since


def _targets(order: Order, net: Decimal) -> dict[str, int]:
    """What the order would have earned had only `net` been paid, bonuses included."""
    if net <= 0:
        return {}
    candidates = {order.big_ticket_rule: big_ticket_points(net, order.big_ticket)}
    candidates.update(order.fixed_bonuses)
    targets = {order.base_rule: base_points(net, order.base_rate, order.base_rate_divisor)}
    targets.update(select_bonuses(candidates, order.stack))
    # Referral points are a fixed reward for becoming a customer: kept unless fully refunded.
    bonus_rules = {order.base_rule, *candidates}
    targets.update({k: v for k, v in order.paid.items() if k not in bonus_rules})
    return targets


def on_refund(
    state: MemberState, event: Refund, ruleset: RuleSet, tiers_at: tiers.TiersAt | None = None
) -> tuple[MemberState, list[Payout]]:
    """Proportional take-back; refunds past the order's amount do nothing. A refund of an
    order not seen yet waits in the state for its purchase (`settle_early_refunds`)."""
    d = event.data
    order = state.orders.get(d.order_id)
    if order is None:
        if d.amount <= 0:
            return state, []
        early = EarlyRefund(order_id=d.order_id, at=event.occurred_at, amount=d.amount)
        kept = (*state.early_refunds, early)[-MAX_EARLY_REFUNDS:]
        return replace(state, early_refunds=kept), []
    return _refund(state, order, d.amount, event.occurred_at, event.member_id, ruleset, tiers_at)


# Early refunds a member's state keeps (the newest): refunds of orders that never arrive
# (forgotten, or never sent) must not grow it without bound.
MAX_EARLY_REFUNDS: Final = 32


def _refund(
    state: MemberState, order: Order, amount: Decimal, at: datetime, member: str,
    ruleset: RuleSet, tiers_at: tiers.TiersAt | None,
) -> tuple[MemberState, list[Payout]]:  # fmt: skip
    effective = min(amount, order.net)
    if effective <= 0:
        return state, []
    order = replace(order, refunded=order.refunded + effective)
    net = order.net
    targets = _targets(order, net)
    payouts: list[Payout] = []
    oid, version = order.order_id, order.ruleset_version
    for rule_id in sorted({*order.paid, *targets}):
        diff = targets.get(rule_id, 0) - order.paid.get(rule_id, 0)
        if diff < 0:
            payouts.append((REVOKE, member, rule_id, -diff, oid, version))
        elif diff > 0:
            payouts.append((GRANT, member, rule_id, diff, oid, version))
    others = order.others
    if net <= 0:
        payouts += [(REVOKE, o.member_id, o.rule_id, o.points, oid, version) for o in others]
        others = ()
    order = replace(order, paid=targets, others=others)
    new = replace(state, orders=put_order(state.orders, order))
    zone = derived(ruleset).zone
    return tiers.after_refund(new, order, at, ruleset.tiers, tiers_at, zone), payouts


def settle_early_refunds(
    state: MemberState, order_id: str, ruleset: RuleSet, tiers_at: tiers.TiersAt | None
) -> tuple[MemberState, list[Payout]]:
    """The order just bought with the refunds that came before it applied, in time order,
    and what it pays net of them: as if the purchase and its refunds had arrived in that
    order, but paid once, net (no grant taken back in the same breath, so every payout
    keeps the purchase's grant id and rule-set version)."""
    waiting = sorted((r for r in state.early_refunds if r.order_id == order_id), key=_refund_at)
    state = replace(
        state, early_refunds=tuple(r for r in state.early_refunds if r.order_id != order_id)
    )
    member = state.member_id
    for r in waiting:
        state, _ = _refund(state, state.orders[order_id], r.amount, r.at, member, ruleset,
                           tiers_at)  # fmt: skip
    order = state.orders[order_id]
    payouts: list[Payout] = [
        (GRANT, member, k, p, order_id, None) for k, p in order.paid.items() if p > 0
    ]
    payouts += [(GRANT, o.member_id, o.rule_id, o.points, order_id, None) for o in order.others]
    return state, payouts


def _refund_at(refund: EarlyRefund) -> datetime:
    return refund.at
