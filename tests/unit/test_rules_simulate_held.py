"""The backtest's in-force lane pays a burst ops released when and as `rules held release`
did: at the release's moment, on the member's state then (`held.release_held`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timedelta

import pytest
from rules_factories import DEFAULT, T0, review, share, sign_in

from schemas.activity import Activity
from schemas.grants import PointsGranted
from services.rules.backtest import MemberWorkers
from services.rules.engine import HeldEvent, evaluate, release
from services.rules.ruleset import RuleBook
from services.rules.simulate import Report, Simulation
from services.rules.state import MemberState

BOOK = RuleBook([DEFAULT])
MINUTE = timedelta(minutes=1)


def _burst() -> tuple[list[Activity], Activity]:
    """20 sign-ins in a minute, then a share in that minute: the share is held."""
    events = [sign_in("m-1", at=T0 + timedelta(seconds=i)) for i in range(20)]
    held = share("m-1", at=T0 + timedelta(seconds=20), share_id="s-held")
    return [*events, held], held


def _live(events: Sequence[Activity], released_after: int) -> dict[str, int]:
    """Points per rule as the live service paid them, the held event released by ops
    once the first `released_after` events were in (on the member's state then)."""
    state, paid, held = MemberState(member_id="m-1"), Counter[str](), list[HeldEvent]()

    def take(grants: Sequence[object]) -> None:
        for g in grants:
            if isinstance(g, PointsGranted):
                paid[g.data.rule_id] += g.data.points

    for i, e in enumerate(events):
        if i == released_after:
            r = release(state, held.pop(), BOOK.at(T0), {}, BOOK.tiers_at)
            state = r.state
            take(r.grants)
        r = evaluate(state, e, BOOK.at(e.occurred_at), {}, BOOK.tiers_at)
        state, held = r.state, [*held, *r.held]
        take(r.grants)
    if released_after == len(events):
        take(release(state, held.pop(), BOOK.at(T0), {}, BOOK.tiers_at).grants)
    assert held == []
    return dict(+paid)


def _in_force(report: Report) -> dict[str, int]:
    return {r.rule_id: r.in_force for r in report.rows if r.in_force}


LATER = {
    # More engagement the same day fills its cap (200) before ops release the share.
    "cap-filled-the-same-day": (
        [review("m-1", at=T0 + timedelta(hours=h)) for h in range(1, 5)],
        {"review": 195, "sign_in": 5},
    ),
    # Released 40 days on: its day's counts are pruned (35 days), it earns no capped points.
    "counts-pruned": ([sign_in("m-1", at=T0 + timedelta(days=40))], {"sign_in": 10}),
    # Released 13 months on: the share ids of its day are forgotten (`ids_since`).
    "ids-forgotten": ([sign_in("m-1", at=T0 + timedelta(days=400))], {"sign_in": 10}),
}


@pytest.mark.parametrize("case", list(LATER))
def test_a_burst_released_later_is_priced_on_the_members_state_at_the_release(
    case: str,
) -> None:
    """The in-force lane paid a released burst at once, on the state that held it: the
    share's 100 points, where live it met a day's cap filled since, or pruned counts or
    forgotten ids, and paid nothing."""
    burst, held = _burst()
    later, paid = LATER[case]
    events = [*burst, *later]
    assert _live(events, len(events)) == paid
    decided = later[-1].occurred_at + MINUTE
    report = Simulation(BOOK, DEFAULT, released={held.event_id: decided}).feed_all(events).report()
    assert _in_force(report) == paid
    assert report.held_in_force == 1
    # Under the candidate a held event stays unpaid, released or not (live paid it
    # nothing either, here).
    assert report.held_candidate == 1
    assert {r.rule_id: r.candidate for r in report.rows if r.candidate} == paid


def test_a_release_is_applied_at_its_moment_among_the_events() -> None:
    """Released between the second and third review: the share gets what the day's cap
    had left (95), the reviews after it nothing."""
    burst, held = _burst()
    reviews = [review("m-1", at=T0 + timedelta(hours=h)) for h in range(1, 5)]
    events = [*burst, *reviews]
    paid = _live(events, len(burst) + 2)
    assert paid == {"share": 95, "review": 100, "sign_in": 5}
    decided = reviews[1].occurred_at + MINUTE
    report = Simulation(BOOK, DEFAULT, released={held.event_id: decided}).feed_all(events).report()
    assert _in_force(report) == paid


def test_a_release_decided_at_an_events_instant_comes_before_it() -> None:
    """Live, an event arrives after its moment, so a release decided at that very
    moment was applied first."""
    burst, held = _burst()
    reviews = [review("m-1", at=T0 + timedelta(hours=h)) for h in range(1, 5)]
    events = [*burst, *reviews]
    report = Simulation(BOOK, DEFAULT, released={held.event_id: reviews[2].occurred_at}
                        ).feed_all(events).report()  # fmt: skip
    assert _in_force(report) == _live(events, len(burst) + 2)


def _warm_then(start: datetime, decided: datetime) -> Report:
    """The burst held in the warm-up, the period from `start` with one review."""
    burst, held = _burst()
    sim = Simulation(BOOK, DEFAULT, released={held.event_id: decided}, start=start)
    for e in burst:
        sim.warm_up(e)
    return sim.feed_all([review("m-1", at=start + timedelta(hours=1))]).report()


def test_a_warm_up_burst_released_in_the_period_is_counted_in_it() -> None:
    """Held before the period, released in it: a payout of the period, as the ledger
    saw it (its day's counts still kept), in the in-force lane only."""
    start = T0 + timedelta(days=1)
    report = _warm_then(start, start + timedelta(hours=2))
    assert _in_force(report) == {"share": 100, "review": 50}
    assert report.held_in_force == 0  # held before the period
    assert {r.rule_id: r.candidate for r in report.rows if r.candidate} == {"review": 50}


def test_a_release_decided_before_the_period_is_part_of_the_warm_up() -> None:
    """Decided after the last warm-up event but before the period's start: it builds
    the state the period starts from, and is not counted."""
    start = T0 + timedelta(days=1)
    report = _warm_then(start, start - MINUTE)
    assert _in_force(report) == {"review": 50}


def test_a_release_after_the_periods_last_event_is_counted_at_the_end() -> None:
    """No event of the member comes after the release: it is still in the period (the
    adapter passes only releases decided before the period's end)."""
    burst, held = _burst()
    sim = Simulation(BOOK, DEFAULT, released={held.event_id: T0 + timedelta(days=3)})
    assert _in_force(sim.feed_all(burst).report()) == {"share": 100, "sign_in": 5}


def test_releases_reach_the_member_workers() -> None:
    burst, held = _burst()
    reviews = [review("m-1", at=T0 + timedelta(hours=h)) for h in range(1, 5)]
    released = {held.event_id: reviews[1].occurred_at + MINUTE}
    whole = Simulation(BOOK, DEFAULT, released=released).feed_all([*burst, *reviews]).report()
    rows = [("m-1", e.model_dump_json().encode()) for e in [*burst, *reviews]]
    with MemberWorkers(BOOK, DEFAULT, {}, released=released) as workers:
        workers.send("feed", rows)
        split, _ = workers.finish()
    assert split == whole
    assert _in_force(split) == {"share": 95, "review": 100, "sign_in": 5}
