"""Grants in, journal entries and read models out: the ledger's consumer, set-based.

Per batch: dedupe grants on their deterministic ids (within the batch and against the
journal), lock the touched members in sorted order, fold the grants through the pure
accounting core, then COPY the entries and new lots and update totals and tiers in a handful of
statements, with the ledger events going to the outbox in the same transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, tzinfo
from decimal import Decimal
from typing import Any, Final

import asyncpg
from aiokafka.structs import ConsumerRecord

from schemas.grants import PointsGranted, PointsRevoked, TierEvaluated, parse_grant
from schemas.ledger import TierChanged, TierChangedData
from services.common.config import Settings
from services.common.consumer import BatchWork, validate_records
from services.ledger import accounting as acc
from services.ledger.journal import (
    SELECT_MEMBER_ENTRIES,
    entry_from_row,
    entry_outbox_rows,
    load_books,
    outbox_rows,
    write_journal,
)
from services.ledger.reads import member_document
from services.ledger.rulebook import LedgerRules
from services.ledger.sweeper import EXPIRED

NO_SPEND: Final = Decimal("0.00")  # as a member row with no tier report shows it
# The batch's grants already applied: moves are in the journal, tier reports in the tier
# history (one round trip for both). What is new is COPYed; why that is safe under the
# consumer's offsets lock: services/common/consumer.py (bench/experiments/dedupe_writes.py:
# the tier history 13.0 -> 8.8 us of Postgres per row against INSERT … ON CONFLICT).
KNOWN_GRANTS: Final = """
SELECT entry_id FROM ledger_entries WHERE entry_id = ANY($1::text[])
UNION ALL
SELECT event_id FROM ledger_tier_history WHERE event_id = ANY($2::text[])
"""
TIER_COLUMNS: Final = [
    "event_id", "member_id", "occurred_at", "tier", "previous_tier", "qualifying_spend",
    "tier_valid_until", "next_tier", "next_tier_spend",
]  # fmt: skip
# The rules service reports a member's tier from their whole state after each event it
# applies, in the order it applies them (one grants partition per member keeps that order
# here): the report that arrived last is the member's tier now, even when it is dated
# before an earlier-arrived one (a late refund's). So the live row takes the last report
# to arrive, and rebuild, verify and ?as_of= read the history in arrival order (`seq`).
UPDATE_TIERS: Final = """
UPDATE ledger_members AS m SET tier = u.tier, qualifying_spend = u.spend,
    tier_valid_until = u.valid_until, next_tier = u.next_tier, next_tier_spend = u.next_spend
FROM unnest($1::text[], $2::text[], $3::numeric[], $4::timestamptz[], $5::text[], $6::numeric[])
    AS u(member_id, tier, spend, valid_until, next_tier, next_spend)
WHERE m.member_id = u.member_id
"""
TIER_AS_OF: Final = """
SELECT tier, qualifying_spend, tier_valid_until, next_tier, next_tier_spend
FROM ledger_tier_history
WHERE member_id = $1 AND occurred_at <= $2 ORDER BY seq DESC LIMIT 1
"""


def command_for(
    grant: PointsGranted | PointsRevoked,
    lifetime_months: int = acc.DEFAULT_LIFETIME_MONTHS,
    zone: tzinfo | None = None,
) -> acc.Earn | acc.Revoke:
    """`lifetime_months` and the `zone` whose calendar counts them: of the rule-set version
    that priced the grant (`LedgerRules`)."""
    d = grant.data
    if isinstance(grant, PointsGranted):
        return acc.Earn(
            lifetime_months=lifetime_months,
            entry_id=grant.event_id,
            points=d.points,
            occurred_at=grant.occurred_at,
            rule_id=d.rule_id,
            ruleset_version=d.ruleset_version,
            source_event_id=d.source_event_id,
            order_id=d.order_id,
            store_id=d.store_id,
            pending_days=grant.data.pending_days,
            zone=zone,
        )
    return acc.Revoke(
        entry_id=grant.event_id,
        points=d.points,
        occurred_at=grant.occurred_at,
        order_id=grant.data.order_id,
        rule_id=d.rule_id,
        ruleset_version=d.ruleset_version,
        source_event_id=d.source_event_id,
        store_id=d.store_id,
    )


def make_handler(settings: Settings, consumer_name: str, rules: LedgerRules):  # type: ignore[no-untyped-def]
    async def handle(
        conn: asyncpg.Connection, records: Sequence[ConsumerRecord], work: BatchWork
    ) -> None:
        good = validate_records(records, parse_grant, work, consumer_name, settings.topics.dlq)
        unique: dict[str, Any] = {}
        for _record, grant in good:
            unique.setdefault(grant.event_id, grant)
        moves = [g for g in unique.values() if not isinstance(g, TierEvaluated)]
        tiers = [g for g in unique.values() if isinstance(g, TierEvaluated)]
        if unique:
            known = {
                r[0]
                for r in await conn.fetch(
                    KNOWN_GRANTS, [g.event_id for g in moves], [t.event_id for t in tiers]
                )
            }
            moves = [g for g in moves if g.event_id not in known]
            tiers = [t for t in tiers if t.event_id not in known]
        if tiers:
            await _record_tiers(conn, tiers)
        members = sorted({g.member_id for g in moves} | {t.member_id for t in tiers})
        if not members:
            return
        before = await load_books(conn, members)
        after = dict(before)
        entries: list[acc.Entry] = []
        if moves:
            await rules.refresh(conn)
        for grant in moves:
            book = after[grant.member_id]
            version = grant.data.ruleset_version
            command = command_for(grant, rules.lifetime_months(version), rules.zone(version))
            book, new = acc.apply(book, command)
            entries.extend(new)
            after[grant.member_id] = book
        # A late grant (occurred_at over 12 months ago) made a lot that is already past its
        # expiry: journal its expiry now, in the same transaction, rather than leave it for
        # the sweeper. The expire entry ids are deterministic, so the sweeper agrees. Both
        # leave lots younger than the grace alone (`Settings.expiry_grace_seconds`).
        now = datetime.now(UTC) - timedelta(seconds=settings.expiry_grace_seconds)
        expired = 0
        for member_id in {g.member_id for g in moves}:
            book = after[member_id]
            book, new = acc.apply(book, acc.Expire(now))
            entries.extend(new)
            expired -= sum(e.points for e in new)
            after[member_id] = book
        await write_journal(conn, entries, before, after)
        if expired:
            work.counts.append((EXPIRED, expired))
        # An earn says which kind of activity caused it (a refund re-prices bonuses, and
        # can grant one): its entry id is its grant's id.
        causes = {g.event_id: g.data.source_type for g in moves if isinstance(g, PointsGranted)}
        work.outbox.extend(entry_outbox_rows(settings.topics.ledger, entries, causes))
        if tiers:
            work.outbox.extend(outbox_rows(settings.topics.ledger, await _apply_tiers(conn, tiers)))

    return handle


async def _record_tiers(conn: asyncpg.Connection, tiers: list[TierEvaluated]) -> None:
    """Append the new tier reports to the history, in arrival order (`seq`)."""
    await conn.copy_records_to_table(
        "ledger_tier_history",
        records=[
            (
                t.event_id,
                t.member_id,
                t.occurred_at,
                t.data.tier,
                t.data.previous_tier,
                t.data.qualifying_spend,
                t.data.tier_valid_until,
                t.data.next_tier,
                t.data.next_tier_spend,
            )
            for t in tiers
        ],
        columns=TIER_COLUMNS,
    )


async def _apply_tiers(conn: asyncpg.Connection, tiers: list[TierEvaluated]) -> list[TierChanged]:
    """Latest evaluation per member wins (one partition per member keeps them in order)."""
    latest: dict[str, TierEvaluated] = {}
    for t in tiers:
        latest[t.member_id] = t
    members = sorted(latest)
    await conn.execute(
        UPDATE_TIERS,
        members,
        [latest[m].data.tier for m in members],
        [latest[m].data.qualifying_spend for m in members],
        [latest[m].data.tier_valid_until for m in members],
        [latest[m].data.next_tier for m in members],
        [latest[m].data.next_tier_spend for m in members],
    )
    return [
        TierChanged(
            event_id=t.event_id,
            occurred_at=t.occurred_at,
            member_id=t.member_id,
            data=TierChangedData(
                previous_tier=t.data.previous_tier,
                tier=t.data.tier,
                qualifying_spend=t.data.qualifying_spend,
                tier_valid_until=t.data.tier_valid_until,
                ruleset_version=t.data.ruleset_version,
                source_event_id=t.data.source_event_id,
            ),
        )
        for t in tiers
        if t.data.tier != t.data.previous_tier
    ]


async def member_as_of(
    conn: asyncpg.Connection, member_id: str, at: datetime
) -> dict[str, Any] | None:
    """The member exactly as at `at`, folded from the journal (not from read models).

    Everything comes from `at` or before: the book from the journal, the tier and the next
    tier from the tier report in force then. A member with neither yet is not found, as
    it was not then.
    """
    member = await conn.fetchrow("SELECT * FROM ledger_members WHERE member_id = $1", member_id)
    if member is None:
        return None
    rows = await conn.fetch(SELECT_MEMBER_ENTRIES, member_id, at)
    tier = await conn.fetchrow(TIER_AS_OF, member_id, at)
    if not rows and tier is None:
        return None
    # Display only: the entries dated up to `at` need not be a consistent journal.
    book = acc.replay_as_of(member_id, (entry_from_row(r) for r in rows))
    snapshot = dict(member)
    snapshot.update(
        debt=book.debt,
        earned=book.earned,
        redeemed=book.redeemed,
        expired=book.expired,
        tier=tier["tier"] if tier else "member",
        qualifying_spend=tier["qualifying_spend"] if tier else NO_SPEND,
        tier_valid_until=tier["tier_valid_until"] if tier else None,
        next_tier=tier["next_tier"] if tier else None,
        next_tier_spend=tier["next_tier_spend"] if tier else None,
    )
    if tier is not None and tier["next_tier"] is None and tier["tier"] == member["tier"]:
        # A history row from before the next-tier columns existed (as `ledger rebuild`
        # does): the same tier's next tier now.
        snapshot.update(next_tier=member["next_tier"], next_tier_spend=member["next_tier_spend"])
    lots = [
        (lot.remaining, lot.available_from or lot.earned_at, lot.expires_at) for lot in book.lots
    ]
    return member_document(snapshot, lots, at)
