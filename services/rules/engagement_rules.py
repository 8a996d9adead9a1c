"""Visit, sign-in, review and share rules, and the daily engagement cap.

Engagement points are cheap to farm, so each rule is idempotent on its business id
(booking, day, review, share) rather than on the event id alone, and the capped rules
share one per-day budget in the rule set's time zone.
"""

from __future__ import annotations

import math
from datetime import date, timedelta

from schemas.activity import CheckIn, Review, Share
from schemas.grants import GrantEvent
from services.rules.emit import AnyActivity, granted
from services.rules.ruleset import RuleSet
from services.rules.state import MemberState, ReviewMark, evolve, trusted

Outcome = tuple[MemberState, list[GrantEvent]]


def local_day(event: AnyActivity, ruleset: RuleSet) -> date:
    return event.occurred_at.astimezone(ruleset.zone).date()


def pay_capped(
    state: MemberState, event: AnyActivity, ruleset: RuleSet, rule_id: str, points: int
) -> Outcome:
    """Pay what is left of today's budget, then nothing; the cut part is forfeited."""
    day = local_day(event, ruleset)
    used = state.engagement_by_day.get(day, 0)
    cap = ruleset.engagement.daily_cap
    paid = max(points, 0) if cap is None else max(0, min(points, cap - used))
    if paid == 0:
        return state, []
    new = evolve(state, engagement_by_day={**state.engagement_by_day, day: used + paid})
    return new, granted(event, ruleset, rule_id, paid)


def on_visit(state: MemberState, event: CheckIn, ruleset: RuleSet) -> Outcome:
    """Late or missed resets the streak; a short-notice booking neither earns nor breaks it."""
    d, rules, ids = event.data, ruleset.visit, ruleset.rule_ids
    key = d.booking_id or event.event_id
    if key in state.visits_seen or d.booked_at is None or d.slot_start is None:
        return state, []
    state = evolve(state, visits_seen={**state.visits_seen, key: local_day(event, ruleset)})
    lead = d.slot_start - d.booked_at
    if lead < timedelta(hours=float(rules.min_booking_lead_hours)):
        return state, []
    grace = timedelta(minutes=float(rules.grace_minutes))
    if d.arrived_at is None or d.arrived_at > d.slot_start + grace:
        return evolve(state, visit_streak=0), []
    streak = state.visit_streak + 1
    grants = granted(event, ruleset, ids.on_time_visit, rules.points)
    if rules.streak_every and streak % rules.streak_every == 0:
        grants += granted(event, ruleset, ids.punctuality_streak, rules.streak_points)
    return evolve(state, visit_streak=streak), grants


def on_sign_in(state: MemberState, event: CheckIn, ruleset: RuleSet) -> Outcome:
    day, rules, ids = local_day(event, ruleset), ruleset.sign_in, ruleset.rule_ids
    last = state.sign_in_last_day
    if last is not None and day <= last:
        return state, []
    streak = state.sign_in_streak + 1 if last == day - timedelta(days=1) else 1
    state = evolve(state, sign_in_last_day=day, sign_in_streak=streak)
    state, grants = pay_capped(state, event, ruleset, ids.sign_in, rules.points)
    if rules.streak_every and streak % rules.streak_every == 0:
        state, more = pay_capped(state, event, ruleset, ids.sign_in_streak, rules.streak_points)
        grants += more
    return state, grants


def on_review(state: MemberState, event: Review, ruleset: RuleSet) -> Outcome:
    """A review re-sent once featured pays the top-up only; a suggestion pays once, uncapped."""
    d, rules, ids = event.data, ruleset.review, ruleset.rule_ids
    mark = state.reviews.get(d.review_id) or trusted(ReviewMark, day=local_day(event, ruleset))
    due = math.floor(rules.points * rules.featured_multiplier) if d.featured else rules.points
    top_up = max(due - mark.points_due, 0)
    grants: list[GrantEvent] = []
    if top_up:
        rule_id = ids.featured_review if d.featured else ids.review
        state, grants = pay_capped(state, event, ruleset, rule_id, top_up)
    if d.suggestion_adopted and not mark.suggestion:
        grants += granted(event, ruleset, ids.suggestion_adopted, rules.suggestion_points)
    mark = evolve(
        mark,
        points_due=max(due, mark.points_due),
        suggestion=mark.suggestion or d.suggestion_adopted,
    )
    return evolve(state, reviews={**state.reviews, d.review_id: mark}), grants


def on_share(state: MemberState, event: Share, ruleset: RuleSet) -> Outcome:
    """Pays once per share id; a share over the daily count stays unpaid and may pay later."""
    d, rules = event.data, ruleset.share
    if d.share_id in state.shares_paid:
        return state, []
    by_likes = rules.likes_threshold is not None and d.likes >= rules.likes_threshold
    if not (by_likes or (d.approved and rules.pays_on_approval)):
        return state, []
    day = local_day(event, ruleset)
    count = state.shares_by_day.get(day, 0)
    if rules.max_per_day is not None and count >= rules.max_per_day:
        return state, []
    state = evolve(
        state,
        shares_paid={**state.shares_paid, d.share_id: day},
        shares_by_day={**state.shares_by_day, day: count + 1},
    )
    return pay_capped(state, event, ruleset, ruleset.rule_ids.share, rules.points)
