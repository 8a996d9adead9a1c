"""The baseline: the same pipeline written the obvious way, for `make bench` to compare.

One FastStream handler call per message and one Postgres transaction per event, with the
same pure evaluator (`services.rules.engine.evaluate`), the same accounting core
(`services.ledger.accounting.decide/evolve`) and the same journal writes. Effectively-once
the obvious way too: the consumed offset is upserted in each event's transaction. Outputs
are published with `broker.publish` after the commit (no outbox), one message at a time.

Rules and ledger handlers run in this one process (`python -m bench.naive`), configured
from the same environment as the services, writing the same tables, so `bench.run`
measures it exactly as it measures the real pipeline.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

import asyncpg
import uvloop
from faststream import FastStream
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage

from schemas.activity import parse_activity
from schemas.grants import TierEvaluated, parse_grant
from services.common.config import load_settings
from services.common.runtime import create_pool
from services.ledger import accounting as acc
from services.ledger.journal import ledger_event, load_books, write_journal
from services.ledger.projector import command_for
from services.rules.engine import evaluate
from services.rules.rulebook_store import load_book
from services.rules.state import MemberState, dump_state, load_state

STORE_OFFSET: Final = """
INSERT INTO consumer_offsets AS o (consumer, topic, partition, next_offset)
VALUES ($1, $2, $3, $4) ON CONFLICT (consumer, topic, partition)
DO UPDATE SET next_offset = GREATEST(o.next_offset, EXCLUDED.next_offset), updated_at = now()
"""
INSERT_ACTIVITY: Final = """
INSERT INTO rules_activity (event_id, member_id, type, occurred_at, topic, partition, "offset",
                            payload)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (event_id) DO NOTHING RETURNING event_id
"""
SELECT_STATE: Final = "SELECT state::text FROM rules_member_state WHERE member_id = $1 FOR UPDATE"
SELECT_REFERRER: Final = "SELECT referrer_id FROM rules_member_state WHERE member_id = $1"
UPSERT_STATE: Final = """
INSERT INTO rules_member_state (member_id, referrer_id, state, tier_valid_until)
VALUES ($1, $2, $3::text::json, $4)
ON CONFLICT (member_id) DO UPDATE SET referrer_id = EXCLUDED.referrer_id,
    state = EXCLUDED.state, tier_valid_until = EXCLUDED.tier_valid_until, updated_at = now()
"""
KNOWN_ENTRY: Final = "SELECT 1 FROM ledger_entries WHERE entry_id = $1"
INSERT_TIER: Final = """
INSERT INTO ledger_tier_history (event_id, member_id, occurred_at, tier, previous_tier,
                                 qualifying_spend, tier_valid_until)
VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (event_id) DO NOTHING RETURNING event_id
"""
UPDATE_TIER: Final = """
INSERT INTO ledger_members (member_id, tier, qualifying_spend, tier_valid_until, next_tier,
                            next_tier_spend)
VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (member_id) DO UPDATE SET tier = EXCLUDED.tier,
    qualifying_spend = EXCLUDED.qualifying_spend, tier_valid_until = EXCLUDED.tier_valid_until,
    next_tier = EXCLUDED.next_tier, next_tier_spend = EXCLUDED.next_tier_spend
"""


async def _raw(msg: Any) -> Any:
    return None


def create_app() -> FastStream:
    settings = load_settings()
    topics = settings.topics
    broker = KafkaBroker(settings.bootstrap_servers, client_id="naive")
    app = FastStream(broker)
    state: dict[str, Any] = {}
    rules_name = settings.group_prefix + "rules"
    ledger_name = settings.group_prefix + "ledger"

    @broker.subscriber(
        topics.activity, group_id=rules_name, auto_offset_reset="earliest", decoder=_raw
    )
    async def on_activity(msg: KafkaMessage) -> None:
        record = msg.raw_message
        pool: asyncpg.Pool = state["pool"]
        grants: list[Any] = []
        async with pool.acquire() as conn, conn.transaction():
            event = parse_activity(record.value)
            fresh = await conn.fetchval(
                INSERT_ACTIVITY,
                event.event_id,
                event.member_id,
                event.type,
                event.occurred_at,
                record.topic,
                record.partition,
                record.offset,
                record.value,
            )
            if fresh:
                raw = await conn.fetchval(SELECT_STATE, event.member_id)
                member = load_state(raw) if raw else MemberState(member_id=event.member_id)
                referrers: dict[str, str | None] = {event.member_id: member.referrer_id}
                if member.referrer_id:
                    referrers[member.referrer_id] = await conn.fetchval(
                        SELECT_REFERRER, member.referrer_id
                    )
                result = evaluate(member, event, state["book"].at(event.occurred_at), referrers)
                await conn.execute(
                    UPSERT_STATE,
                    event.member_id,
                    result.state.referrer_id,
                    dump_state(result.state).decode(),
                    result.state.tier_valid_until,
                )
                grants = list(result.grants)
            await conn.execute(
                STORE_OFFSET, rules_name, record.topic, record.partition, record.offset + 1
            )
        for g in grants:
            await broker.publish(
                g.model_dump_json().encode(), topic=topics.grants, key=g.member_id.encode()
            )

    @broker.subscriber(
        topics.grants, group_id=ledger_name, auto_offset_reset="earliest", decoder=_raw
    )
    async def on_grant(msg: KafkaMessage) -> None:
        record = msg.raw_message
        pool: asyncpg.Pool = state["pool"]
        events: list[Any] = []
        async with pool.acquire() as conn, conn.transaction():
            grant = parse_grant(record.value)
            if isinstance(grant, TierEvaluated):
                d = grant.data
                if await conn.fetchval(
                    INSERT_TIER,
                    grant.event_id,
                    grant.member_id,
                    grant.occurred_at,
                    d.tier,
                    d.previous_tier,
                    d.qualifying_spend,
                    d.tier_valid_until,
                ):
                    await conn.execute(
                        UPDATE_TIER,
                        grant.member_id,
                        d.tier,
                        d.qualifying_spend,
                        d.tier_valid_until,
                        d.next_tier,
                        d.next_tier_spend,
                    )
            elif not await conn.fetchval(KNOWN_ENTRY, grant.event_id):
                before = await load_books(conn, [grant.member_id])
                book = before[grant.member_id]
                entries = []
                for entry in acc.decide(book, command_for(grant)):
                    book = acc.evolve(book, entry)
                    entries.append(entry)
                await write_journal(conn, entries, before, {grant.member_id: book})
                events = [ledger_event(e) for e in entries]
            await conn.execute(
                STORE_OFFSET, ledger_name, record.topic, record.partition, record.offset + 1
            )
        for e in events:
            await broker.publish(
                e.model_dump_json().encode(), topic=topics.ledger, key=e.member_id.encode()
            )

    @app.on_startup
    async def startup() -> None:
        pool = await create_pool(settings)
        state["pool"] = pool
        async with pool.acquire() as conn:
            state["book"] = await load_book(conn)

    @app.on_shutdown
    async def shutdown() -> None:
        if "pool" in state:
            await state["pool"].close()

    return app


if __name__ == "__main__":
    uvloop.install()
    asyncio.run(create_app().run())
