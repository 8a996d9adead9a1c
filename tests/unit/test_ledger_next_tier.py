"""`next_tier` of the member view (CONTRACT.md: {tier, spend_needed} or null) for a member
with no tier report yet: the rule set's lowest tier above "member", not null (null reads
as "already at the top tier")."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from services.ledger.reads import member_document, with_next_tier
from services.rules.ruleset import TierRules

NOW = datetime(2026, 6, 1, tzinfo=UTC)
DEFAULT_TIERS = TierRules()


def row(tier: str = "member", spend: str = "0.00", up: tuple[str, str] | None = None) -> dict:
    return {
        "member_id": "m-1", "tier": tier, "debt": 0, "earned": 50, "redeemed": 0,
        "expired": 0, "qualifying_spend": Decimal(spend), "tier_valid_until": None,
        "next_tier": up[0] if up else None,
        "next_tier_spend": Decimal(up[1]) if up else None,
    }  # fmt: skip


def test_no_tier_report_gets_the_lowest_tier_above_member_from_the_rules() -> None:
    doc = with_next_tier(member_document(row(), [], NOW), DEFAULT_TIERS)
    assert doc["next_tier"] == {"tier": "silver", "spend_needed": "10000.00"}


def test_spend_already_made_counts_and_never_goes_below_zero() -> None:
    doc = with_next_tier(member_document(row(spend="2500.50"), [], NOW), DEFAULT_TIERS)
    assert doc["next_tier"] == {"tier": "silver", "spend_needed": "7499.50"}
    over = with_next_tier(member_document(row(spend="12000.00"), [], NOW), DEFAULT_TIERS)
    assert over["next_tier"] == {"tier": "silver", "spend_needed": "0.00"}


def test_a_rule_set_without_silver_names_its_lowest_defined_tier() -> None:
    tiers = TierRules(thresholds={"gold": Decimal(5000), "diamond": Decimal(20000)})
    doc = with_next_tier(member_document(row(), [], NOW), tiers)
    assert doc["next_tier"] == {"tier": "gold", "spend_needed": "5000.00"}
    only_member = TierRules(thresholds={})
    assert with_next_tier(member_document(row(), [], NOW), only_member)["next_tier"] is None


def test_a_tier_report_and_the_top_tier_are_left_as_they_are() -> None:
    reported = member_document(row("silver", "12000.00", ("gold", "30000.00")), [], NOW)
    assert with_next_tier(reported, DEFAULT_TIERS)["next_tier"] == {
        "tier": "gold",
        "spend_needed": "18000.00",
    }
    top = member_document(row("diamond", "150000.00"), [], NOW)
    assert with_next_tier(top, DEFAULT_TIERS)["next_tier"] is None


def test_a_reported_spend_at_the_next_tier_needs_zero_with_two_decimals() -> None:
    # As qualifying_spend prints (numeric(20,2)): it printed "0" here.
    reported = member_document(row("member", "10000.00", ("silver", "10000.00")), [], NOW)
    assert reported["next_tier"] == {"tier": "silver", "spend_needed": "0.00"}
    assert reported["qualifying_spend"] == "10000.00"
