"""The pure rules evaluator: (member state, activity, rule set) -> (new state, grants).

No I/O and no clock: time comes from the event, so replaying a stream under any rule
set is deterministic and can be compared grant by grant. The adapter dedupes event ids,
loads the member's state and the referrer map, and publishes what comes back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

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
from schemas.grants import GrantEvent
from services.rules import engagement_rules, purchase_rules, tiers
from services.rules.emit import AnyActivity, tier_evaluated
from services.rules.ruleset import RuleSet
from services.rules.state import MemberState, evolve, prune


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


def is_engagement(event: AnyActivity) -> bool:
    """Visits are staff-confirmed at the desk; only app-driven events can be flooded."""
    return isinstance(event, Review | Share) or (
        isinstance(event, CheckIn) and event.data.kind == "sign_in"
    )


def _burst(state: MemberState, event: AnyActivity, ruleset: RuleSet) -> tuple[MemberState, bool]:
    limit = ruleset.engagement.burst_max_events
    if limit is None:
        return state, False
    since = event.occurred_at - timedelta(seconds=ruleset.engagement.burst_window_seconds)
    recent = [t for t in state.recent_engagement if t > since]
    held = len(recent) >= limit
    # The last `limit` stamps are enough to decide the next event; held ones count too,
    # so a sustained flood stays held.
    kept = tuple(sorted([*recent, event.occurred_at])[-limit:])
    return evolve(state, recent_engagement=kept), held


def _register(state: MemberState, event: MemberRegistered | Referral) -> MemberState:
    """The first referrer named wins; nobody refers themselves; too late after a purchase."""
    referrer = event.data.referrer_id
    update: dict[str, object] = {}
    if isinstance(event, MemberRegistered) and event.data.birthday is not None:
        update["birthday"] = event.data.birthday
    if (
        referrer is not None
        and referrer != event.member_id
        and state.referrer_id is None
        and not state.first_purchase_done
    ):
        update["referrer_id"] = referrer
    return evolve(state, **update) if update else state


def _apply(
    state: MemberState,
    event: AnyActivity,
    ruleset: RuleSet,
    referrers: Mapping[str, str | None],
) -> tuple[MemberState, list[GrantEvent]]:
    if isinstance(event, Purchase):
        return purchase_rules.on_purchase(state, event, ruleset, referrers)
    if isinstance(event, Refund):
        return purchase_rules.on_refund(state, event, ruleset)
    if isinstance(event, CheckIn):
        if event.data.kind == "visit":
            return engagement_rules.on_visit(state, event, ruleset)
        return engagement_rules.on_sign_in(state, event, ruleset)
    if isinstance(event, Review):
        return engagement_rules.on_review(state, event, ruleset)
    if isinstance(event, Share):
        return engagement_rules.on_share(state, event, ruleset)
    return _register(state, event), []


def _evaluate(
    state: MemberState,
    event: AnyActivity,
    ruleset: RuleSet,
    referrers: Mapping[str, str | None],
    *,
    check_burst: bool,
) -> Evaluation:
    if event.member_id != state.member_id:
        raise ValueError(f"state of {state.member_id!r} given for {event.member_id!r}")
    at, window = event.occurred_at, ruleset.tiers.window_months
    current = tiers.catch_up(state, at, ruleset.tiers)
    if check_burst and is_engagement(event):
        current, burst = _burst(current, event, ruleset)
        if burst and isinstance(event, CheckIn | Review | Share):
            reason = (
                f"more than {ruleset.engagement.burst_max_events} engagement events "
                f"in {ruleset.engagement.burst_window_seconds}s"
            )
            return Evaluation(state=current, held=(HeldEvent(event=event, reason=reason),))
    new, grants = _apply(current, event, ruleset, referrers)
    moved, spend_after = False, None
    # Only purchases and refunds touch the orders; summing spend is skipped for the rest.
    if new.orders is not current.orders:
        spend_after = tiers.rolling_spend(new.orders, at, window)
        moved = spend_after != tiers.rolling_spend(current.orders, at, window)
    if moved or new.tier != state.tier or new.tier_valid_until != state.tier_valid_until:
        if spend_after is None:
            spend_after = tiers.rolling_spend(new.orders, at, window)
        grants.append(
            tier_evaluated(event, ruleset, previous=state.tier, tier=new.tier,
                           spend=spend_after, valid_until=new.tier_valid_until)
        )  # fmt: skip
    keep = max(window, ruleset.expiry.lot_lifetime_months)
    day = engagement_rules.local_day(event, ruleset)
    return Evaluation(state=prune(new, at, day, keep), grants=tuple(grants))


def evaluate(
    state: MemberState,
    event: Activity,
    ruleset: RuleSet,
    referrers: Mapping[str, str | None],
) -> Evaluation:
    """Grants for other members (referrers) carry their member_id; state is the event's member."""
    return _evaluate(state, event, ruleset, referrers, check_burst=True)


def release(
    state: MemberState,
    held: HeldEvent,
    ruleset: RuleSet,
    referrers: Mapping[str, str | None] | None = None,
) -> Evaluation:
    """Pay a held event after ops review, with every rule but the burst check still applied."""
    return _evaluate(state, held.event, ruleset, referrers or {}, check_burst=False)
