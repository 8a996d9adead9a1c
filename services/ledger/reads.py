"""Read-side queries of the ledger API: member view, entries page.

A read never counts a lot past its expiry, even before the sweeper has journaled it:
availability is decided here against the read time, not trusted from a stored total.
"""

from __future__ import annotations

import base64
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Final

import asyncpg

from services.rules.ruleset import TierRules
from services.rules.tiers import next_tier as next_tier_up

CENT: Final = Decimal("0.01")
EXPIRING_HORIZON: Final = timedelta(days=60)  # CONTRACT: `expiring` covers the next 60 days

# One round trip for the hottest call: the member row, repeated once per spendable lot.
MEMBER_WITH_LOTS: Final = """
SELECT m.*, l.remaining AS lot_remaining, l.available_from AS lot_available_from,
       l.expires_at AS lot_expires_at
FROM ledger_members m
LEFT JOIN ledger_lots l ON l.member_id = m.member_id AND l.remaining > 0
WHERE m.member_id = $1
"""
ENTRIES_PAGE: Final = """
SELECT seq, entry_id, kind, points, balance_after, rule_id, ruleset_version, source_event_id,
       redemption_id, adjustment_id, order_id, occurred_at, expires_at
FROM ledger_entries
WHERE member_id = $1 AND seq < $2
ORDER BY seq DESC
LIMIT $3
"""
MEMBER_KNOWN: Final = "SELECT EXISTS (SELECT 1 FROM ledger_members WHERE member_id = $1)"


def _iso(dt: datetime | None) -> str | None:
    return dt.isoformat() if dt else None


def member_document(
    member: asyncpg.Record | dict[str, Any], lots: list[Any], now: datetime
) -> dict[str, Any]:
    available = pending = unswept_expired = 0
    expiring: dict[datetime, int] = {}
    for lot in lots:
        remaining, available_from, expires_at = lot[0], lot[1], lot[2]
        if expires_at <= now:
            unswept_expired += remaining
            continue
        if available_from > now:
            pending += remaining
        else:
            available += remaining
        if expires_at <= now + EXPIRING_HORIZON:
            expiring[expires_at] = expiring.get(expires_at, 0) + remaining
    spend: Decimal = member["qualifying_spend"]
    next_tier = None
    if member["next_tier"] and member["next_tier_spend"] is not None:
        next_tier = {
            "tier": member["next_tier"],
            "spend_needed": format(
                max(Decimal(0), member["next_tier_spend"] - spend).quantize(CENT), "f"
            ),
        }
    return {
        "member_id": member["member_id"],
        "tier": member["tier"],
        "points": {
            "available": available,
            "pending": pending,
            "debt": member["debt"],
            "earned": member["earned"],
            "redeemed": member["redeemed"],
            "expired": member["expired"] + unswept_expired,
        },
        "qualifying_spend": format(spend, "f"),
        "tier_valid_until": _iso(member["tier_valid_until"]),
        "next_tier": next_tier,
        "expiring": [
            {"points": pts, "expires_at": _iso(at)} for at, pts in sorted(expiring.items())
        ],
        "as_of": now.isoformat(),
    }


def lacks_next_tier(doc: dict[str, Any]) -> bool:
    """A member still at the floor with no next tier: no tier report yet (reviews only, no
    purchase), or one from before the next-tier columns existed. `with_next_tier` fills it
    in; null stays for a member at the top tier, which is never "member"."""
    return doc["next_tier"] is None and doc["tier"] == "member"


def with_next_tier(doc: dict[str, Any], tiers: TierRules) -> dict[str, Any]:
    """The lowest tier above "member" that ``tiers`` (the rule set in force at the view's
    moment) defines, with the spend still needed from the member's qualifying spend."""
    if lacks_next_tier(doc):
        up = next_tier_up("member", tiers)
        if up is not None:
            needed = max(Decimal(0), up[1] - Decimal(doc["qualifying_spend"])).quantize(CENT)
            doc["next_tier"] = {"tier": up[0], "spend_needed": format(needed, "f")}
    return doc


async def member_view(
    conn: asyncpg.Connection, member_id: str, now: datetime
) -> dict[str, Any] | None:
    rows = await conn.fetch(MEMBER_WITH_LOTS, member_id)
    if not rows:
        return None
    lots = [
        (r["lot_remaining"], r["lot_available_from"], r["lot_expires_at"])
        for r in rows
        if r["lot_remaining"] is not None
    ]
    return member_document(rows[0], lots, now)


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(str(seq).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """Raises ValueError on a cursor we did not issue."""
    padded = cursor + "=" * (-len(cursor) % 4)
    seq = int(base64.urlsafe_b64decode(padded.encode()).decode())
    if not 0 < seq < 2**63:  # journal sequence numbers are bigint
        raise ValueError("cursor out of range")
    return seq


async def entries_page(
    conn: asyncpg.Connection, member_id: str, limit: int, cursor: str | None
) -> dict[str, Any] | None:
    """Newest first, keyed on the journal sequence: stable while new entries arrive. None
    for the first page of a member the ledger has no record of, a 404 as in the member
    view; a member known from a tier report alone has a record and an empty page."""
    before = decode_cursor(cursor) if cursor else 2**63 - 1
    rows = await conn.fetch(ENTRIES_PAGE, member_id, before, limit + 1)
    if not rows and not cursor and not await conn.fetchval(MEMBER_KNOWN, member_id):
        return None
    page = rows[:limit]
    return {
        "entries": [
            {
                "entry_id": r["entry_id"],
                "kind": r["kind"],
                "points": r["points"],
                "balance_after": r["balance_after"],
                "rule_id": r["rule_id"],
                "ruleset_version": r["ruleset_version"],
                "source_event_id": r["source_event_id"],
                "redemption_id": r["redemption_id"],
                "adjustment_id": r["adjustment_id"],
                "order_id": r["order_id"],
                "occurred_at": _iso(r["occurred_at"]),
                "expires_at": _iso(r["expires_at"]),
            }
            for r in page
        ],
        "next_cursor": encode_cursor(page[-1]["seq"]) if len(rows) > limit else None,
    }
