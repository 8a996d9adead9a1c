"""Visit, sign-in, review and share rules, and the daily engagement cap.

Engagement points are cheap to farm, so each rule is idempotent on its business id
(booking, day, review, share) rather than on the event id alone, and the capped rules
share one per-day budget in the rule set's time zone.

Each rule takes the event's local `day` (computed once per event by the engine) and
returns the new state with `Payout` tuples; the engine builds grant models from those.
"""

from __future__ import annotations

import math
from datetime import date, timedelta
from typing import Final

from schemas.activity import CheckIn, Review, Share
from services.rules.emit import GRANT, AnyActivity, Payout
from services.rules.pruning import put_count, put_day, put_review
from services.rules.ruleset import RuleSet, derived
from services.rules.state import MemberState, ReviewMark, SignInRun, replace

Outcome = tuple[MemberState, list[Payout]]
_ONE_DAY: Final = timedelta(days=1)


def _capped(used: int, points: int, cap: int | None) -> int:
    """What is left of today's budget for `points`; the cut part is forfeited."""
    return max(points, 0) if cap is None else max(0, min(points, cap - used))


def counted(state: MemberState, day: date) -> bool:
    """Whether `day`'s counters are still kept, so its caps can be checked (pruning)."""
    since = state.counters_since
    return since is None or day >= since


def forgotten(state: MemberState, day: date) -> bool:
    """Whether `day`'s business ids are no longer kept (`MemberState.ids_since`), so an
    event of that day cannot be told from one already paid."""
    since = state.ids_since
    return since is not None and day <= since


def pay_capped(
    state: MemberState, event: AnyActivity, ruleset: RuleSet, rule_id: str, points: int,
    day: date,
) -> Outcome:  # fmt: skip
    """Pay what is left of today's budget, then nothing; nothing for a day whose budget is
    no longer known (more than `pruning.COUNTER_DAYS` before the member's latest events)."""
    if not counted(state, day):
        return state, []
    used = state.engagement_by_day.get(day, 0)
    paid = _capped(used, points, ruleset.engagement.daily_cap)
    if paid == 0:
        return state, []
    new = replace(state, engagement_by_day=put_count(state.engagement_by_day, day, used + paid))
    return new, [(GRANT, event.member_id, rule_id, paid, None, None)]


def on_visit(state: MemberState, event: CheckIn, ruleset: RuleSet, day: date) -> Outcome:
    """Late or missed resets the streak; a short-notice booking neither earns nor breaks it."""
    d, rules = event.data, ruleset.visit
    key = d.booking_id or event.event_id
    if key in state.visits_seen or d.booked_at is None or d.slot_start is None:
        return state, []
    hot = derived(ruleset)
    if forgotten(state, day) or forgotten(state, d.slot_start.astimezone(hot.zone).date()):
        return state, []  # a booking of a day whose ids are forgotten may have been paid
    seen = put_day(state.visits_seen, key, day)
    if d.slot_start - d.booked_at < hot.min_booking_lead:
        return replace(state, visits_seen=seen), []
    if d.arrived_at is None or d.arrived_at > d.slot_start + hot.grace:
        return replace(state, visits_seen=seen, visit_streak=0), []
    streak = state.visit_streak + 1
    ids, member = ruleset.rule_ids, event.member_id
    payouts: list[Payout] = []
    if rules.points > 0:
        payouts.append((GRANT, member, ids.on_time_visit, rules.points, None, None))
    if rules.streak_every and streak % rules.streak_every == 0 and rules.streak_points > 0:
        payouts.append((GRANT, member, ids.punctuality_streak, rules.streak_points, None, None))
    return replace(state, visits_seen=seen, visit_streak=streak), payouts


def sign_in_runs(state: MemberState) -> tuple[SignInRun, ...]:
    """The member's runs of signed-in days, a state written before them read as one."""
    last = state.sign_in_last_day
    if state.sign_in_runs or last is None:
        return state.sign_in_runs
    first = last - (max(state.sign_in_streak, 1) - 1) * _ONE_DAY
    return (SignInRun(first=first, last=last),)


def on_sign_in(state: MemberState, event: CheckIn, ruleset: RuleSet, day: date) -> Outcome:
    """One sign-in a day; every `streak_every`-th consecutive day pays the streak bonus.

    A day delivered late (or released from a hold after later days) is filled in: it
    pays its sign-in, and joins the runs of days before and after it. The streak bonuses
    due are those of the joined run (one for each `streak_every` days from its first);
    what the two runs already paid is deducted, and the rest is paid now, counted on the
    day each falls due. Bonuses are never taken back, so a member who filled in a day
    late is paid at least what time order pays.
    """
    runs = sign_in_runs(state)
    known_from = state.sign_in_known_from
    if runs and not state.sign_in_runs:  # read from an older state: its one run
        # The day before the run was not signed (or the streak would be longer); those
        # before it are not known, and the older code paid none of them again.
        known_from = runs[0].first - _ONE_DAY
    if known_from is not None and day < known_from:
        return state, []
    before = after = None
    for r in runs:
        if r.first <= day <= r.last:
            return state, []  # signed in that day already
        if r.last == day - _ONE_DAY:
            before = r
        elif r.first == day + _ONE_DAY:
            after = r
    joined = SignInRun(
        first=day if before is None else before.first,
        last=day if after is None else after.last,
    )
    kept = tuple(r for r in runs if r is not before and r is not after)
    if not kept or kept[-1].last < day:
        runs = (*kept, joined)  # in time order: the newest run
    else:
        runs = tuple(sorted((*kept, joined), key=_run_first))
    new = replace(state, sign_in_runs=runs, sign_in_known_from=known_from,
                  sign_in_last_day=None, sign_in_streak=0)  # fmt: skip
    if not counted(state, day):  # the runs still count the day; its budget is unknown
        return new, []
    rules, ids, member = ruleset.sign_in, ruleset.rule_ids, event.member_id
    cap, by_day = ruleset.engagement.daily_cap, new.engagement_by_day
    payouts: list[Payout] = []
    spent: dict[date, int] = {}

    def pay(rule_id: str, points: int, on: date) -> None:
        used = spent.get(on, by_day.get(on, 0))
        paid = _capped(used, points, cap)
        if paid:
            spent[on] = used + paid
            payouts.append((GRANT, member, rule_id, paid, None, None))

    pay(ids.sign_in, rules.points, day)
    every = rules.streak_every
    if every:
        owed = joined.days // every
        owed -= sum(r.days // every for r in (before, after) if r is not None)
        # The joined run's bonus days after the run before it (whose own stay where they
        # were) that the run after it had not paid on, earliest first: at least `owed`.
        paid_after = set() if after is None else set(_bonus_days(after, every))
        unpaid = [on for on in _bonus_days(joined, every)
                  if on >= day and on not in paid_after]  # fmt: skip
        for on in unpaid[:owed]:
            if counted(new, on):
                pay(ids.sign_in_streak, rules.streak_points, on)
    for on, used in sorted(spent.items()):
        by_day = put_count(by_day, on, used)
    if spent:
        new = replace(new, engagement_by_day=by_day)
    return new, payouts


def _run_first(run: SignInRun) -> date:
    return run.first


def _bonus_days(run: SignInRun, every: int) -> list[date]:
    """The days a run's streak bonuses fall on: its `every`-th, 2×`every`-th, ... day."""
    return [run.first + (k * every - 1) * _ONE_DAY for k in range(1, run.days // every + 1)]


def on_review(state: MemberState, event: Review, ruleset: RuleSet, day: date) -> Outcome:
    """A review re-sent once featured pays the top-up only; a suggestion pays once, uncapped."""
    d, rules, ids = event.data, ruleset.review, ruleset.rule_ids
    old = state.reviews.get(d.review_id)
    if old is None and forgotten(state, day):
        return state, []
    mark = old or ReviewMark(day=day)
    due = math.floor(rules.points * rules.featured_multiplier) if d.featured else rules.points
    top_up = max(due - mark.points_due, 0)
    payouts: list[Payout] = []
    if top_up:
        rule_id = ids.featured_review if d.featured else ids.review
        state, payouts = pay_capped(state, event, ruleset, rule_id, top_up, day)
    if d.suggestion_adopted and not mark.suggestion and rules.suggestion_points > 0:
        payouts.append(
            (GRANT, event.member_id, ids.suggestion_adopted, rules.suggestion_points, None, None)
        )
    mark = replace(
        mark,
        points_due=max(due, mark.points_due),
        suggestion=mark.suggestion or d.suggestion_adopted,
    )
    return replace(state, reviews=put_review(state.reviews, d.review_id, mark)), payouts


def on_share(state: MemberState, event: Share, ruleset: RuleSet, day: date) -> Outcome:
    """Pays once per share id; a share over the daily count stays unpaid and may pay later."""
    d, rules = event.data, ruleset.share
    if d.share_id in state.shares_paid or forgotten(state, day):
        return state, []
    by_likes = rules.likes_threshold is not None and d.likes >= rules.likes_threshold
    if not (by_likes or (d.approved and rules.pays_on_approval)):
        return state, []
    count = state.shares_by_day.get(day, 0)
    if not counted(state, day) or (rules.max_per_day is not None and count >= rules.max_per_day):
        return state, []
    state = replace(
        state,
        shares_paid=put_day(state.shares_paid, d.share_id, day),
        shares_by_day=put_count(state.shares_by_day, day, count + 1),
    )
    return pay_capped(state, event, ruleset, ruleset.rule_ids.share, rules.points, day)
