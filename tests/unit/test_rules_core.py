"""Core earning rules, refunds and tiers, including the worked examples of DOMAIN.md."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

from rules_factories import (
    DEFAULT,
    T0,
    Run,
    by_rule,
    order_of,
    purchase,
    refund,
    ruleset,
    state_with,
    visit,
)

from schemas.grants import PointsGranted, PointsRevoked, TierEvaluated, grant_id
from services.rules.engine import evaluate, expire_tier, tier_expiry_id
from services.rules.pruning import add_months
from services.rules.ruleset import RuleBook
from services.rules.state import dump_state, load_state


def test_worked_example_gold_facial_package_3850() -> None:
    run = Run()
    run.states["m-1"] = state_with(
        tier="gold", tier_valid_until=T0 + timedelta(days=200), first_purchase_done=True
    )
    result = run.feed(purchase(amount=2500, items=["facial-package"]))
    assert by_rule(result.grants) == {"base": 3750, "big_ticket": 100}
    assert run.balance() == 3850


def test_worked_example_new_project_with_on_time_visit_2350() -> None:
    run = Run()
    run.feed(purchase(amount=200, at=T0 - timedelta(days=30)))
    before = run.balance()
    run.feed(
        purchase(amount=1800, items=["gold-rf-microneedle"]),
        visit(slot=T0 + timedelta(hours=1), lead=timedelta(days=1)),
    )
    assert run.balance() - before == 2350
    assert run.by_rule()["new_project"] == 500


def test_base_points_use_tier_multiplier_and_round_down() -> None:
    for tier, expected in [("member", 999), ("silver", 1198), ("gold", 1498), ("diamond", 1998)]:
        run = Run()
        run.states["m-1"] = state_with(
            tier=tier, first_purchase_done=True, tier_valid_until=T0 + timedelta(days=30)
        )
        result = run.feed(purchase(amount="999.00"))
        assert by_rule(result.grants) == {"base": expected}, tier


def test_fractional_amount_rounds_down_at_end() -> None:
    run = Run()
    run.states["m-1"] = state_with(
        tier="silver", first_purchase_done=True, tier_valid_until=T0 + timedelta(days=30)
    )
    result = run.feed(purchase(amount="10.99"))
    assert by_rule(result.grants) == {"base": 13}  # 10.99 * 1.2 = 13.188


def test_big_ticket_steps_not_multiplied() -> None:
    run = Run()
    run.states["m-1"] = state_with(
        tier="diamond", first_purchase_done=True, tier_valid_until=T0 + timedelta(days=30)
    )
    assert by_rule(run.feed(purchase(amount=999)).grants) == {"base": 1998}
    assert by_rule(run.feed(purchase(amount=1000)).grants) == {"base": 2000, "big_ticket": 100}
    assert by_rule(run.feed(purchase(amount=3000)).grants) == {"base": 6000, "big_ticket": 600}


def test_first_purchase_bonus_only_once() -> None:
    run = Run()
    assert by_rule(run.feed(purchase(amount=100)).grants) == {"base": 100, "first_purchase": 200}
    assert by_rule(run.feed(purchase(amount=100)).grants) == {"base": 100}


def test_only_largest_purchase_bonus_by_default() -> None:
    run = Run()
    result = run.feed(purchase(amount=3000, items=["gold-rf-microneedle"]))
    # candidates: big-ticket 600, first purchase 200, new project 500
    assert by_rule(result.grants) == {"base": 3000, "big_ticket": 600}


def test_stacking_when_rule_set_allows() -> None:
    run = Run(rules=ruleset(purchase={"stack_purchase_bonuses": True}))
    result = run.feed(purchase(amount=3000, items=["gold-rf-microneedle"]))
    assert by_rule(result.grants) == {
        "base": 3000,
        "big_ticket": 600,
        "first_purchase": 200,
        "new_project": 500,
    }


def test_partial_refund_revokes_proportionally_and_recomputes_bonus() -> None:
    run = Run()
    run.states["m-1"] = state_with(first_purchase_done=True)
    p = purchase(amount=1200)
    run.feed(p)
    assert run.balance() == 1300
    result = run.feed(refund("m-1", order_of(p), 600))
    revoked = {g.data.rule_id: g.data.points for g in result.grants if isinstance(g, PointsRevoked)}
    assert revoked == {"base": 600, "big_ticket": 100}
    assert run.balance() == 600
    assert all(g.data.points > 0 for g in result.grants if isinstance(g, PointsRevoked))


def test_full_refund_takes_back_everything() -> None:
    run = Run()
    p = purchase(amount=3500, items=["gold-rf-microneedle", "facial-basic"])
    run.feed(p)
    assert run.balance() > 0
    run.feed(refund("m-1", order_of(p), 1000), refund("m-1", order_of(p), 2500))
    assert run.balance() == 0


def test_refund_capped_at_order_amount_and_unknown_order_ignored() -> None:
    run = Run()
    p = purchase(amount=500)
    run.feed(p)
    run.feed(refund("m-1", order_of(p), 400))
    run.feed(refund("m-1", order_of(p), 400))
    assert run.balance() == 0
    assert run.state().orders[order_of(p)].refunded == Decimal(500)
    after = len(run.grants)
    run.feed(refund("m-1", order_of(p), 100), refund("m-1", "nope", 100))
    assert len(run.grants) == after


def test_crossing_purchase_earns_at_old_multiplier_next_at_new() -> None:
    run = Run()
    run.states["m-1"] = state_with(first_purchase_done=True)
    first = run.feed(purchase(amount=10000))
    assert by_rule(first.grants)["base"] == 10000
    tier_events = [g for g in first.grants if isinstance(g, TierEvaluated)]
    assert [(t.data.previous_tier, t.data.tier) for t in tier_events] == [("member", "silver")]
    assert (tier_events[0].data.next_tier, tier_events[0].data.next_tier_spend) == (
        "gold",
        Decimal(30000),
    )
    second = run.feed(purchase(amount=100, at=T0 + timedelta(hours=1)))
    assert by_rule(second.grants) == {"base": 120}


def test_tier_kept_12_months_then_dropped_on_rolling_spend() -> None:
    run = Run()
    run.states["m-1"] = state_with(first_purchase_done=True)
    run.feed(purchase(amount=30000))
    assert run.state().tier == "gold"
    assert run.state().tier_valid_until == add_months(T0, 12)
    # 13 months later, nothing bought since: tier lapses at its expiry, spend is 0.
    later = add_months(T0, 13)
    result = run.feed(purchase(amount=100, at=later))
    assert by_rule(result.grants) == {"base": 100}
    assert run.state().tier == "member"


def test_tier_kept_within_12_months_even_when_spend_leaves_window() -> None:
    run = Run()
    run.states["m-1"] = state_with(first_purchase_done=True)
    run.feed(purchase(amount=12000))
    run.feed(purchase(amount=100, at=add_months(T0, 11)))  # requalifies: 12,100 in window
    mid = add_months(T0, 12) + timedelta(days=10)  # the 12,000 left the window
    result = run.feed(purchase(amount=100, at=mid))
    assert by_rule(result.grants) == {"base": 120}
    assert run.state().tier == "silver"


def test_tier_drops_one_step_at_expiry_on_rolling_spend() -> None:
    run = Run()
    run.states["m-1"] = state_with(first_purchase_done=True)
    run.feed(purchase(amount=30000))
    refresh = add_months(T0, 12) - timedelta(days=1)
    run.feed(purchase(amount=5000, at=refresh))  # 35,000 in window: gold for 12 more months
    assert run.state().tier_valid_until == add_months(refresh, 12)
    run.feed(purchase(amount=12000, at=add_months(T0, 13)))  # 17,000: no requalification
    assert run.state().tier == "gold"
    result = run.feed(purchase(amount=10, at=add_months(T0, 24)))
    # At the expiry only the 12,000 is in the window: silver, and the 10 earns at 1.2.
    assert run.state().tier == "silver"
    assert by_rule(result.grants) == {"base": 12}
    tier_events = [g for g in result.grants if isinstance(g, TierEvaluated)]
    assert tier_events[0].data.previous_tier == "gold"
    assert tier_events[0].data.tier == "silver"


def test_refund_undoes_the_upgrade_it_caused() -> None:
    run = Run()
    run.states["m-1"] = state_with(first_purchase_done=True)
    p = purchase(amount=10000)
    run.feed(purchase(amount=2000, at=T0 - timedelta(days=3)), p)
    assert run.state().tier == "silver"
    result = run.feed(refund("m-1", order_of(p), 5000, at=T0 + timedelta(days=1)))
    assert run.state().tier == "member"
    assert run.state().tier_valid_until is None
    t = next(g for g in result.grants if isinstance(g, TierEvaluated))
    assert (t.data.previous_tier, t.data.tier, t.data.qualifying_spend) == (
        "silver",
        "member",
        Decimal(7000),
    )


def test_refund_of_an_earlier_order_undoes_an_upgrade_that_needed_its_money() -> None:
    # 20,000 makes silver; 10,000 more crosses 30,000 to gold. Refunding the 20,000 leaves
    # 10,000 of spend: the gold upgrade stood on money that was given back, so the member
    # is silver, as if the 20,000 had never been paid, and earns at 1.2 again.
    run = Run()
    run.states["m-1"] = state_with(first_purchase_done=True)
    run.feed(purchase(amount=20000, order_id="o-20k"))
    run.feed(purchase(amount=10000, order_id="o-10k", at=T0 + timedelta(days=1)))
    assert run.state().tier == "gold"
    result = run.feed(refund("m-1", "o-20k", 20000, at=T0 + timedelta(days=2)))
    assert run.state().tier == "silver"
    assert run.state().tier_valid_until == add_months(T0 + timedelta(days=1), 12)
    t = next(g for g in result.grants if isinstance(g, TierEvaluated))
    assert (t.data.previous_tier, t.data.tier) == ("gold", "silver")
    # The 10,000 order now records the tiers of that replay, for any later refund of it.
    assert run.state().orders["o-10k"].tier_before == "member"
    assert run.state().orders["o-10k"].tier_after == "silver"
    later = run.feed(purchase(amount=1000, order_id="o-1k", at=T0 + timedelta(days=3)))
    assert by_rule(later.grants)["base"] == 1200


def test_small_refund_does_not_restart_the_tiers_months() -> None:
    # Gold from one 50,000 order, kept 12 months. A 100 CNY refund in month 11 leaves
    # 49,900, still gold, but it is not a new qualification: gold still ends at month 12.
    run = Run()
    run.states["m-1"] = state_with(first_purchase_done=True)
    run.feed(purchase(amount=50000, order_id="o-big"))
    result = run.feed(refund("m-1", "o-big", 100, at=add_months(T0, 11)))
    assert (run.state().tier, run.state().tier_valid_until) == ("gold", add_months(T0, 12))
    # Reported, since qualifying spend moved; the tier and its end did not.
    t = next(g for g in result.grants if isinstance(g, TierEvaluated))
    assert (t.data.previous_tier, t.data.tier, t.data.qualifying_spend) == (
        "gold",
        "gold",
        Decimal(49900),
    )
    assert t.data.tier_valid_until == add_months(T0, 12)
    after = run.feed(purchase(amount=1000, order_id="o-later", at=add_months(T0, 13)))
    assert run.state().tier == "member"
    assert by_rule(after.grants)["base"] == 1000


def test_a_quiet_members_tier_expires_at_its_own_moment_as_the_next_event_would() -> None:
    # Gold from 30,000 at T0, then nothing: at T0 + 12 months the spend in the window is 0.
    run = Run()
    run.states["m-1"] = state_with(first_purchase_done=True)
    run.feed(purchase(amount=30000))
    until = add_months(T0, 12)
    expired = expire_tier(run.state(), DEFAULT)
    assert expired is not None
    new, report = expired
    assert (new.tier, new.tier_valid_until) == ("member", None)
    assert report.occurred_at == until
    assert (report.data.previous_tier, report.data.tier) == ("gold", "member")
    assert report.data.qualifying_spend == 0
    assert report.data.source_event_id == tier_expiry_id("m-1", until)
    assert report.event_id == grant_id(tier_expiry_id("m-1", until), "tier", "m-1", "tier")
    # The same decision as the member's next event makes when it comes first.
    after = run.feed(purchase(amount=100, at=until + timedelta(days=3)))
    assert (run.state().tier, run.state().tier_valid_until) == (new.tier, new.tier_valid_until)
    assert by_rule(after.grants)["base"] == 100
    assert expire_tier(new, DEFAULT) is None


def test_a_lapsed_gold_with_silver_spend_in_its_window_expires_to_silver_for_12_months() -> None:
    run = Run()
    run.states["m-1"] = state_with(first_purchase_done=True)
    run.feed(purchase(amount=30000))
    run.feed(purchase(amount=100, at=add_months(T0, 11)))  # 30,100: gold again, to T0 + 23m
    run.feed(purchase(amount=12000, at=add_months(T0, 13)))  # 12,100 in the window: no gold
    state = run.state()
    assert (state.tier, state.tier_valid_until) == ("gold", add_months(T0, 23))
    expired = expire_tier(state, DEFAULT)
    assert expired is not None
    new, report = expired
    # At T0 + 23 months the 12,000 of month 13 is in the window: silver, 12 months from then.
    assert (new.tier, new.tier_valid_until) == ("silver", add_months(T0, 35))
    assert (report.data.previous_tier, report.data.tier) == ("gold", "silver")
    assert report.data.qualifying_spend == Decimal(12000)
    assert report.data.tier_valid_until == add_months(T0, 35)


def test_a_refund_replays_the_tier_with_orders_already_forgotten() -> None:
    # 8,000 then 3,000 ten months later: silver. A purchase a year after the first makes
    # the evaluator forget the 8,000 order; a 100 CNY refund of the 3,000 one still finds
    # 10,900 at its moment (the forgotten order's spend is kept) and leaves silver alone.
    run = Run()
    run.states["m-1"] = state_with(first_purchase_done=True)
    run.feed(purchase(amount=8000, order_id="o-a"))
    run.feed(purchase(amount=3000, order_id="o-b", at=add_months(T0, 10)))
    run.feed(purchase(amount=100, order_id="o-c", at=add_months(T0, 13)))
    assert list(run.state().orders) == ["o-b", "o-c"]
    assert [(m.at, m.net) for m in run.state().spend_history] == [(T0, Decimal(8000))]
    run.feed(refund("m-1", "o-b", 100, at=add_months(T0, 14)))
    assert (run.state().tier, run.state().tier_valid_until) == ("silver", add_months(T0, 22))


def test_a_late_refund_does_not_undo_a_tier_expiry_already_applied() -> None:
    # Gold to month 18; the tier sweep lapses it there. A refund dated month 7 arrives after
    # that: its replay is brought up to the lapse already applied, not only to month 7.
    run = Run()
    run.states["m-1"] = state_with(first_purchase_done=True)
    run.feed(purchase(amount=30000, order_id="o-gold"))
    run.feed(purchase(amount=500, order_id="o-small", at=add_months(T0, 6)))
    expired = expire_tier(run.state(), DEFAULT)
    assert expired is not None
    run.states["m-1"] = expired[0]
    assert (expired[0].tier, expired[0].tier_checked_at) == ("member", add_months(T0, 18))
    late = run.feed(refund("m-1", "o-small", 100, at=add_months(T0, 7)))
    assert (run.state().tier, run.state().tier_valid_until) == ("member", None)
    assert all(
        g.data.tier == "member" for g in late.grants if isinstance(g, TierEvaluated)
    )  # no "upgrade" to a tier that already lapsed
    assert expire_tier(run.state(), DEFAULT) is None


def _book_raising_silver_at(moment: datetime) -> RuleBook:
    """The default rules, then from `moment` a version that asks 15,000 for silver."""
    thresholds = {"silver": 15000, "gold": 30000, "diamond": 100000}
    v2 = ruleset(version="2026.2", effective_from=moment, tiers={"thresholds": thresholds})
    return RuleBook([DEFAULT, v2])


def test_an_expiry_an_event_catches_up_on_is_decided_by_the_version_of_its_moment() -> None:
    # Gold to T0 + 23 months; at that moment the window holds the 12,000 of month 13, silver
    # under the default rules then in force. A version asking 15,000 for silver takes
    # effect a month later, before the member's next event.
    book = _book_raising_silver_at(add_months(T0, 24))
    run = Run()
    run.states["m-1"] = state_with(first_purchase_done=True)
    run.feed(purchase(amount=30000))
    run.feed(purchase(amount=100, at=add_months(T0, 11)))
    run.feed(purchase(amount=12000, at=add_months(T0, 13)))
    state = run.state()
    assert (state.tier, state.tier_valid_until) == ("gold", add_months(T0, 23))
    swept = expire_tier(state, book.at(add_months(T0, 23)))
    assert swept is not None
    assert (swept[0].tier, swept[0].tier_valid_until) == ("silver", add_months(T0, 35))
    # The member's next event, under the new version, decides that expiry the same way.
    later = purchase(amount=100, at=add_months(T0, 25))
    after = evaluate(state, later, book.at(later.occurred_at), {}, book.tiers_at).state
    assert (after.tier, after.tier_valid_until) == ("silver", add_months(T0, 35))


def test_a_refunds_replay_decides_each_order_by_the_version_of_its_moment() -> None:
    # 6,000 then 5,000: silver at the second order under the default rules. A version
    # asking 15,000 for silver comes later; a 100 CNY refund after it still leaves 10,900,
    # silver by the rules in force when that spend was made.
    book = _book_raising_silver_at(add_months(T0, 5))
    run = Run()
    run.states["m-1"] = state_with(first_purchase_done=True)
    run.feed(purchase(amount=6000, order_id="o-a"),
             purchase(amount=5000, order_id="o-b", at=add_months(T0, 2)))  # fmt: skip
    assert (run.state().tier, run.state().tier_valid_until) == ("silver", add_months(T0, 14))
    back = refund("m-1", "o-a", 100, at=add_months(T0, 6))
    after = evaluate(run.state(), back, book.at(back.occurred_at), {}, book.tiers_at).state
    assert (after.tier, after.tier_valid_until) == ("silver", add_months(T0, 14))


def test_grant_ids_are_deterministic_and_carry_version() -> None:
    p = purchase(amount=100, event_id="evt-1")
    a = evaluate(state_with(), p, DEFAULT, {})
    b = evaluate(state_with(), p, DEFAULT, {})
    assert a.grants == b.grants
    base = next(g for g in a.grants if isinstance(g, PointsGranted) and g.data.rule_id == "base")
    assert base.event_id == grant_id("evt-1", "base", "m-1", "grant")
    assert base.data.ruleset_version == "2026.1"
    assert base.occurred_at == p.occurred_at


def test_state_round_trips_through_json() -> None:
    run = Run()
    run.feed(purchase(amount=12000, items=["gold-rf-microneedle"]), visit())
    st = run.state()
    assert load_state(dump_state(st)) == st
