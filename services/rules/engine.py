"""The pure rules evaluator: (member state, activity, rule set) -> (new state, grants).

No I/O and no clock: time comes from the event, so replaying a stream under any rule
set is deterministic and can be compared grant by grant. The adapter dedupes event ids,
loads the member's state and the referrer map, and publishes what comes back.

`step` is the core and returns plain payout tuples; `evaluate` (the live service) wraps
them into contract models. The backtest calls `step` directly: it only sums points, and
it skips the tier report, which changes no state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timezone, tzinfo
from decimal import Decimal

from schemas.activity import (
    Activity,
    CheckIn,
    MemberRegistered,
    Purchase,
    Referral,
    Refund,
    Review,
    Share,
)
from schemas.grants import GrantEvent, TierEvaluated
from services.rules import engagement_rules, purchase_rules, tiers
from services.rules.emit import (
    AnyActivity,
    Payout,
    TierChange,
    grant_events,
    tier_report,
)
from services.rules.pruning import prune
from services.rules.ruleset import Derived, RuleSet, derived
from services.rules.state import MemberState, replace, shared_tz


@dataclass(frozen=True)
class HeldEvent:
    """An engagement event not paid because it came in a burst; ops may `release` it."""

    event: CheckIn | Review | Share
    reason: str


@dataclass(frozen=True)
class Evaluation:
    state: MemberState
    grants: tuple[GrantEvent, ...] = ()
    held: tuple[HeldEvent, ...] = ()


class Step:
    """What `step` decided: the new state, payouts, the tier report if asked, a hold.

    A plain class rather than a dataclass: built once per event per lane, and compiled
    (services/common/native.py) its __init__ is native code; a dataclass's is not.
    """

    __slots__ = ("held", "payouts", "state", "tier")

    def __init__(
        self,
        state: MemberState,
        payouts: list[Payout],
        tier: TierChange | None = None,
        held: HeldEvent | None = None,
    ) -> None:
        self.state = state
        self.payouts = payouts
        self.tier = tier
        self.held = held


def is_engagement(event: AnyActivity) -> bool:
    """Visits are staff-confirmed at the desk; only app-driven events can be flooded."""
    return isinstance(event, Review | Share) or (
        isinstance(event, CheckIn) and event.data.kind == "sign_in"
    )


def _burst(
    state: MemberState, event: AnyActivity, ruleset: RuleSet, hot: Derived
) -> tuple[MemberState, bool]:
    limit = ruleset.engagement.burst_max_events
    if limit is None:
        return state, False
    at = event.occurred_at
    since = at - hot.burst_window
    recent = [t for t in state.recent_engagement if t > since]
    # A late event is judged by the events of the minute up to it, as it would have been
    # on time, not by the ones after it.
    late = bool(recent) and recent[-1] > at
    held = len([t for t in recent if t <= at] if late else recent) >= limit
    # The last `limit` stamps decide the next event; twice that many keep a late event's
    # minute whole behind up to `limit` later ones. Held ones count too, so a sustained
    # flood stays held. Stamps are kept sorted: in-order events append.
    if not late:
        recent.append(at)
    else:
        recent = sorted([*recent, at])
    return replace(state, recent_engagement=tuple(recent[-2 * limit :])), held


def _register(state: MemberState, event: MemberRegistered | Referral) -> MemberState:
    """The first referrer named wins; nobody refers themselves; too late after a purchase."""
    referrer = event.data.referrer_id
    update: dict[str, object] = {}
    if isinstance(event, MemberRegistered) and event.data.birthday is not None:
        update["birthday"] = event.data.birthday
    if (
        referrer
        and referrer != event.member_id
        and not state.referrer_id  # a blank one stored before it was refused: none
        and not state.first_purchase_done
    ):
        update["referrer_id"] = referrer
    return replace(state, **update) if update else state


def _apply(
    state: MemberState,
    event: AnyActivity,
    ruleset: RuleSet,
    referrers: Mapping[str, str | None],
    day: date,
    tiers_at: tiers.TiersAt | None,
) -> tuple[MemberState, list[Payout]]:
    if isinstance(event, Purchase):
        new, payouts = purchase_rules.on_purchase(state, event, ruleset, referrers, day,
                                                  tiers_at)  # fmt: skip
        if new.early_refunds and new.orders is not state.orders:
            oid = event.data.order_id
            if any(r.order_id == oid for r in new.early_refunds):
                return purchase_rules.settle_early_refunds(new, oid, ruleset, tiers_at)
        return new, payouts
    if isinstance(event, CheckIn):
        if event.data.kind == "visit":
            return engagement_rules.on_visit(state, event, ruleset, day)
        return engagement_rules.on_sign_in(state, event, ruleset, day)
    if isinstance(event, Review):
        return engagement_rules.on_review(state, event, ruleset, day)
    if isinstance(event, Share):
        return engagement_rules.on_share(state, event, ruleset, day)
    if isinstance(event, Refund):
        return purchase_rules.on_refund(state, event, ruleset, tiers_at)
    return _register(state, event), []


def step(
    state: MemberState,
    event: AnyActivity,
    ruleset: RuleSet,
    referrers: Mapping[str, str | None],
    *,
    check_burst: bool = True,
    report_tier: bool = True,
    day: date | None = None,
    tiers_at: tiers.TiersAt | None = None,
) -> Step:
    """One event through the rules. `report_tier=False` skips only the tier report.

    `day` is the event's date in the rule set's zone, when the caller already knows it
    (the backtest prices each event in two lanes); it is computed otherwise. `tiers_at`:
    the tier rules in force at a moment (`RuleBook.at(t).tiers`), so that a tier expiry
    the event catches up on, or a refund's replay, is decided under the version of its
    own moment as the tier sweep decides it; None: `ruleset`'s throughout.
    """
    if event.member_id != state.member_id:
        raise ValueError(f"state of {state.member_id!r} given for {event.member_id!r}")
    at, tier_rules, hot = event.occurred_at, ruleset.tiers, derived(ruleset)
    current = state
    until = state.tier_valid_until
    if until is not None and until <= at:
        current = tiers.catch_up(state, at, tier_rules, tiers_at, hot.zone)
    if check_burst and is_engagement(event):
        current, burst = _burst(current, event, ruleset, hot)
        if burst and isinstance(event, CheckIn | Review | Share):
            held = HeldEvent(event=event, reason=hot.burst_reason)
            # A tier expiry the held event caught up on is reported all the same: the
            # state keeps it, so neither the next event nor the tier sweep would.
            change = None
            if report_tier:
                change = _tier_change(state, current, current, at, tier_rules.window_months,
                                      hot.zone)  # fmt: skip
            return Step(current, [], change, held)
    if day is None:
        day = event.occurred_at.astimezone(hot.zone).date()
    new, payouts = _apply(current, event, ruleset, referrers, day, tiers_at)
    change = None
    if report_tier:
        change = _tier_change(state, current, new, at, tier_rules.window_months, hot.zone)
    return Step(prune(new, at, day, hot.keep_months, hot.history_months, hot.zone), payouts,
                change)  # fmt: skip


def _tier_change(
    before: MemberState, current: MemberState, new: MemberState, at: datetime, window: int,
    zone: tzinfo,
) -> TierChange | None:  # fmt: skip
    """A tier report when the event moved qualifying spend, the tier, or its expiry."""
    moved, spend_after = False, None
    # Only purchases and refunds touch the orders; summing spend is skipped for the rest.
    history = new.spend_history  # the event's rules change orders, never forgotten spend
    if new.orders is not current.orders:
        spend_after = tiers.window_spend(new.orders, history, at, window, zone)
        moved = spend_after != tiers.window_spend(current.orders, history, at, window, zone)
    if moved or new.tier != before.tier or new.tier_valid_until != before.tier_valid_until:
        if spend_after is None:
            spend_after = tiers.window_spend(new.orders, history, at, window, zone)
        return TierChange(before.tier, new.tier, spend_after, new.tier_valid_until)
    return None


def _evaluate(
    state: MemberState,
    event: AnyActivity,
    ruleset: RuleSet,
    referrers: Mapping[str, str | None],
    *,
    check_burst: bool,
    tiers_at: tiers.TiersAt | None,
) -> Evaluation:
    s = step(state, event, ruleset, referrers, check_burst=check_burst, tiers_at=tiers_at)
    grants = grant_events(event, ruleset, s.payouts)
    if s.tier is not None:
        t = s.tier
        grants.append(
            tier_report(event.event_id, event.occurred_at, event.member_id, ruleset,
                        previous=t.previous, tier=t.tier, spend=t.spend,
                        valid_until=t.valid_until)
        )  # fmt: skip
    held = () if s.held is None else (s.held,)
    return Evaluation(state=s.state, grants=tuple(grants), held=held)


def evaluate(
    state: MemberState,
    event: Activity,
    ruleset: RuleSet,
    referrers: Mapping[str, str | None],
    tiers_at: tiers.TiersAt | None = None,
) -> Evaluation:
    """Grants for other members (referrers) carry their member_id; state is the event's
    member. `ruleset` is the version in force at the event; `tiers_at` see `step`."""
    return _evaluate(state, event, ruleset, referrers, check_burst=True, tiers_at=tiers_at)


def tier_expiry_id(member_id: str, until: datetime) -> str:
    """The source id of a tier expiry: one per member and moment, so a repeated sweep (or
    a replay) reports it under the same grant id and the ledger keeps it once."""
    return f"tier-expiry|{member_id}|{until.isoformat()}"


def expire_tier(state: MemberState, ruleset: RuleSet) -> tuple[MemberState, TierEvaluated] | None:
    """The member's tier expiry, decided at its own moment the way the next event decides
    it (`tiers.catch_up`): for members who have gone quiet, whose next event may never come.

    `ruleset` is the rule set in force at `state.tier_valid_until`, the version an event
    catching up on the expiry uses too (`step`'s `tiers_at`). None: no tier to expire.
    Exactly one expiry is applied (the tier's months then restart from it, or it ends), and
    reported at that moment like any tier change: the new tier, spend, and months.
    """
    until = state.tier_valid_until
    if until is None:
        return None
    rules, zone = ruleset.tiers, derived(ruleset).zone
    new = tiers.catch_up(state, until, rules, zone=zone)
    report = tier_report(
        tier_expiry_id(state.member_id, until), until, state.member_id, ruleset,
        previous=state.tier, tier=new.tier,
        spend=tiers.window_spend(new.orders, new.spend_history, until, rules.window_months, zone,
                                 tiers.expiry_window_start(until, rules, zone)),
        valid_until=new.tier_valid_until,
    )  # fmt: skip
    return new, report


def spend_report_id(member_id: str, at: datetime, spend: Decimal) -> str:
    """The source id of a spend report the tier sweep makes: one per member, moment and
    spend. The spend is part of it because a moment can be reported twice with different
    answers: a report of an event that arrived late, dated before the moment, brings the
    member due at the same moment again, and the ledger drops an id it already holds, so
    the correction was lost (the view kept the late event's spend for months). A sweep
    repeated with the same answer keeps the same id."""
    return f"spend-lapse|{member_id}|{at.isoformat()}|{format(spend, 'f')}"


def report_spend(state: MemberState, at: datetime, ruleset: RuleSet) -> TierEvaluated:
    """The member's qualifying spend at `at`, where it changed by time alone since the last
    report (`tier_due`): an order left the 12-month window with no event to say so, and
    the ledger would show the old spend, and too little still needed for the next tier,
    for as long as the member stays away.

    The tier and its end stand: spend that leaves the window lowers a tier only at its
    expiry (a sweep due at or after the expiry goes through `expire_tier`). `ruleset`: the
    version in force at `at`.
    """
    rules = ruleset.tiers
    spend = tiers.window_spend(state.orders, state.spend_history, at, rules.window_months,
                               derived(ruleset).zone)  # fmt: skip
    return tier_report(spend_report_id(state.member_id, at, spend), at, state.member_id, ruleset,
                       previous=state.tier, tier=state.tier, spend=spend,
                       valid_until=state.tier_valid_until)  # fmt: skip


def tier_due(state: MemberState, at: datetime, ruleset: RuleSet) -> datetime | None:
    """When the tier sweep must next look at a member whose tier and spend were last
    reported at `at` (the sweep's column, `rules_member_state.tier_due_at`): the tier's
    end, or sooner the moment that spend goes stale (`tiers.next_spend_change`). None:
    neither comes. After `at`, so a sweep reporting at it moves on."""
    rules = ruleset.tiers
    change = tiers.next_spend_change(state.orders, state.spend_history, at,
                                     rules.window_months, derived(ruleset).zone)  # fmt: skip
    until = state.tier_valid_until
    if until is None or (change is not None and change < until):
        return change
    return until


def sweep_due(
    state: MemberState, due: datetime, ruleset_at: Callable[[datetime], RuleSet]
) -> tuple[MemberState, TierEvaluated, datetime | None]:
    """What the tier sweep does for a member due at `due` (`tier_due`): the state after it,
    the report, and when the member is due next (after the moment reported, so the sweep
    moves on). A tier expiry at or before `due` first (`expire_tier`: the only case that
    changes the state); else the spend at `due` (`report_spend`). `ruleset_at`: the
    version in force at a moment (`RuleBook.at`)."""
    until = state.tier_valid_until
    if until is not None and until <= due:
        ruleset = ruleset_at(until)
        expired = expire_tier(state, ruleset)
        assert expired is not None  # a tier with an end always expires
        new, report = expired
        return new, report, tier_due(new, until, ruleset)
    ruleset = ruleset_at(due)
    # Dated in the zone's offset, as the member's own times are (`due` is read back from
    # Postgres in UTC): the report's moment and id read like an expiry's.
    local = due.astimezone(derived(ruleset).zone)
    offset = local.utcoffset()
    at = due if offset is None else shared_tz(local.replace(tzinfo=timezone(offset)))
    return state, report_spend(state, at, ruleset), tier_due(state, at, ruleset)


def due_after(result: Evaluation, ruleset: RuleSet, kept: datetime | None) -> datetime | None:
    """The member's `tier_due` after an event: from the tier report the event made, or, with
    none, `kept` (the due stored with the state, which nothing changed), but never after
    the tier's end: a writer that did not store it (before migration 0023) left it out
    of date. `ruleset`: the version the event was evaluated under."""
    state = result.state
    for g in reversed(result.grants):
        if isinstance(g, TierEvaluated) and g.member_id == state.member_id:
            return tier_due(state, g.occurred_at, ruleset)
    until = state.tier_valid_until
    if until is not None and (kept is None or until < kept):
        return until
    return kept


def release(
    state: MemberState,
    held: HeldEvent,
    ruleset: RuleSet,
    referrers: Mapping[str, str | None] | None = None,
    tiers_at: tiers.TiersAt | None = None,
) -> Evaluation:
    """Pay a held event after ops review, with every rule but the burst check still applied."""
    return _evaluate(state, held.event, ruleset, referrers or {}, check_burst=False,
                     tiers_at=tiers_at)  # fmt: skip
