"""`GET /v1/reports/summary`: the owner's dashboard numbers, SQL aggregates over the journal;
`GET /v1/reports/daily`: the summary's flows per local day, store and rule, for the charts.

The definitions are `SUMMARY_DEFINITIONS`, which the API description shows too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, tzinfo
from decimal import Decimal
from typing import Any, Final
from zoneinfo import ZoneInfo

import asyncpg

from schemas.grants import TIERS
from services.ledger.accounting import add_months
from services.ledger.redemption import DEFAULT_POLICY, RedemptionPolicy

SUMMARY_DEFINITIONS: Final = """\
* `issued` / `redeemed` / `expired`: points of earn / redeem / expire entries whose
  `occurred_at` is in `[from, to)` (positive numbers). With `store_id`, an expiry
  counts for the store of the lot's earning entry.
* `revoked`: points taken back by refunds in the period (positive), so that
  `issued - revoked - redeemed - expired + adjusted` accounts for the period's movement.
* `adjusted`: the signed sum of manual adjustments in the period (ops' own number).
* `outstanding`: points held now (unexpired lots, pending included), each member's less
  their debt but never below zero (one member's debt takes nothing from what another can
  redeem); with `store_id`, the lots earned at that store, without debt. A snapshot of
  *now*, not of `to`: the point-in-time member view (`as_of`) is where history is
  replayed.
* `debt`: what members owe now (refunds of points already spent) beyond the points they
  hold; null with `store_id` (a debt is a member's, not a store's). With it, the
  movement since the journal's start reconciles with the snapshot (once the sweeper has
  journaled the expiries due): outstanding − debt counts members in debt negative, as
  the journal does.
* `liability_cny`: `outstanding` in cash, each member's points at their tier's cash
  rate (100 / 100 / 80 / 60 points per CNY by default), rounded down to the fen per member
  as a cash redemption is (`RedemptionPolicy.cash_value`): what members could take.
* `redemption_rate`: `redeemed / issued` in the period (0 when nothing was issued).
* `active_members`: members who earned, redeemed or had a purchase refunded in the period
  (at the store); an expiry or an adjustment alone does not count.
* `by_rule`: points issued per rule id in the period; `tiers`: members per tier now
  (with `store_id`: members who ever had an entry at that store).
* `expiring_next_month`: points of unexpired lots that expire in the calendar month after
  the current one, in the rule set's time zone (`month`, `points`): the owner's "points
  expiring next month"; with `store_id`, lots earned at that store.
"""
# The store an entry counts for: an expiry's is its lot's earning entry's. Looked up for
# expiries alone: written as a join, it needs the store of every row and Postgres hashes
# the whole journal for it, years of entries for a month's figures.
_AT_STORE: Final = """COALESCE(e.store_id, (
    SELECT src.store_id FROM ledger_entries AS src
    WHERE e.kind = 'expire' AND src.entry_id = e.allocations -> 0 ->> 0))"""
PERIOD_TOTALS: Final = f"""
SELECT e.kind, e.rule_id, sum(e.points)::bigint AS points
FROM ledger_entries AS e
WHERE e.occurred_at >= $1 AND e.occurred_at < $2 AND ($3::text IS NULL OR {_AT_STORE} = $3)
GROUP BY e.kind, e.rule_id
"""
# PERIOD_TOTALS per local day, store and rule, in one scan of the period (index
# ledger_entries_occurred). The day is the entry's bucket among $4, the period's start and
# then each later day's first moment, computed in Python on the calendar the summary's
# next month and the rules use: Postgres's own time zone data may be older, or lack a zone
# the rule set names.
DAILY_TOTALS: Final = f"""
SELECT width_bucket(e.occurred_at, $4::timestamptz[]) AS day, {_AT_STORE} AS store_id,
       e.kind, e.rule_id, sum(e.points)::bigint AS points
FROM ledger_entries AS e
WHERE e.occurred_at >= $1 AND e.occurred_at < $2 AND ($3::text IS NULL OR {_AT_STORE} = $3)
GROUP BY 1, 2, 3, 4
"""
# Active: the member did something in the period (earned, redeemed, had a purchase
# refunded). An expiry is what happens to an inactive member, and an adjustment is ops'.
ACTIVE_MEMBERS: Final = """
SELECT count(DISTINCT member_id) FROM ledger_entries
WHERE occurred_at >= $1 AND occurred_at < $2 AND ($3::text IS NULL OR store_id = $3)
  AND kind IN ('earn', 'redeem', 'revoke')
"""
# Points held per tier now: unexpired lots (pending included) less each member's debt, never
# below zero; their cash value in fen, each member's rounded down at their tier's rate
# ($5 tiers, $6 points per CNY); and, in the same scan, the points of those lots that
# expire in [$3, $4).
OUTSTANDING_BY_TIER: Final = """
WITH held AS (
    SELECT l.member_id, sum(l.remaining)::bigint AS points,
           (sum(l.remaining) FILTER (WHERE l.expires_at >= $3 AND l.expires_at < $4))::bigint
               AS expiring
    FROM ledger_lots AS l
    LEFT JOIN ledger_entries AS src ON $2::text IS NOT NULL AND src.entry_id = l.lot_id
    WHERE l.remaining > 0 AND l.expires_at > $1 AND ($2::text IS NULL OR src.store_id = $2)
    GROUP BY l.member_id
), net AS (
    SELECT m.tier, h.expiring,
           GREATEST(h.points - CASE WHEN $2::text IS NULL THEN m.debt ELSE 0 END, 0) AS points
    FROM held AS h JOIN ledger_members AS m USING (member_id)
)
SELECT n.tier, sum(n.points)::bigint AS points, COALESCE(sum(n.expiring), 0)::bigint AS expiring,
       sum(div(n.points::numeric * 100, r.rate)) AS fen  -- exact: bigint x 100 overflowed
FROM net AS n JOIN unnest($5::text[], $6::bigint[]) AS r(tier, rate)
     -- an unknown tier value counts as member, as `redemptions.tier_of` reads it
     ON r.tier = CASE WHEN n.tier = ANY($5::text[]) THEN n.tier ELSE 'member' END
GROUP BY n.tier
"""
# What members owe beyond the unexpired points they hold ($1: now). Debt and points can
# stand together (a refund dated ahead of the clock takes only from lots unexpired at its
# date); `outstanding` already took such a debt off the member's points, and the whole
# debt again here counted it twice.
DEBT: Final = """
SELECT COALESCE(sum(GREATEST(m.debt - COALESCE(h.points, 0), 0)), 0)::bigint
FROM ledger_members AS m
LEFT JOIN (
    SELECT member_id, sum(remaining) AS points FROM ledger_lots
    WHERE remaining > 0 AND expires_at > $1 GROUP BY member_id
) AS h USING (member_id)
WHERE m.debt > 0
"""
TIERS_COUNT: Final = "SELECT tier, count(*) AS members FROM ledger_members GROUP BY tier"
# The members who ever had an entry at store $1, from the pairs the journal's trigger keeps
# (migration 0027): asked of the journal itself, nothing indexed it by store, and every
# call scanned all of it, years of entries.
TIERS_AT_STORE: Final = """
SELECT m.tier, count(*) AS members
FROM ledger_member_stores AS s JOIN ledger_members AS m USING (member_id)
WHERE s.store_id = $1
GROUP BY m.tier
"""
SHANGHAI: Final = ZoneInfo("Asia/Shanghai")
# A year's chart, a leap year's included, in one request; never a scan of years of journal.
MAX_DAYS: Final = 366


@dataclass
class Flows:
    """A period's movements as the summary reports them: what left as positive points, an
    adjustment signed, the points issued per rule."""

    issued: int = 0
    redeemed: int = 0
    expired: int = 0
    revoked: int = 0
    adjusted: int = 0
    by_rule: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, rule_id: str | None, points: int) -> None:
        if kind == "earn":
            self.issued += points
            rule = rule_id or "unknown"
            self.by_rule[rule] = self.by_rule.get(rule, 0) + points
        elif kind == "redeem":
            self.redeemed -= points
        elif kind == "expire":
            self.expired -= points
        elif kind == "adjust":
            self.adjusted += points
        elif kind == "revoke":
            self.revoked -= points

    def doc(self) -> dict[str, Any]:
        return {
            "issued": self.issued,
            "redeemed": self.redeemed,
            "expired": self.expired,
            "revoked": self.revoked,
            "adjusted": self.adjusted,
            "by_rule": dict(sorted(self.by_rule.items())),
        }


def next_month(now: datetime, zone: tzinfo) -> tuple[datetime, datetime]:
    """The calendar month after `now`'s, in `zone`: [its first midnight, the next one)."""
    local = now.astimezone(zone)
    first = datetime(local.year, local.month, 1, tzinfo=zone)
    start = add_months(first, 1)
    return start, add_months(start, 1)


async def summary(
    conn: asyncpg.Connection,
    start: datetime,
    end: datetime,
    store_id: str | None,
    now: datetime,
    policy: RedemptionPolicy = DEFAULT_POLICY,
    zone: tzinfo = SHANGHAI,
) -> dict[str, Any]:
    flows = Flows()
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        # Before the snapshot (a LOCK takes none): a rebuild's swap replaces these tables,
        # and a snapshot survives writes, not DROP + RENAME. Read after a swap that came
        # later, they showed none of the rebuilt rows (outstanding 0) or none of its tiers
        # (every member at member's rate); the swap now waits for the report, or the report
        # for the swap. Taken in the swap's order, so neither can deadlock the other.
        await conn.execute("LOCK TABLE ledger_members, ledger_lots IN ACCESS SHARE MODE")
        await conn.execute("SET LOCAL jit = off")  # as in `daily`: the store lookup's price
        for r in await conn.fetch(PERIOD_TOTALS, start, end, store_id):
            flows.add(r["kind"], r["rule_id"], int(r["points"]))
        active = await conn.fetchval(ACTIVE_MEMBERS, start, end, store_id)
        month, month_after = next_month(now, zone)
        rates = [policy.rate(tier) for tier in TIERS]
        held = await conn.fetch(
            OUTSTANDING_BY_TIER, now, store_id, month, month_after, list(TIERS), rates
        )
        debt = None if store_id is not None else int(await conn.fetchval(DEBT, now))
        if store_id is None:
            tier_rows = await conn.fetch(TIERS_COUNT)
        else:
            tier_rows = await conn.fetch(TIERS_AT_STORE, store_id)
    outstanding = expiring = fen = 0
    for r in held:
        outstanding += int(r["points"])
        expiring += int(r["expiring"])
        fen += int(r["fen"])
    tiers = dict.fromkeys(TIERS, 0)
    for r in tier_rows:
        tiers[r["tier"]] = int(r["members"])
    issued, redeemed = flows.issued, flows.redeemed
    rate = Decimal(redeemed) / Decimal(issued) if issued else Decimal(0)
    return {
        "from": start.isoformat(),
        "to": end.isoformat(),
        "store_id": store_id,
        "issued": issued,
        "redeemed": redeemed,
        "expired": flows.expired,
        "revoked": flows.revoked,
        "adjusted": flows.adjusted,
        "outstanding": outstanding,
        "debt": debt,
        "liability_cny": format(Decimal(fen).scaleb(-2), "f"),
        "redemption_rate": float(rate.quantize(Decimal("0.0001"))),
        "active_members": int(active or 0),
        "by_rule": dict(sorted(flows.by_rule.items())),
        "tiers": tiers,
        "expiring_next_month": {"month": month.strftime("%Y-%m"), "points": expiring},
        "as_of": now.isoformat(),
    }


def local_days(start: datetime, end: datetime, zone: tzinfo) -> list[date]:
    """The dates of `zone`'s calendar that [start, end) touches, each one: a day without
    entries is a zero on the chart, not a gap. More than `MAX_DAYS`: ValueError."""
    if end <= start:
        return []
    try:
        first = start.astimezone(zone).date()
        last = (end - timedelta.resolution).astimezone(zone).date()
    except OverflowError:  # 9999-12-31T23:00Z is already the year 10000 in Shanghai
        raise ValueError(f"the period is outside the years 1 to 9999 in {zone}") from None
    count = (last - first).days + 1
    if count > MAX_DAYS:
        raise ValueError(f"the period touches {count} days in {zone}, at most {MAX_DAYS}")
    return [first + timedelta(days=i) for i in range(count)]


async def daily(
    conn: asyncpg.Connection,
    start: datetime,
    end: datetime,
    store_id: str | None,
    days: list[date],
    zone: tzinfo,
) -> dict[str, Any]:
    """The summary's flows per day of `days` (`local_days` of the period), in total and per
    store: entries without one (adjustments, redemptions sent without a store) count in
    the day's total only."""
    totals = [Flows() for _ in days]
    stores: list[dict[str, Flows]] = [{} for _ in days]
    # The buckets' lower bounds: the period's start, then each later day's first moment.
    bounds = [start, *(datetime(d.year, d.month, d.day, tzinfo=zone) for d in days[1:])]
    rows: list[asyncpg.Record] = []
    if days:
        async with conn.transaction(readonly=True):
            # The planner prices the store lookup for every entry, not for the expiries it
            # runs for, and past its threshold compiles the query: 240 ms of a month's
            # 320 ms went to JIT (900,000 entries, 33,000 in the month).
            await conn.execute("SET LOCAL jit = off")
            rows = await conn.fetch(DAILY_TOTALS, start, end, store_id, bounds)
    for r in rows:
        day, kind, rule, points = r["day"] - 1, r["kind"], r["rule_id"], int(r["points"])
        totals[day].add(kind, rule, points)
        if r["store_id"] is not None:
            stores[day].setdefault(r["store_id"], Flows()).add(kind, rule, points)
    return {
        "from": start.isoformat(),
        "to": end.isoformat(),
        "store_id": store_id,
        "timezone": str(zone),
        "days": [
            {
                "day": d.isoformat(),
                **total.doc(),
                "stores": {s: f.doc() for s, f in sorted(at_store.items())},
            }
            for d, total, at_store in zip(days, totals, stores, strict=True)
        ],
    }
