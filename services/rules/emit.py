"""Builders for grant events, so every rule derives ids and provenance the same way.

Ids come from `grant_id(source event, rule, member, kind)`: a replay or redelivery of the
same activity yields byte-identical grants that the ledger dedupes.

The rules themselves return plain `Payout` tuples (who, rule, points, ...): the backtest
only sums those, and building contract models for millions of replayed events was most of
its cost. `grant_events` turns payouts into the models the live service publishes.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal
from typing import Final, NamedTuple

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
)
from services.rules.ruleset import RuleSet
from services.rules.state import trusted
from services.rules.tiers import next_tier

AnyActivity = MemberRegistered | Purchase | Refund | CheckIn | Review | Share | Referral

# schemas.grants.grant_id's namespace; a unit test pins fast_grant_id to grant_id.
_NAMESPACE = uuid.UUID("6f1c2a4e-9b0d-4c53-8a61-3e2f7d5b9c10").bytes


def fast_grant_id(source_event_id: str, rule_id: str, member_id: str, kind: str = "grant") -> str:
    """`schemas.grants.grant_id` (a UUIDv5) without building a uuid.UUID: 3x faster."""
    name = f"{kind}|{source_event_id}|{rule_id}|{member_id}".encode()
    h = bytearray(hashlib.sha1(_NAMESPACE + name, usedforsecurity=False).digest()[:16])
    h[6] = (h[6] & 0x0F) | 0x50
    h[8] = (h[8] & 0x3F) | 0x80
    x = h.hex()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"


# (revoke, member_id, rule_id, points, order_id, ruleset version or None for the rule set's
# own): a plain tuple, as cheap to build as it gets; points are always positive.
Payout = tuple[bool, str, str, int, str | None, str | None]


class TierChange(NamedTuple):
    """What a `tier_evaluated` event reports (built only on the live path)."""

    previous: Tier
    tier: Tier
    spend: Decimal
    valid_until: datetime | None


GRANT: Final = False
REVOKE: Final = True


def grant_events(
    event: AnyActivity, ruleset: RuleSet, payouts: Iterable[Payout]
) -> list[GrantEvent]:
    """The contract models for payouts, in order (rules emit only positive points)."""
    out: list[GrantEvent] = []
    for revoke, member_id, rule_id, points, order_id, version in payouts:
        if revoke:
            out += revoked(event, rule_id, points, order_id=order_id or "",
                           version=version or ruleset.version, member_id=member_id)  # fmt: skip
        else:
            out += granted(event, ruleset, rule_id, points, member_id=member_id,
                           order_id=order_id, version=version)  # fmt: skip
    return out


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
        trusted(
            PointsGranted,
            event_id=fast_grant_id(event.event_id, rule_id, who, "grant"),
            occurred_at=event.occurred_at,
            member_id=who,
            data=trusted(
                GrantData,
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
        trusted(
            PointsRevoked,
            event_id=fast_grant_id(event.event_id, rule_id, who, "revoke"),
            occurred_at=event.occurred_at,
            member_id=who,
            data=trusted(
                RevokeData,
                rule_id=rule_id,
                ruleset_version=version,
                points=points,
                source_event_id=event.event_id,
                order_id=order_id,
                store_id=event.store_id,
            ),
        )
    ]


def tier_report(
    source_event_id: str,
    at: datetime,
    member_id: str,
    ruleset: RuleSet,
    *,
    previous: Tier,
    tier: Tier,
    spend: Decimal,
    valid_until: datetime | None,
) -> TierEvaluated:
    """A tier report caused by `source_event_id` (an activity, or a tier's own expiry)."""
    up = next_tier(tier, ruleset.tiers)
    return trusted(
        TierEvaluated,
        event_id=fast_grant_id(source_event_id, ruleset.rule_ids.tier, member_id, "tier"),
        occurred_at=at,
        member_id=member_id,
        data=trusted(
            TierData,
            tier=tier,
            previous_tier=previous,
            qualifying_spend=max(spend, Decimal(0)),
            tier_valid_until=valid_until,
            ruleset_version=ruleset.version,
            source_event_id=source_event_id,
            next_tier=up[0] if up else None,
            next_tier_spend=up[1] if up else None,
        ),
    )
