"""A member's events keyed by something other than the member (CONTRACT.md says the key is
the `member_id`) land on several partitions, so two rules processes may apply one new
member's events at the same moment. The second must wait for the first and start from
its state, not from an empty one of its own: before, both paid the first-purchase bonus
and the last to commit overwrote the other's state (an order lost, its refund unpaid back).

Two `BatchConsumer`s are driven directly on a real Postgres, as two processes run them.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest
from aiokafka.structs import ConsumerRecord
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from services.common.config import load_settings
from services.common.consumer import BatchConsumer, BatchWork
from services.rules.app import RulesProcessor
from services.rules.state import load_state
from tests.integration.direct import migrated_pool
from tests.integration.events import CST, purchase, registered
from tests.integration.harness import wait_until

pytestmark = pytest.mark.integration

T0 = datetime(2026, 3, 2, 10, tzinfo=CST)
CONSUMER = "rules-misrouted"
WAITING = "SELECT count(*) FROM pg_locks WHERE locktype = 'transactionid' AND NOT granted"


def record(
    topic: str, partition: int, event: dict[str, Any], key: bytes | None, offset: int = 0
) -> ConsumerRecord:
    value = orjson.dumps(event)
    return ConsumerRecord(topic, partition, offset, 0, 0, key, value, None, 0, len(value), [])


@pytest.mark.parametrize(
    "key", [lambda e: e["event_id"].encode(), lambda e: None], ids=["event-id", "null"]
)
async def test_a_new_members_events_on_two_partitions_are_applied_one_after_the_other(
    fresh_database: str, key: Callable[[dict[str, Any]], bytes | None]
) -> None:
    settings = dataclasses.replace(load_settings(), database_url=fresh_database)
    topic = settings.topics.activity
    p1 = purchase("m-new", "300.00", T0, order_id="O1")
    p2 = purchase("m-new", "400.00", T0 + timedelta(hours=1), order_id="O2")
    async with migrated_pool(fresh_database) as pool:
        a_proc, b_proc = RulesProcessor(settings, CONSUMER), RulesProcessor(settings, CONSUMER)
        await a_proc.refresh_book(pool)
        await b_proc.refresh_book(pool)
        grants: list[dict[str, Any]] = []
        a_applied, a_commit = asyncio.Event(), asyncio.Event()

        async def a_handle(
            conn: asyncpg.Connection, records: Sequence[ConsumerRecord], work: BatchWork
        ) -> None:
            await a_proc.handle(conn, records, work)
            grants.extend(orjson.loads(r.payload) for r in work.outbox)
            a_applied.set()  # A's batch applied, not committed yet
            await a_commit.wait()

        async def b_handle(
            conn: asyncpg.Connection, records: Sequence[ConsumerRecord], work: BatchWork
        ) -> None:
            await b_proc.handle(conn, records, work)
            grants.extend(orjson.loads(r.payload) for r in work.outbox)

        def consumer(handler: Any) -> BatchConsumer:
            c = BatchConsumer(name=CONSUMER, service="rules", topic=topic, dlq_topic="dlq")
            c.bind(pool, handler)
            return c

        a = asyncio.create_task(consumer(a_handle).process([record(topic, 0, p1, key(p1))]))
        await a_applied.wait()
        b = asyncio.create_task(consumer(b_handle).process([record(topic, 1, p2, key(p2))]))

        async def settled() -> bool:
            return b.done() or bool(await pool.fetchval(WAITING))

        await wait_until(settled, timeout=10, what="B's batch to finish or wait for A's")
        a_commit.set()
        await asyncio.gather(a, b)
        state = load_state(
            await pool.fetchval(
                "SELECT state::text FROM rules_member_state WHERE member_id = 'm-new'"
            )
        )
    first = [g for g in grants if g["data"].get("rule_id") == "first_purchase"]
    assert [g["data"]["order_id"] for g in first] == ["O1"]
    assert sorted(state.orders) == ["O1", "O2"]


def mismatches() -> float | None:
    name = "loyalty_activity_key_mismatch_total"
    return REGISTRY.get_sample_value(name, {"consumer": CONSUMER})


async def test_records_keyed_otherwise_than_by_their_member_are_counted_and_paid(
    fresh_database: str,
) -> None:
    settings = dataclasses.replace(load_settings(), database_url=fresh_database)
    topic = settings.topics.activity
    keyed = purchase("m-keyed", "300.00", T0)
    no_key = purchase("m-no-key", "300.00", T0)
    by_event = registered("m-by-event", T0)
    async with migrated_pool(fresh_database) as pool:
        proc = RulesProcessor(settings, CONSUMER)
        await proc.refresh_book(pool)
        rules = BatchConsumer(name=CONSUMER, service="rules", topic=topic, dlq_topic="dlq")
        rules.bind(pool, proc.handle)
        before = mismatches()
        assert before is not None  # exported from the start
        batch = [
            record(topic, 2, keyed, b"m-keyed", 0),
            record(topic, 2, no_key, None, 1),
            record(topic, 2, by_event, by_event["event_id"].encode(), 2),
        ]
        with capture_logs() as logs:
            await rules.process(batch)
        members = await pool.fetchval("SELECT count(*) FROM rules_member_state")
    assert mismatches() == before + 2
    warned = [e for e in logs if e["event"] == "activity_key_mismatch"]
    assert [(e["records"], e["event_id"], e["member_id"]) for e in warned] == [
        (2, no_key["event_id"], "m-no-key")
    ]
    # Applied all the same, none dead-lettered: the producer broke the contract.
    assert members == 3
    assert not [e for e in logs if e["event"] == "dead_letter"]
