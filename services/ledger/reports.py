"""`GET /v1/reports/summary`: the owner's dashboard numbers, SQL aggregates over the journal.

Definitions (documented in the API description too):

* ``issued`` / ``redeemed`` / ``expired``: points of earn / redeem / expire entries whose
  ``occurred_at`` is in ``[from, to)`` (positive numbers). With ``store_id``, an expiry
  counts for the store of the lot's earning entry.
* ``adjusted``: the signed sum of manual adjustments in the period (ops' own number).
* ``outstanding``: points held now (unexpired lots, pending included) minus debt; with
  ``store_id``, the lots earned at that store. A snapshot of *now*, not of ``to``: the
  point-in-time member view (``as_of``) is where history is replayed.
* ``liability_cny``: ``outstanding`` in cash, each member's points at their tier's cash
  rate (100 / 100 / 80 / 60 points per CNY by default), to the fen.
* ``redemption_rate``: ``redeemed / issued`` in the period (0 when nothing was issued).
* ``active_members``: members with at least one entry in the period (at the store).
* ``by_rule``: points issued per rule id in the period; ``tiers``: members per tier now
  (with ``store_id``: members who ever had an entry at that store).
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any, Final

import asyncpg

from schemas.grants import TIERS
from services.ledger.redemption import DEFAULT_POLICY, RedemptionPolicy
from services.ledger.redemptions import tier_of

PERIOD_TOTALS: Final = """
SELECT e.kind, e.rule_id, sum(e.points)::bigint AS points, count(*) AS n
FROM ledger_entries AS e
LEFT JOIN ledger_entries AS src
       ON e.kind = 'expire' AND src.entry_id = e.allocations -> 0 ->> 0
WHERE e.occurred_at >= $1 AND e.occurred_at < $2
  AND ($3::text IS NULL OR COALESCE(e.store_id, src.store_id) = $3)
GROUP BY e.kind, e.rule_id
"""
ACTIVE_MEMBERS: Final = """
SELECT count(DISTINCT member_id) FROM ledger_entries
WHERE occurred_at >= $1 AND occurred_at < $2 AND ($3::text IS NULL OR store_id = $3)
"""
# Points held per tier now: unexpired lots (pending included) less each member's debt.
OUTSTANDING_BY_TIER: Final = """
WITH held AS (
    SELECT l.member_id, sum(l.remaining)::bigint AS points
    FROM ledger_lots AS l
    LEFT JOIN ledger_entries AS src ON $2::text IS NOT NULL AND src.entry_id = l.lot_id
    WHERE l.remaining > 0 AND l.expires_at > $1 AND ($2::text IS NULL OR src.store_id = $2)
    GROUP BY l.member_id
)
SELECT m.tier, sum(GREATEST(h.points - CASE WHEN $2::text IS NULL THEN m.debt ELSE 0 END, 0))
           ::bigint AS points
FROM held AS h JOIN ledger_members AS m USING (member_id)
GROUP BY m.tier
"""
TIERS_COUNT: Final = """
SELECT tier, count(*) AS members FROM ledger_members AS m
WHERE $1::text IS NULL
   OR EXISTS (SELECT 1 FROM ledger_entries AS e WHERE e.member_id = m.member_id
              AND e.store_id = $1)
GROUP BY tier
"""
_CENT: Final = Decimal("0.01")


async def summary(
    conn: asyncpg.Connection,
    start: datetime,
    end: datetime,
    store_id: str | None,
    now: datetime,
    policy: RedemptionPolicy = DEFAULT_POLICY,
) -> dict[str, Any]:
    issued = redeemed = expired = adjusted = 0
    by_rule: dict[str, int] = {}
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        for r in await conn.fetch(PERIOD_TOTALS, start, end, store_id):
            points = int(r["points"])
            if r["kind"] == "earn":
                issued += points
                rule = r["rule_id"] or "unknown"
                by_rule[rule] = by_rule.get(rule, 0) + points
            elif r["kind"] == "redeem":
                redeemed += -points
            elif r["kind"] == "expire":
                expired += -points
            elif r["kind"] == "adjust":
                adjusted += points
        active = await conn.fetchval(ACTIVE_MEMBERS, start, end, store_id)
        held = await conn.fetch(OUTSTANDING_BY_TIER, now, store_id)
        tier_rows = await conn.fetch(TIERS_COUNT, store_id)
    outstanding = 0
    liability = Decimal(0)
    for r in held:
        tier = tier_of(r["tier"])
        outstanding += int(r["points"])
        liability += Decimal(int(r["points"])) / policy.rate(tier)
    tiers = dict.fromkeys(TIERS, 0)
    for r in tier_rows:
        tiers[r["tier"]] = int(r["members"])
    rate = Decimal(redeemed) / Decimal(issued) if issued else Decimal(0)
    return {
        "from": start.isoformat(),
        "to": end.isoformat(),
        "store_id": store_id,
        "issued": issued,
        "redeemed": redeemed,
        "expired": expired,
        "adjusted": adjusted,
        "outstanding": outstanding,
        "liability_cny": format(liability.quantize(_CENT), "f"),
        "redemption_rate": float(rate.quantize(Decimal("0.0001"))),
        "active_members": int(active or 0),
        "by_rule": dict(sorted(by_rule.items())),
        "tiers": tiers,
        "as_of": now.isoformat(),
    }
