"""The backtest core and the evaluator's fast paths (grant ids, stored states)."""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given
from rules_factories import DEFAULT, REF004, T0, Run, purchase, refund, review, ruleset
from test_rules_properties import fast, streams

from bench.sim_speed import synthetic_history
from schemas.activity import Activity, Refund, activity_adapter
from schemas.grants import PointsGranted, grant_id
from services.rules.backtest import LaneWorkers, MemberWorkers, referral_groups, worker_of
from services.rules.emit import fast_grant_id
from services.rules.ruleset import RuleBook
from services.rules.simulate import (
    LANES,
    Simulation,
    combine,
    merge_progress,
    report_of,
    summarize,
)
from services.rules.state import MemberState, dump_state, load_state


def test_fast_grant_id_equals_the_contract_grant_id() -> None:
    for args in [
        ("e-1", "base", "m-1", "grant"),
        ("事件", "tier", "m-2", "tier"),
        ("", "", "", ""),
    ]:
        assert fast_grant_id(*args) == grant_id(*args)


def test_states_round_trip_and_store_only_what_differs_from_defaults() -> None:
    state = MemberState(member_id="m")
    assert load_state(dump_state(state)) == state
    assert dump_state(state) == b'{"member_id":"m"}'  # defaults are not stored
    assert state.orders is not MemberState(member_id="m").orders  # fresh factories


@fast
@given(streams)
def test_redelivery_pays_once(events: list[Activity]) -> None:
    """Each event delivered twice (as Kafka may): the backtest, like the adapter, dedupes
    ids; the evaluator itself pays a re-sent business id (order, day, review...) once."""
    once = Simulation(RuleBook([DEFAULT]), DEFAULT).feed_all(events).report()
    twice = Simulation(RuleBook([DEFAULT]), DEFAULT)
    twice.feed_all(e for pair in zip(events, events, strict=True) for e in pair)
    assert twice.report() == once
    rules = ruleset(engagement={"burst_max_events": None})
    plain, resent = Run(rules=rules), Run(rules=rules)
    plain.feed(events)
    # Without the id dedupe, re-sending any non-refund event right away still pays nothing.
    resent.feed([x for e in events for x in ([e] if isinstance(e, Refund) else [e, e])])
    assert resent.balance() == plain.balance()


def test_simulation_counts_points_cash_and_members_per_rule() -> None:
    events = [
        purchase("m-1", amount=600, at=T0, order_id="o1"),
        purchase("m-2", amount=1000, at=T0 + timedelta(hours=1), order_id="o2"),
        review("m-1", at=T0 + timedelta(hours=2)),
    ]
    report = Simulation(RuleBook([DEFAULT]), REF004).feed_all(events).report()
    rows = {r.rule_id: r for r in report.rows}
    # In force: 600 + 200 first; 1000 + 200 (first beats the 100 big ticket); review 50.
    # reference-004: 600 + 50; 1000 + 50; review 10.
    assert (rows["base"].in_force, rows["base"].candidate) == (1600, 1600)
    assert rows["base"].members_affected == 0
    assert (rows["first_purchase"].in_force, rows["first_purchase"].candidate) == (400, 0)
    assert (rows["big_ticket"].in_force, rows["big_ticket"].candidate) == (0, 100)
    assert (rows["review"].in_force, rows["review"].candidate) == (50, 10)
    assert report.total.in_force == 2050
    assert report.total.candidate == 1710
    assert report.total.difference == -340
    # Member tier: 100 points = 1 CNY under both.
    assert report.total.cash_in_force == Decimal("20.50")
    assert report.total.cash_difference == Decimal("-3.40")
    assert report.total.members_affected == 2
    assert report.versions_in_force == ("2026.1",)


def test_warm_up_builds_state_without_counting() -> None:
    early = purchase("m-1", amount=100, at=T0, order_id="o1")
    later = refund("m-1", "o1", 100, at=T0 + timedelta(days=40))
    sim = Simulation(RuleBook([DEFAULT]), REF004)
    sim.warm_up(early)
    report = sim.feed_all([later]).report()
    # The refund takes back what the warm-up purchase paid, in both lanes (same order).
    assert report.warmup_events == 1
    assert report.total.in_force == report.total.candidate == -300


def test_each_event_uses_the_version_in_force_at_its_time() -> None:
    v2 = ruleset(
        version="v2", effective_from=T0 + timedelta(days=1), purchase={"points_per_cny": 2}
    )
    book = RuleBook([DEFAULT, v2])
    events = [
        purchase("m-1", amount=100, at=T0, order_id="a"),
        purchase("m-1", amount=100, at=T0 + timedelta(days=2), order_id="b"),
    ]
    report = Simulation(book, DEFAULT).feed_all(events).report()
    rows = {r.rule_id: r for r in report.rows}
    assert (rows["base"].in_force, rows["base"].candidate) == (300, 200)
    assert report.versions_in_force == ("2026.1", "v2")


def test_synthetic_history_parses_and_runs() -> None:
    raws = [json.dumps(e).encode() for e in synthetic_history(500, members=20)]
    events = [activity_adapter.validate_json(r) for r in raws]
    report = Simulation(RuleBook([DEFAULT]), REF004).feed_all(events).report()
    assert report.events == 500
    per_rule: dict[str, int] = defaultdict(int)
    for r in report.rows:
        per_rule[r.rule_id] += r.difference
    assert sum(per_rule.values()) == report.total.difference
    assert isinstance(PointsGranted, type)


def test_lanes_run_apart_combine_to_the_single_process_report() -> None:
    """Each lane alone (as the worker processes run them) gives the same report."""
    raws = [json.dumps(e).encode() for e in synthetic_history(3000, members=60, seed=7)]
    events = [activity_adapter.validate_json(r) for r in raws]
    book = RuleBook([DEFAULT])
    whole = Simulation(book, REF004)
    for e in events[:1000]:
        whole.warm_up(e)
    whole.feed_all(events[1000:])
    apart = {}
    for lane in LANES:
        sim = Simulation(book, REF004, lanes=(lane,))
        for e in events[:1000]:
            sim.warm_up(e)
        sim.feed_all(events[1000:])
        apart[lane] = sim
    a, b = apart["in_force"], apart["candidate"]
    assert a.progress() == b.progress() == whole.progress()
    combined = combine(
        a.lane_results()["in_force"], b.lane_results()["candidate"], a.progress(), "ref-004"
    )
    assert combined == whole.report()
    assert combined.total.difference != 0


def test_lane_worker_processes_give_the_single_process_report() -> None:
    """The backtest's worker processes, fed raw payloads (one that no longer parses)."""
    raws = [json.dumps(e).encode() for e in synthetic_history(4000, members=80, seed=3)]
    raws.insert(1500, b'{"type": "gone"}')
    whole = Simulation(RuleBook([DEFAULT]), REF004)
    for r in raws[:1000]:
        whole.warm_up(activity_adapter.validate_json(r))
    whole.feed_all(activity_adapter.validate_json(r) for r in raws[1000:] if b"gone" not in r)
    with LaneWorkers(RuleBook([DEFAULT]), REF004) as workers:
        workers.send("warm", raws[:1000])
        for i in range(1000, len(raws), 700):
            workers.send("feed", raws[i : i + 700])
        report, skipped = workers.finish()
    assert skipped == 1
    assert report == whole.report()


def test_member_split_workers_with_referrals_give_the_single_process_report() -> None:
    """Members split over two workers (both lanes each, one parse) by referral component:
    referral grants and refunds cross members, and still the single-process report."""
    raws = [json.dumps(e).encode() for e in synthetic_history(6000, members=300, seed=5)]
    raws.insert(2500, b'{"type": "gone", "member_id": "m-00001"}')
    members = [json.loads(r).get("member_id", "") for r in raws]
    edges = [(m, r) for m, r in zip(members, raws, strict=True) if b"referrer_id" in r]
    groups = referral_groups(edges)
    assert any(g != m for m, g in groups.items())  # some referral links join members
    split = {worker_of(m, groups, 2) for m in members}
    assert split == {0, 1}
    whole = Simulation(RuleBook([DEFAULT]), REF004)
    for r in raws[:2000]:
        whole.warm_up(activity_adapter.validate_json(r))
    whole.feed_all(activity_adapter.validate_json(r) for r in raws[2000:] if b"gone" not in r)
    expected = whole.report()
    assert any(r.rule_id == "referral_referrer" and r.in_force for r in expected.rows)
    rows = list(zip(members, raws, strict=True))
    with MemberWorkers(RuleBook([DEFAULT]), REF004, groups) as workers:
        workers.send("warm", rows[:2000])
        for i in range(2000, len(rows), 700):
            workers.send("feed", rows[i : i + 700])
        report, skipped = workers.finish()
    assert skipped == 1
    assert report == expected


def test_summaries_of_disjoint_members_add_up_to_the_single_process_report() -> None:
    """What a worker hands back is a per-rule summary; the parent adds them. Split by
    referral component, the sum is the report of one process over everyone."""
    raws = [json.dumps(e).encode() for e in synthetic_history(5000, members=200, seed=11)]
    events = [activity_adapter.validate_json(r) for r in raws]
    groups = referral_groups((e.member_id, r) for e, r in zip(events, raws, strict=True)
                             if b"referrer_id" in r)  # fmt: skip
    book = RuleBook([DEFAULT])
    whole = Simulation(book, REF004).feed_all(events)
    parts = [Simulation(book, REF004) for _ in range(3)]
    for e in events:
        parts[worker_of(e.member_id, groups, 3)].feed(e)
    assert all(p.events for p in parts)
    summaries = []
    for p in parts:
        lanes = p.lane_results()
        summaries.append(summarize(lanes["in_force"], lanes["candidate"]))
    progress = merge_progress(p.progress() for p in parts)
    expected = whole.report()
    assert report_of(summaries, progress, REF004.version) == expected
    assert expected.total.members_affected > 0
    assert sum(s.members for s in summaries) == expected.members


def test_member_workers_take_rows_only_once_they_know_the_referral_components() -> None:
    """The workers start before the referral links are read (`route_by` comes later);
    rows sent before would be split blindly, and routing cannot change after rows."""
    member, raw = "m-00001", json.dumps(next(synthetic_history(1, members=1))).encode()
    with MemberWorkers(RuleBook([DEFAULT]), REF004) as workers:
        with pytest.raises(RuntimeError, match="route_by"):
            workers.send("feed", [(member, raw)])
        workers.route_by({})
        workers.send("feed", [(member, raw)])
        with pytest.raises(RuntimeError, match="cannot change"):
            workers.route_by({member: "m-00002"})
        report, skipped = workers.finish()
    assert (report.events, skipped) == (1, 0)


def test_member_split_keeps_a_referral_chain_in_one_worker() -> None:
    """m-d referred by m-a (gold), m-a by m-e: m-d's first purchase pays m-a at m-a's gold
    cash rate and m-e the indirect bonus. Split by member alone (m-d and m-a land in
    different workers) the report differs; split by referral component it does not."""
    at = iter(T0 + timedelta(hours=i) for i in range(100))

    def ev(member: str, kind: str, data: dict[str, object]) -> tuple[str, bytes]:
        body = {"event_id": f"e-{member}-{kind}-{len(data)}-{next(at).isoformat()}",
                "occurred_at": next(at).isoformat(), "member_id": member,
                "store_id": "sh-jingan", "source": "test", "type": kind, "data": data}  # fmt: skip
        return member, json.dumps(body).encode()

    def buy(member: str, oid: str, amount: str) -> tuple[str, bytes]:
        item = {"project_code": "thermage", "category": "t", "amount": amount}
        return ev(member, "purchase", {"order_id": oid, "amount": amount, "items": [item]})

    rows = [
        ev("m-a", "member_registered", {"referrer_id": "m-e"}),
        buy("m-a", "o-1", "35000.00"),
        ev("m-d", "member_registered", {"referrer_id": "m-a"}),
        buy("m-d", "o-2", "388.00"),
        buy("m-f", "o-3", "680.00"),
    ]
    assert worker_of("m-d", {}, 2) != worker_of("m-a", {}, 2)
    whole = Simulation(RuleBook([DEFAULT]), REF004)
    whole.feed_all(activity_adapter.validate_json(raw) for _, raw in rows)
    expected = whole.report()
    assert {r.rule_id for r in expected.rows} >= {"referral_referrer", "referral_indirect"}
    groups = referral_groups([r for r in rows if b"referrer_id" in r[1]])
    assert worker_of("m-d", groups, 2) == worker_of("m-a", groups, 2) == worker_of("m-e", groups, 2)
    reports = {}
    for name, g in (("by_member", {}), ("by_component", groups)):
        with MemberWorkers(RuleBook([DEFAULT]), REF004, g) as workers:
            workers.send("feed", rows)
            reports[name], _ = workers.finish()
    assert reports["by_component"] == expected
    assert reports["by_member"] != expected


# Found by a reviewing helper (2026-11-29): cash at the tier each member ends the period at.
BOOK = RuleBook([DEFAULT])


def test_purchase_and_its_full_refund_cost_nothing_in_cash() -> None:
    """A member's first purchase of 30,000 CNY crosses gold; it is then fully refunded.
    Net points 0, so the cash liability must be 0 too."""
    buy = purchase("m-1", amount=30000, at=T0, order_id="o-1")
    back = refund("m-1", "o-1", 30000, at=T0 + timedelta(days=1))
    report = Simulation(BOOK, DEFAULT).feed_all([buy, back]).report()
    assert report.total.in_force == 0
    # Was -76.50: the grant valued at the member rate (100/CNY), the take-back at gold's (80).
    assert report.total.cash_in_force == Decimal("0.00")


def test_cash_is_valued_at_the_tier_the_member_ends_at_not_an_expired_one() -> None:
    """Gold reached at T0, kept 12 months; the next purchase is 13 months later, after
    the tier expired (rolling spend 0 -> member). Its points are priced at 1.0x (member)
    and must be valued at the member rate (100 points = 1 CNY)."""
    first = purchase("m-1", amount=30000, at=T0, order_id="o-1")
    later = purchase("m-1", amount=1000, at=T0 + timedelta(days=400), order_id="o-2")
    sim = Simulation(BOOK, DEFAULT)
    sim.warm_up(first)
    report = sim.feed_all([later]).report()
    rows = {r.rule_id: r for r in report.rows}
    assert rows["base"].in_force == 1000  # priced at member's 1.0: the tier did expire
    # Was 13.75: 1,100 points valued at the expired gold's 80 points per CNY.
    assert report.total.cash_in_force == Decimal("11.00")


def test_a_burst_ops_released_is_paid_in_the_in_force_lane() -> None:
    """21 reviews with adopted suggestions in one minute: live holds the 21st, ops release
    it (`rules held release`), and it pays. The in-force lane counted it unpaid."""
    from services.rules.engine import evaluate, release

    events = [review("m-1", at=T0 + timedelta(seconds=i), suggestion=True) for i in range(21)]
    state, live, held = MemberState(member_id="m-1"), 0, []
    for e in events:
        r = evaluate(state, e, DEFAULT, {}, BOOK.tiers_at)
        state, held = r.state, [*held, *r.held]
        live += sum(g.data.points for g in r.grants if isinstance(g, PointsGranted))
    assert len(held) == 1
    r = release(state, held[0], DEFAULT, {}, BOOK.tiers_at)
    live += sum(g.data.points for g in r.grants if isinstance(g, PointsGranted))
    released = {held[0].event.event_id: T0 + timedelta(minutes=1)}
    report = Simulation(BOOK, DEFAULT, released=released).feed_all(events).report()
    assert report.held_in_force == 1
    assert report.total.in_force == live
    # The candidate lane holds it too, and nobody released it under the candidate.
    assert report.held_candidate == 1
    assert report.total.candidate == live - 200


def test_members_are_those_with_an_event_in_the_period() -> None:
    """The report's `members` counted every member the warm-up had seen."""
    sim = Simulation(BOOK, DEFAULT)
    for i in range(50):
        sim.warm_up(purchase(f"old-{i}", amount=100, at=T0 - timedelta(days=300)))
    report = sim.feed_all([purchase("m-1", amount=100, at=T0)]).report()
    assert report.members == 1


HALF = ruleset(version="2026.2", effective_from=(T0 + timedelta(days=1)).isoformat(),
               redemption={"points_per_cny": {"member": 50, "silver": 50, "gold": 40,
                                              "diamond": 30}})  # fmt: skip
HALF_BOOK = RuleBook([DEFAULT, HALF])


def _buy(member: str, oid: str, amount: str, at: datetime) -> tuple[str, bytes]:
    item = {"project_code": "thermage", "category": "t", "amount": amount}
    body = {"event_id": f"e-{oid}", "occurred_at": at.isoformat(), "member_id": member,
            "store_id": "sh-jingan", "source": "test", "type": "purchase",
            "data": {"order_id": oid, "amount": amount, "items": [item]}}  # fmt: skip
    return member, json.dumps(body).encode()


def test_cash_does_not_depend_on_how_members_are_split_across_workers() -> None:
    """The in-force lane valued points at the rates of the lane's last event: with the
    member workers each worker has its own, so m-a (only a v1 event) was valued at v1's
    100/CNY in its worker and at v2's 50/CNY in a single process. One set of rates now."""
    rows = [
        _buy("m-a", "o-1", "1000.00", T0),
        _buy("m-d", "o-2", "1000.00", T0 + timedelta(days=2)),
    ]
    assert worker_of("m-a", {}, 2) != worker_of("m-d", {}, 2)
    whole = Simulation(HALF_BOOK, DEFAULT).feed_all(
        activity_adapter.validate_json(r) for _, r in rows
    )
    expected = whole.report()
    with MemberWorkers(HALF_BOOK, DEFAULT, {}) as workers:
        workers.send("feed", rows)
        split, _ = workers.finish()
    assert split.total.in_force == expected.total.in_force
    assert split.total.cash_in_force == expected.total.cash_in_force


def test_a_referrer_paid_in_the_period_is_one_of_its_members() -> None:
    """`members` counts the referrer the period paid, so `members affected` never exceeds it."""
    from rules_factories import registered

    sim = Simulation(BOOK, DEFAULT)
    sim.warm_up(registered("m-new", referrer="m-ref", at=T0 - timedelta(days=1)))
    report = sim.feed_all([purchase("m-new", amount=500, at=T0)]).report()
    assert report.members == 2
    assert report.total.members_affected <= report.members


def test_cash_at_the_periods_end_counts_a_tier_that_ended_before_it() -> None:
    """Gold (80 points per CNY) reached in the warm-up ends 12 months later, before the
    period's end, with no event of the member after it: valued at the member rate (100),
    as the ledger's tier sweep would have dropped it, not at gold's."""
    sim = Simulation(BOOK, DEFAULT, valued_at=T0 + timedelta(days=400))
    sim.warm_up(purchase("m-1", amount=30000, at=T0, order_id="o-1"))
    report = sim.feed_all([review("m-1", at=T0 + timedelta(days=30))]).report()
    assert report.total.in_force == 50
    assert report.total.cash_in_force == Decimal("0.50")
    held = Simulation(BOOK, DEFAULT, valued_at=T0 + timedelta(days=60))
    held.warm_up(purchase("m-1", amount=30000, at=T0, order_id="o-1"))
    gold = held.feed_all([review("m-1", at=T0 + timedelta(days=30))]).report()
    assert gold.total.cash_in_force == Decimal("0.63")  # 50 / 80, still gold then


def test_sign_ups_go_first_at_their_instant_but_not_before_the_members_own_events() -> None:
    from services.rules.backtest import sign_ups_first

    t0, t1 = T0, T0 + timedelta(seconds=1)
    rows = [
        ("m-x", b"1", t0, False),
        ("m-b", b"2", t1, False),  # m-b buys ...
        ("m-b", b"3", t1, True),  # ... then names a referrer: stays after
        ("m-a", b"4", t1, True),  # another member's sign-up: goes first
        ("m-c", b"5", t1, True),
        ("m-y", b"6", t1 + timedelta(seconds=1), False),
    ]
    assert [r[1] for r in sign_ups_first(rows)] == [b"1", b"4", b"5", b"2", b"3", b"6"]
    plain = [("m-x", b"1", t0, False), ("m-y", b"2", t1, True)]
    assert sign_ups_first(plain) is plain  # no shared instant: the chunk as it came
