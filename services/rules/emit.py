"""Builders for grant events, so every rule derives ids and provenance the same way.

Ids come from `grant_id(source event, rule, member, kind)`: a replay or redelivery of the
same activity yields byte-identical grants that the ledger dedupes.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from schemas.activity import (
    CheckIn,
    MemberRegistered,
    Purchase,
    Referral,
    Refund,
    Review,
    Share,
)
from schemas.grants import (
    GrantData,
    GrantEvent,
    PointsGranted,
    PointsRevoked,
    RevokeData,
    Tier,
    TierData,
    TierEvaluated,
    grant_id,
)
from services.rules.ruleset import RuleSet
from services.rules.tiers import next_tier

AnyActivity = MemberRegistered | Purchase | Refund | CheckIn | Review | Share | Referral


def granted(
    event: AnyActivity,
    ruleset: RuleSet,
    rule_id: str,
    points: int,
    *,
    member_id: str | None = None,
    order_id: str | None = None,
    version: str | None = None,
) -> list[GrantEvent]:
    """A list of zero or one grant: a rule that computes 0 points emits nothing."""
    if points <= 0:
        return []
    who = member_id or event.member_id
    return [
        PointsGranted(
            event_id=grant_id(event.event_id, rule_id, who, "grant"),
            occurred_at=event.occurred_at,
            member_id=who,
            data=GrantData(
                rule_id=rule_id,
                ruleset_version=version or ruleset.version,
                points=points,
                source_event_id=event.event_id,
                source_type=event.type,
                store_id=event.store_id,
                order_id=order_id,
                pending_days=ruleset.pending_days,
            ),
        )
    ]


def revoked(
    event: AnyActivity,
    rule_id: str,
    points: int,
    *,
    order_id: str,
    version: str,
    member_id: str | None = None,
) -> list[GrantEvent]:
    if points <= 0:
        return []
    who = member_id or event.member_id
    return [
        PointsRevoked(
            event_id=grant_id(event.event_id, rule_id, who, "revoke"),
            occurred_at=event.occurred_at,
            member_id=who,
            data=RevokeData(
                rule_id=rule_id,
                ruleset_version=version,
                points=points,
                source_event_id=event.event_id,
                order_id=order_id,
                store_id=event.store_id,
            ),
        )
    ]


def tier_evaluated(
    event: AnyActivity,
    ruleset: RuleSet,
    *,
    previous: Tier,
    tier: Tier,
    spend: Decimal,
    valid_until: datetime | None,
) -> TierEvaluated:
    up = next_tier(tier, ruleset.tiers)
    return TierEvaluated(
        event_id=grant_id(event.event_id, ruleset.rule_ids.tier, event.member_id, "tier"),
        occurred_at=event.occurred_at,
        member_id=event.member_id,
        data=TierData(
            tier=tier,
            previous_tier=previous,
            qualifying_spend=max(spend, Decimal(0)),
            tier_valid_until=valid_until,
            ruleset_version=ruleset.version,
            source_event_id=event.event_id,
            next_tier=up[0] if up else None,
            next_tier_spend=up[1] if up else None,
        ),
    )
