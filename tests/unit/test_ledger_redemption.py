"""The redemption policy: catalogue, cash rates per tier, rounding."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.grants import TIERS, Tier
from services.ledger.redemption import (
    DEFAULT_CASH_RATES,
    DEFAULT_CATALOGUE,
    DEFAULT_POLICY,
    RedemptionPolicy,
    Reward,
    UnknownReward,
    cash_value,
    points_for_cash,
    reward_points,
)
from services.ledger.redemptions import Refused, normalise_cash


def test_default_catalogue_matches_the_domain() -> None:
    assert {reward.code: reward.points for reward in DEFAULT_CATALOGUE} == {
        "face-mask": 500,
        "neck-shoulder-massage": 3_000,
        "free-facial": 5_000,
        "priority-booking": 2_000,
        "skincare-plan": 5_000,
        "device-treatment": 20_000,
        "lucky-draw": 100,
    }
    assert reward_points("face-mask") == 500
    assert DEFAULT_POLICY.reward("lucky-draw").name_zh == "抽奖一次"
    assert DEFAULT_POLICY.rewards["free-facial"].points == 5_000
    assert DEFAULT_POLICY.min_balance == 500


def test_unknown_reward() -> None:
    with pytest.raises(UnknownReward):
        reward_points("yacht")


def test_default_cash_rates() -> None:
    assert dict(DEFAULT_CASH_RATES) == {"member": 100, "silver": 100, "gold": 80, "diamond": 60}


@pytest.mark.parametrize(
    ("tier", "cny", "expected"),
    [
        ("member", Decimal("1"), 100),
        ("silver", Decimal("25.50"), 2550),
        ("gold", Decimal("1"), 80),
        ("gold", Decimal("10.01"), 801),  # 800.8 rounds up
        ("diamond", Decimal("1"), 60),
        ("diamond", Decimal("0.01"), 1),  # 0.6 rounds up
        ("diamond", Decimal("100"), 6000),
        ("member", Decimal("0"), 0),
    ],
)
def test_points_for_cash_rounds_up(tier: Tier, cny: Decimal, expected: int) -> None:
    assert points_for_cash(tier, cny) == expected


@pytest.mark.parametrize(
    ("tier", "points", "expected"),
    [
        ("member", 100, Decimal("1.00")),
        ("member", 199, Decimal("1.99")),
        ("silver", 5, Decimal("0.05")),
        ("gold", 85, Decimal("1.06")),  # 1.0625 rounds down
        ("gold", 79, Decimal("0.98")),  # 0.9875 rounds down
        ("diamond", 100, Decimal("1.66")),  # 1.666.. rounds down
        ("diamond", 0, Decimal("0.00")),
    ],
)
def test_cash_value_rounds_down_to_the_fen(tier: Tier, points: int, expected: Decimal) -> None:
    value = cash_value(tier, points)
    assert value == expected
    assert value.as_tuple().exponent == -2


def test_conversions_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        points_for_cash("gold", Decimal("-1"))
    with pytest.raises(ValueError, match="non-negative"):
        points_for_cash("gold", Decimal("NaN"))
    with pytest.raises(ValueError, match="negative"):
        cash_value("gold", -1)
    with pytest.raises(ValueError, match="unknown tier"):
        points_for_cash("platinum", Decimal("1"))  # type: ignore[arg-type]


def test_another_clinic_passes_its_own_numbers() -> None:
    policy = RedemptionPolicy(
        min_balance=1000,
        cash_rates={"member": 200, "silver": 150, "gold": 120, "diamond": 50},
        catalogue=(Reward("spa-day", 8000, "Spa day", "水疗日"),),
    )
    assert policy.min_balance == 1000
    assert points_for_cash("silver", Decimal("2"), policy) == 300
    assert cash_value("diamond", 75, policy) == Decimal("1.50")
    assert reward_points("spa-day", policy) == 8000
    with pytest.raises(UnknownReward):
        policy.reward("face-mask")
    # Frozen, and the rates cannot be changed behind its back.
    with pytest.raises(TypeError):
        policy.cash_rates["gold"] = 1  # type: ignore[index]


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="missing"):
        RedemptionPolicy(cash_rates={"member": 100})
    with pytest.raises(ValueError, match="positive"):
        RedemptionPolicy(cash_rates={**DEFAULT_CASH_RATES, "gold": 0})
    with pytest.raises(ValueError, match="unique"):
        RedemptionPolicy(catalogue=(DEFAULT_CATALOGUE[0], DEFAULT_CATALOGUE[0]))
    with pytest.raises(ValueError, match="negative"):
        RedemptionPolicy(min_balance=-1)
    with pytest.raises(ValueError, match="positive"):
        Reward("free", 0, "Free", "免费")


fen_amounts = st.integers(min_value=0, max_value=10_000_000).map(lambda f: Decimal(f).scaleb(-2))


@given(st.sampled_from(TIERS), fen_amounts)
def test_points_for_cash_is_the_least_that_covers_the_amount(tier: Tier, cny: Decimal) -> None:
    needed = points_for_cash(tier, cny)
    assert cash_value(tier, needed) >= cny  # paying that many points covers the amount
    if needed > 0:
        assert cash_value(tier, needed - 1) < cny  # and one point fewer would not


@given(st.sampled_from(TIERS), st.integers(min_value=0, max_value=10**9))
def test_cash_value_never_overpays(tier: Tier, points: int) -> None:
    value = cash_value(tier, points)
    rate = DEFAULT_CASH_RATES[tier]
    assert value * rate <= points
    assert (value + Decimal("0.01")) * rate > points
    assert points_for_cash(tier, value) <= points


def test_a_rule_sets_redemption_section_becomes_the_ledgers_policy() -> None:
    from services.ledger.rulebook import policy_of
    from services.rules.ruleset import RedemptionRules

    policy = policy_of(
        RedemptionRules(
            min_balance=100,
            points_per_cny={"member": 50, "silver": 50, "gold": 40, "diamond": 30},
            catalogue={"face-mask": 400, "spa-day": 700},
        )
    )
    assert policy.min_balance == 100
    assert policy.points_for_cash("gold", Decimal("10")) == 400
    assert policy.reward("face-mask") == Reward("face-mask", 400, "Face mask", "面膜")
    assert policy.reward("spa-day").points == 700
    with pytest.raises(UnknownReward):
        policy.reward("lucky-draw")
    # The default rule set's section is the ledger's default policy.
    assert policy_of(RedemptionRules()) == DEFAULT_POLICY


@pytest.mark.parametrize("raw", ["1" * 27, "1" * 13, "1e30", "0.001", "-1", "NaN", "x"])
def test_normalise_cash_refuses_what_it_cannot_price(raw: str) -> None:
    """A 422 (Refused) naming the field, never decimal.InvalidOperation (a 500)."""
    with pytest.raises(Refused) as refused:
        normalise_cash(raw)
    assert refused.value.status == 422
    assert refused.value.extra["errors"][0]["field"] == "body.cash"


def test_normalise_cash_keeps_the_fen() -> None:
    assert normalise_cash("10") == Decimal("10.00")
    assert normalise_cash("0" * 20 + "999999999999.5") == Decimal("999999999999.50")
