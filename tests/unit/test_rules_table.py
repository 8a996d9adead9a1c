"""Table of scenarios: every rule and the interactions between them, net points per rule."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pytest
from rules_factories import (
    DEFAULT,
    REF004,
    T0,
    Run,
    purchase,
    referral,
    refund,
    registered,
    review,
    ruleset,
    share,
    sign_in,
    state_with,
    visit,
)

from schemas.activity import Activity
from services.rules.ruleset import RuleSet

H = timedelta(hours=1)
D = timedelta(days=1)
M = timedelta(minutes=1)
OK = {"first_purchase_done": True}
CAMPAIGN = {
    "name": "double",
    "starts_at": T0 - D,
    "ends_at": T0 + D,
    "multiplier": 2,
}


@dataclass(frozen=True)
class Case:
    name: str
    events: Callable[[], Sequence[Activity]]
    expected: dict[str, int]
    others: dict[str, dict[str, int]] = field(default_factory=dict)
    rules: RuleSet = DEFAULT
    state: dict[str, Any] = field(default_factory=dict)
    held: int = 0


def days(n: int, start: datetime = T0) -> list[Activity]:
    return [sign_in(at=start + i * D) for i in range(n)]


CASES = [
    # --- purchases ---
    Case("first purchase", lambda: [purchase(amount=100)], {"base": 100, "first_purchase": 200}),
    Case(
        "below big ticket",
        lambda: [purchase(amount="999.99")],
        {"base": 999, "first_purchase": 200},
    ),
    Case(
        "first beats 1000 big",
        lambda: [purchase(amount=1000)],
        {"base": 1000, "first_purchase": 200},
    ),
    Case(
        "3000 big ticket wins", lambda: [purchase(amount=3000)], {"base": 3000, "big_ticket": 600}
    ),
    Case(
        "1000 big ticket",
        lambda: [purchase(amount=1000)],
        {"base": 1000, "big_ticket": 100},
        state=OK,
    ),
    Case(
        "new project once",
        lambda: [
            purchase(amount=500, items=["gold-rf-microneedle"]),
            purchase(amount=500, items=["gold-rf-microneedle"]),
        ],
        {"base": 1000, "new_project": 500},
        state=OK,
    ),
    Case(
        "new project counted even when not the bonus paid",
        lambda: [
            purchase(amount=3000, items=["gold-rf-microneedle"]),
            purchase(amount=100, items=["gold-rf-microneedle"]),
        ],
        {"base": 3100, "big_ticket": 600},
        state=OK,
    ),
    Case(
        "combo",
        lambda: [purchase(amount=400, items=["facial-basic", "neck-shoulder-massage"])],
        {"base": 400, "combo": 300},
        state=OK,
    ),
    Case(
        "half a combo",
        lambda: [purchase(amount=400, items=["facial-basic"])],
        {"base": 400},
        state=OK,
    ),
    Case(
        "combo beats 1000 big ticket",
        lambda: [purchase(amount=1200, items=["facial-basic", "neck-shoulder-massage"])],
        {"base": 1200, "combo": 300},
        state=OK,
    ),
    Case(
        "stacking allowed",
        lambda: [
            purchase(
                amount=3000, items=["facial-basic", "neck-shoulder-massage", "gold-rf-microneedle"]
            )
        ],
        {"base": 3000, "big_ticket": 600, "first_purchase": 200, "new_project": 500, "combo": 300},
        rules=ruleset(purchase={"stack_purchase_bonuses": True}),
    ),
    Case(
        "silver x1.2",
        lambda: [purchase(amount=500)],
        {"base": 600},
        state={**OK, "tier": "silver", "tier_valid_until": T0 + 30 * D},
    ),
    Case(
        "diamond 3000",
        lambda: [purchase(amount=3000)],
        {"base": 6000, "big_ticket": 600},
        state={**OK, "tier": "diamond", "tier_valid_until": T0 + 30 * D},
    ),
    Case(
        "campaign x2",
        lambda: [purchase(amount=300)],
        {"base": 600},
        state=OK,
        rules=ruleset(campaigns=[CAMPAIGN]),
    ),
    Case(
        "campaign over",
        lambda: [purchase(amount=300, at=T0 + 2 * D)],
        {"base": 300},
        state=OK,
        rules=ruleset(campaigns=[CAMPAIGN]),
    ),
    Case(
        "campaign other store",
        lambda: [purchase(amount=300)],
        {"base": 300},
        state=OK,
        rules=ruleset(campaigns=[{**CAMPAIGN, "store_ids": ["bj-1"]}]),
    ),
    Case(
        "campaign this store",
        lambda: [purchase(amount=300)],
        {"base": 600},
        state=OK,
        rules=ruleset(campaigns=[{**CAMPAIGN, "store_ids": ["sh-jingan"]}]),
    ),
    Case(
        "campaign on half the items",
        lambda: [purchase(amount=400, items=["hydrafacial", "thermage"])],
        {"base": 600},
        state=OK,
        rules=ruleset(campaigns=[{**CAMPAIGN, "project_codes": ["thermage"]}]),
    ),
    Case(
        # 1/3 as a Decimal is 0.333...3: the share is kept as a fraction, or this pays 399.
        "campaign on a third of the items pays exactly",
        lambda: [purchase(amount=300, items=["hydrafacial", "thermage", "botox"])],
        {"base": 400},
        state=OK,
        rules=ruleset(campaigns=[{**CAMPAIGN, "project_codes": ["thermage"]}]),
    ),
    Case(
        "campaign on a third of the items, a quarter refunded",
        lambda: [
            purchase(amount=300, items=["hydrafacial", "thermage", "botox"], order_id="o-3"),
            refund("m-1", "o-3", 75, at=T0 + H),
        ],
        {"base": 300},  # 225 kept x 4/3
        state=OK,
        rules=ruleset(campaigns=[{**CAMPAIGN, "project_codes": ["thermage"]}]),
    ),
    Case(
        "campaign on a third of the items against a whole-order x1.2: the larger wins",
        lambda: [purchase(amount=300, items=["hydrafacial", "thermage", "botox"])],
        {"base": 400},
        state=OK,
        rules=ruleset(
            campaigns=[
                {**CAMPAIGN, "project_codes": ["thermage"]},
                {**CAMPAIGN, "name": "small", "multiplier": "1.2"},
            ]
        ),
    ),
    Case(
        "birthday month x2",
        lambda: [purchase(amount=300)],
        {"base": 600},
        state={**OK, "birthday": "03-15"},
    ),
    Case(
        "not birthday month",
        lambda: [purchase(amount=300)],
        {"base": 300},
        state={**OK, "birthday": "04-15"},
    ),
    Case(
        "gold + campaign + birthday multiply",
        lambda: [purchase(amount=100)],
        {"base": 600},
        state={**OK, "birthday": "03-01", "tier": "gold", "tier_valid_until": T0 + 30 * D},
        rules=ruleset(campaigns=[CAMPAIGN]),
    ),
    Case(
        "overlapping campaigns take the largest",
        lambda: [purchase(amount=100)],
        {"base": 300},
        state=OK,
        rules=ruleset(campaigns=[CAMPAIGN, {**CAMPAIGN, "name": "triple", "multiplier": 3}]),
    ),
    Case("zero amount earns nothing", lambda: [purchase(amount=0)], {}),
    Case(
        "same order twice",
        lambda: [purchase(amount=100, order_id="o"), purchase(amount=100, order_id="o")],
        {"base": 100, "first_purchase": 200},
    ),
    # --- refunds ---
    Case(
        "half refund keeps big ticket",
        lambda: [purchase(amount=2000, order_id="o"), refund("m-1", "o", 1000)],
        {"base": 1000, "big_ticket": 100},
        state=OK,
    ),
    Case(
        "refund below big ticket",
        lambda: [purchase(amount=1200, order_id="o"), refund("m-1", "o", 300)],
        {"base": 900},
        state=OK,
    ),
    Case(
        "full refund of first purchase",
        lambda: [purchase(amount=3000, order_id="o"), refund("m-1", "o", 3000)],
        {},
    ),
    Case(
        "refund shifts the largest bonus",
        lambda: [purchase(amount=3000, order_id="o"), refund("m-1", "o", 2500)],
        {"base": 500, "first_purchase": 200},
    ),
    Case(
        "refund over amount is capped",
        lambda: [
            purchase(amount=500, order_id="o"),
            refund("m-1", "o", 400),
            refund("m-1", "o", 400),
        ],
        {},
    ),
    Case(
        "refund unknown order",
        lambda: [purchase(amount=500), refund("m-1", "zzz", 400)],
        {"base": 500},
        state=OK,
    ),
    Case(
        "refund after tier upgrade, at silver rate",
        lambda: [
            purchase(amount=10000, order_id="a"),
            purchase(amount=1000, order_id="b", at=T0 + H),
            refund("m-1", "b", 1000, at=T0 + 2 * H),
        ],
        {"base": 10000, "big_ticket": 600},
        state=OK,
    ),
    Case(
        "refund of crossing purchase drops tier",
        lambda: [
            purchase(amount=10000, order_id="a"),
            refund("m-1", "a", 10000, at=T0 + H),
            purchase(amount=100, at=T0 + 2 * H),
        ],
        {"base": 100},
        state=OK,
    ),
    # --- visits ---
    Case("on time, booked exactly 24h ahead", lambda: [visit(lead=24 * H)], {"on_time_visit": 50}),
    Case("booked 23h ahead", lambda: [visit(lead=23 * H)], {}),
    Case("15 min late is on time", lambda: [visit(late=15 * M)], {"on_time_visit": 50}),
    Case("16 min late", lambda: [visit(late=16 * M)], {}),
    Case(
        "three on time",
        lambda: [visit(slot=T0 + i * D) for i in range(3)],
        {"on_time_visit": 150, "punctuality_streak": 200},
    ),
    Case(
        "late visit resets streak",
        lambda: [
            visit(slot=T0),
            visit(slot=T0 + D, late=30 * M),
            visit(slot=T0 + 2 * D),
            visit(slot=T0 + 3 * D),
        ],
        {"on_time_visit": 150},
    ),
    Case(
        "short-notice visit neither earns nor breaks",
        lambda: [
            visit(slot=T0),
            visit(slot=T0 + D),
            visit(slot=T0 + 2 * D, lead=H),
            visit(slot=T0 + 3 * D),
        ],
        {"on_time_visit": 150, "punctuality_streak": 200},
    ),
    Case(
        "missed visit resets streak",
        lambda: [
            visit(slot=T0),
            visit(slot=T0 + D),
            visit(slot=T0 + 2 * D, late=None),
            visit(slot=T0 + 3 * D),
        ],
        {"on_time_visit": 150},
    ),
    Case(
        "same booking twice",
        lambda: [visit(booking_id="b"), visit(booking_id="b")],
        {"on_time_visit": 50},
    ),
    Case(
        "six on time",
        lambda: [visit(slot=T0 + i * D) for i in range(6)],
        {"on_time_visit": 300, "punctuality_streak": 400},
    ),
    # --- sign-in ---
    Case("sign in", lambda: [sign_in()], {"sign_in": 5}),
    Case("second sign-in same day", lambda: [sign_in(), sign_in(at=T0 + H)], {"sign_in": 5}),
    Case("seven days", lambda: days(7), {"sign_in": 35, "sign_in_streak": 20}),
    Case("gap breaks the week", lambda: [*days(6), *days(1, T0 + 7 * D)], {"sign_in": 35}),
    Case("fourteen days", lambda: days(14), {"sign_in": 70, "sign_in_streak": 40}),
    Case(
        "Shanghai midnight splits days",
        lambda: [
            sign_in(at=T0.replace(hour=23, minute=30)),
            sign_in(at=T0.replace(hour=23, minute=30) + H),
        ],
        {"sign_in": 10},
    ),
    # --- reviews ---
    Case("review", lambda: [review()], {"review": 50}),
    Case("featured review", lambda: [review(featured=True)], {"featured_review": 100}),
    Case(
        "suggestion adopted",
        lambda: [review(suggestion=True)],
        {"review": 50, "suggestion_adopted": 200},
    ),
    Case(
        "review re-sent as featured tops up",
        lambda: [review(review_id="r"), review(review_id="r", featured=True)],
        {"review": 50, "featured_review": 50},
    ),
    Case(
        "review re-sent",
        lambda: [review(review_id="r", suggestion=True), review(review_id="r", suggestion=True)],
        {"review": 50, "suggestion_adopted": 200},
    ),
    # --- shares ---
    Case("approved share", lambda: [share(approved=True)], {"share": 100}),
    Case("9 likes", lambda: [share(approved=False, likes=9)], {}),
    Case("10 likes", lambda: [share(approved=False, likes=10)], {"share": 100}),
    Case(
        "share re-sent with more likes",
        lambda: [share(share_id="s", likes=10, approved=False), share(share_id="s", likes=50)],
        {"share": 100},
    ),
    Case("three shares hit the cap", lambda: [share(), share(), share()], {"share": 200}),
    Case(
        "four shares, no cap, three paid",
        lambda: [share() for _ in range(4)],
        {"share": 300},
        rules=ruleset(engagement={"daily_cap": None}),
    ),
    Case(
        "fourth share pays the next day",
        lambda: [*[share(share_id=f"s{i}") for i in range(4)], share(share_id="s3", at=T0 + D)],
        {"share": 400},
        rules=ruleset(engagement={"daily_cap": None}),
    ),
    # --- cap interactions ---
    Case(
        "cap cuts sign-in",
        lambda: [review(featured=True), review(featured=True), sign_in()],
        {"featured_review": 200},
    ),
    Case(
        "cap pays remainder of streak day",
        lambda: [*days(6, T0 - 6 * D), review(featured=True), review(), sign_in(at=T0 + H)],
        {"sign_in": 35, "featured_review": 100, "review": 50, "sign_in_streak": 5},
        rules=ruleset(engagement={"daily_cap": 160}),
    ),
    Case(
        "suggestion not capped",
        lambda: [review(featured=True), review(featured=True), review(suggestion=True)],
        {"featured_review": 200, "suggestion_adopted": 200},
    ),
    Case(
        "visits not capped",
        lambda: [review(featured=True), review(featured=True), visit()],
        {"featured_review": 200, "on_time_visit": 50},
    ),
    Case("cap resets next day", lambda: [share(), share(), share(at=T0 + D)], {"share": 300}),
    # --- referrals ---
    Case(
        "referral on first purchase",
        lambda: [registered(referrer="r-1"), purchase(amount=100)],
        {"base": 100, "first_purchase": 200, "referral_new_member": 500},
        others={"r-1": {"referral_referrer": 500}},
    ),
    Case(
        "referral chain",
        lambda: [
            registered("r-1", referrer="r-0"),
            registered(referrer="r-1"),
            purchase(amount=100),
        ],
        {"base": 100, "first_purchase": 200, "referral_new_member": 500},
        others={"r-1": {"referral_referrer": 500}, "r-0": {"referral_indirect": 50}},
    ),
    Case(
        "referral via referral event, paid once",
        lambda: [referral("m-1", "r-1"), purchase(amount=100), purchase(amount=100)],
        {"base": 200, "first_purchase": 200, "referral_new_member": 500},
        others={"r-1": {"referral_referrer": 500}},
    ),
    Case(
        "referral after first purchase",
        lambda: [purchase(amount=100), referral("m-1", "r-1"), purchase(amount=100)],
        {"base": 200, "first_purchase": 200},
        others={"r-1": {}},
    ),
    Case(
        "self referral",
        lambda: [registered(referrer="m-1"), purchase(amount=100)],
        {"base": 100, "first_purchase": 200},
    ),
    Case(
        "full refund takes referral back",
        lambda: [
            registered("r-1", referrer="r-0"),
            registered(referrer="r-1"),
            purchase(amount=100, order_id="o"),
            refund("m-1", "o", 100),
        ],
        {},
        others={"r-1": {}, "r-0": {}},
    ),
    Case(
        "partial refund keeps referral",
        lambda: [
            registered(referrer="r-1"),
            purchase(amount=100, order_id="o"),
            refund("m-1", "o", 50),
        ],
        {"base": 50, "first_purchase": 200, "referral_new_member": 500},
        others={"r-1": {"referral_referrer": 500}},
    ),
    # --- burst ---
    Case(
        "burst holds the 21st",
        lambda: [review(at=T0 + i * timedelta(seconds=1)) for i in range(21)],
        {"review": 200},
        held=1,
    ),
    Case(
        "no burst when spread",
        lambda: [review(at=T0 + i * 4 * timedelta(seconds=1)) for i in range(21)],
        {"review": 200},
        held=0,
    ),
    # --- reference-004 numbers ---
    Case(
        "ref004 purchase",
        lambda: [purchase(amount=600)],
        {"base": 600, "big_ticket": 50},
        rules=REF004,
    ),
    Case(
        "ref004 gold earns 1x",
        lambda: [purchase(amount=600)],
        {"base": 600, "big_ticket": 50},
        rules=REF004,
        state={"tier": "gold", "tier_valid_until": T0 + 30 * D},
    ),
    Case("ref004 approval alone", lambda: [share(approved=True)], {}, rules=REF004),
    Case("ref004 10 likes", lambda: [share(approved=False, likes=10)], {"share": 50}, rules=REF004),
    Case(
        "ref004 review",
        lambda: [review(), review(featured=True)],
        {"review": 10, "featured_review": 20},
        rules=REF004,
    ),
    Case("ref004 week of sign-ins", lambda: days(7), {"sign_in_streak": 20}, rules=REF004),
    Case(
        "ref004 referral chain",
        lambda: [
            registered("r-1", referrer="r-0"),
            registered(referrer="r-1"),
            purchase(amount=100),
        ],
        {"base": 100},
        others={"r-1": {"referral_referrer": 100}, "r-0": {"referral_indirect": 50}},
        rules=REF004,
    ),
    Case("ref004 visits off", lambda: [visit(slot=T0 + i * D) for i in range(3)], {}, rules=REF004),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_table(case: Case) -> None:
    run = Run(rules=case.rules)
    if case.state:
        run.states["m-1"] = state_with(**case.state)
    run.feed(list(case.events()))
    assert run.by_rule() == {k: v for k, v in case.expected.items() if v}
    for member, expected in case.others.items():
        assert run.by_rule(member) == expected, member
    assert len(run.held) == case.held


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 40
