"""Burst-held engagement events: ops list them, then release (pay) or reject each one.

A release prices the event under the rule-set version in force at its `occurred_at`,
against the member's *current* state (so the daily cap and per-id dedupe still apply),
and in one transaction updates the state, marks the row and puts the grants in the
outbox with service "rules": the running rules service's relay publishes them, so the
ledger sees released points exactly like any other grant (same deterministic ids).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Final

import asyncpg

from schemas.activity import CheckIn, Review, Share, parse_activity
from services.common.config import Settings
from services.common.outbox import OutboxRow, write_outbox
from services.rules.emit import grant_json
from services.rules.engine import HeldEvent, due_after, release
from services.rules.rulebook_store import load_book
from services.rules.state import MemberState, dump_state, load_state

SERVICE: Final = "rules"

SELECT_HELD: Final = """
SELECT event_id, member_id, type, occurred_at, reason, status, held_at, decided_at, decided_by,
       grants
FROM rules_held WHERE ($1::text IS NULL OR status = $1) ORDER BY held_at, event_id LIMIT $2
"""
LOCK_HELD: Final = "SELECT payload, reason, status FROM rules_held WHERE event_id = $1 FOR UPDATE"
LOCK_STATE: Final = """
SELECT state::text AS state, tier_due_at FROM rules_member_state WHERE member_id = $1
FOR UPDATE
"""
SELECT_REFERRERS: Final = """
SELECT member_id, referrer_id FROM rules_member_state WHERE member_id = ANY($1::text[])
"""
UPSERT_STATE: Final = """
INSERT INTO rules_member_state AS s (member_id, referrer_id, state, tier_valid_until,
                                     tier_due_at, updated_at)
VALUES ($1, $2, $3::text::json, $4, $5, now())  -- text: with or without a json codec
ON CONFLICT (member_id) DO UPDATE
SET referrer_id = EXCLUDED.referrer_id, state = EXCLUDED.state,
    tier_valid_until = EXCLUDED.tier_valid_until, tier_due_at = EXCLUDED.tier_due_at,
    updated_at = now()
"""
DECIDE: Final = """
UPDATE rules_held SET status = $2, decided_at = now(), decided_by = $3, grants = $4
WHERE event_id = $1
"""


class HeldError(Exception):
    """An unknown id, or an event already decided."""


@dataclass(frozen=True)
class Decision:
    event_id: str
    status: str
    points: int
    grants: int
    ruleset_version: str | None


async def list_held(
    conn: asyncpg.Connection, status: str | None = "pending", limit: int = 1000
) -> list[asyncpg.Record]:
    return list(await conn.fetch(SELECT_HELD, status, limit))


async def _lock_pending(conn: asyncpg.Connection, event_id: str) -> asyncpg.Record:
    row = await conn.fetchrow(LOCK_HELD, event_id)
    if row is None:
        raise HeldError(f"no held event {event_id!r}")
    if row["status"] != "pending":
        raise HeldError(f"held event {event_id!r} is already {row['status']}")
    return row


async def release_held(
    conn: asyncpg.Connection, settings: Settings, event_id: str, by: str
) -> Decision:
    async with conn.transaction():
        row = await _lock_pending(conn, event_id)
        event = parse_activity(row["payload"], stored=True)
        if not isinstance(event, CheckIn | Review | Share):
            raise HeldError(f"held event {event_id!r} is a {event.type}, not engagement")
        book = await load_book(conn)
        ruleset = book.at(event.occurred_at)
        # The rules consumer locks the same row per batch, so neither overwrites the other.
        stored = await conn.fetchrow(LOCK_STATE, event.member_id)
        state = (
            load_state(stored["state"])
            if stored is not None
            else MemberState(member_id=event.member_id)
        )
        referrers: dict[str, str | None] = {event.member_id: state.referrer_id}
        if state.referrer_id is not None:
            for r in await conn.fetch(SELECT_REFERRERS, [state.referrer_id]):
                referrers[r["member_id"]] = r["referrer_id"]
        held = HeldEvent(event=event, reason=row["reason"])
        result = release(state, held, ruleset, referrers, book.tiers_at)
        await conn.execute(
            UPSERT_STATE,
            event.member_id,
            result.state.referrer_id,
            dump_state(result.state).decode(),
            result.state.tier_valid_until,
            due_after(result, ruleset, stored["tier_due_at"] if stored is not None else None),
        )
        topic = settings.topics.grants
        await write_outbox(
            conn,
            SERVICE,
            [OutboxRow(topic, g.member_id, grant_json(g)) for g in result.grants],
        )
        await conn.execute(DECIDE, event_id, "released", by, len(result.grants))
    points = sum(g.data.points for g in result.grants if g.type == "points_granted")
    return Decision(event_id, "released", points, len(result.grants), ruleset.version)


async def reject_held(conn: asyncpg.Connection, event_id: str, by: str) -> Decision:
    async with conn.transaction():
        await _lock_pending(conn, event_id)
        await conn.execute(DECIDE, event_id, "rejected", by, 0)
    return Decision(event_id, "rejected", 0, 0, None)


def describe(row: asyncpg.Record) -> dict[str, object]:
    out: dict[str, object] = dict(row)
    for key, value in out.items():
        if isinstance(value, datetime):
            out[key] = value.isoformat()
    return out
