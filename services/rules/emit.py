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
from typing import Any, Final, NamedTuple, TypeVar

import orjson
from pydantic import BaseModel

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


M = TypeVar("M", bound=BaseModel)

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
    data = _built(
        GrantData,
        {
            "rule_id": rule_id,
            "ruleset_version": version or ruleset.version,
            "points": points,
            "source_event_id": event.event_id,
            "source_type": event.type,
            "store_id": event.store_id,
            "order_id": order_id,
            "pending_days": ruleset.pending_days,
        },
    )
    return [
        _built(
            PointsGranted,
            {
                "event_id": fast_grant_id(event.event_id, rule_id, who, "grant"),
                "schema_version": 1,
                "occurred_at": event.occurred_at,
                "member_id": who,
                "type": "points_granted",
                "data": data,
            },
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
    data = _built(
        RevokeData,
        {
            "rule_id": rule_id,
            "ruleset_version": version,
            "points": points,
            "source_event_id": event.event_id,
            "order_id": order_id,
            "store_id": event.store_id,
        },
    )
    return [
        _built(
            PointsRevoked,
            {
                "event_id": fast_grant_id(event.event_id, rule_id, who, "revoke"),
                "schema_version": 1,
                "occurred_at": event.occurred_at,
                "member_id": who,
                "type": "points_revoked",
                "data": data,
            },
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
    data = _built(
        TierData,
        {
            "tier": tier,
            "previous_tier": previous,
            "qualifying_spend": max(spend, Decimal(0)),
            "tier_valid_until": valid_until,
            "ruleset_version": ruleset.version,
            "source_event_id": source_event_id,
            "next_tier": up[0] if up else None,
            "next_tier_spend": up[1] if up else None,
        },
    )
    return _built(
        TierEvaluated,
        {
            "event_id": fast_grant_id(source_event_id, ruleset.rule_ids.tier, member_id, "tier"),
            "schema_version": 1,
            "occurred_at": at,
            "member_id": member_id,
            "type": "tier_evaluated",
            "data": data,
        },
    )


def _built(cls: type[M], fields: dict[str, Any]) -> M:
    """A grant model from values the evaluator computed and typed itself, unvalidated.

    Validating them cost most of the evaluator's time on the live path, and building
    through pydantic's `model_construct` or a generic builder still cost ~2 µs a model;
    this is ~0.5. `fields` holds every field of `cls` in declaration order, which is the
    order of the JSON (byte-identical grants): unit tests pin each builder above to the
    model pydantic validates from the same values, its key order and its JSON. (Times
    carry fixed offsets here, as parsed events and stored states do; a zone's ambiguous
    local time would serialise the same but compare unequal after a round trip.)
    """
    new = cls.__new__(cls)
    object.__setattr__(new, "__dict__", fields)
    object.__setattr__(new, "__pydantic_fields_set__", set(fields))
    object.__setattr__(new, "__pydantic_extra__", None)
    object.__setattr__(new, "__pydantic_private__", None)
    return new


def grant_json(grant: GrantEvent) -> bytes:
    """`grant.model_dump_json().encode()`, from one `orjson.dumps` of the models' dicts.

    The models' `__dict__`s are their fields in order (built above, or validated); orjson
    writes strings, ints, None and times as pydantic does (UTC as Z) for the values
    `_plain_time` lets through, and amounts are formatted by the function pydantic uses
    (`Money`). Anything else (an offset with seconds, which pydantic truncates and orjson
    rounds; a surrogate in a string) goes through `model_dump_json`. ~3.5 µs a grant less
    than building and dumping through pydantic, models included.
    """
    data = grant.data
    fields = data.__dict__
    if isinstance(data, TierData):
        until = data.tier_valid_until
        if until is not None and not _plain_time(until):
            return grant.model_dump_json().encode()
        up = data.next_tier_spend
        fields = {
            **fields,
            "qualifying_spend": format(data.qualifying_spend, "f"),
            "next_tier_spend": None if up is None else format(up, "f"),
        }
    if _plain_time(grant.occurred_at) and (isinstance(data, TierData) or type(data.points) is int):
        try:
            written = orjson.dumps({**grant.__dict__, "data": fields}, option=orjson.OPT_UTC_Z)
        except orjson.JSONEncodeError:
            pass
        else:
            # A copy, as the ledger's `ledger_event_json` keeps: orjson's output sits in a
            # 4 KiB buffer of its own, and a batch's rows are kept until the outbox COPY.
            return bytes(memoryview(written))
    return grant.model_dump_json().encode()


def _plain_time(t: datetime) -> bool:
    """Aware, offset in whole minutes (how pydantic and orjson write other offsets differs)."""
    if type(t) is not datetime:
        return False
    offset = t.utcoffset()
    return offset is not None and not offset.microseconds and not offset.seconds % 60
