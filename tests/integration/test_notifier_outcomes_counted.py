"""The notifier's outcomes are counted once per event, whatever became of the batch's
attempts: they were counted inside the batch's transaction, so a batch that failed after
its handler ran (a deadlock, a connection lost, a racing instance's COPY) and was retried
or applied again record by record counted every skipped event twice."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiokafka.structs import ConsumerRecord

from services.common.config import Settings
from services.common.consumer import BatchWork
from services.notifier.app import make_handler
from services.notifier.delivery import DELIVERED
from tests.integration import direct
from tests.integration.direct import consumer_of, migrated_pool

pytestmark = pytest.mark.integration
TOPIC = "loyalty.ledger.v1"
OUTCOMES = ("skipped", "expired_on_arrival", "unknown_type")


def earned(event_id: str, member: str, at: datetime, expires_at: datetime) -> dict[str, Any]:
    return {
        "event_id": event_id, "type": "points_earned", "schema_version": 1,
        "occurred_at": at.isoformat(), "member_id": member,
        "data": {"points": 100, "balance_after": 100, "rule_id": "base",
                 "expires_at": expires_at.isoformat()},
    }  # fmt: skip


def counted() -> dict[str, float]:
    return {o: DELIVERED.labels(o)._value.get() for o in OUTCOMES}


@pytest.mark.parametrize(
    "failure",
    [
        asyncpg.DeadlockDetectedError("deadlock detected"),  # transient: the batch again
        asyncpg.UniqueViolationError("duplicate key value"),  # record by record
    ],
    ids=["retried", "isolated"],
)
async def test_each_outcome_is_counted_once_when_a_batch_is_applied_again(
    fresh_database: str, failure: Exception
) -> None:
    settings = Settings(database_url=fresh_database, bootstrap_servers="")  # no webhook
    handle = make_handler(settings, "notifier")
    failures = [failure]

    async def failing_once(
        conn: asyncpg.Connection, records: Sequence[ConsumerRecord], work: BatchWork
    ) -> None:
        await handle(conn, records, work)
        if failures:  # the transaction fails after the handler ran
            raise failures.pop()

    now = datetime.now(UTC)
    batch = direct.records(
        TOPIC,
        earned("e-ok", "m-1", now, now + timedelta(days=300)),  # recorded as skipped
        earned("e-old", "m-2", now - timedelta(days=800), now - timedelta(days=10)),
        {"event_id": "e-unk", "type": "points_teleported", "schema_version": 1,
         "occurred_at": now.isoformat(), "member_id": "m-3", "data": {}},
    )  # fmt: skip
    before = counted()
    async with migrated_pool(fresh_database) as pool:
        consumer = consumer_of(pool, "notifier", TOPIC, failing_once)
        await asyncio.wait_for(consumer.process(batch), timeout=30)
        recorded = await pool.fetch("SELECT notification_id, status FROM notifications")
    assert [tuple(r) for r in recorded] == [("e-ok", "skipped")]
    assert {o: n - before[o] for o, n in counted().items()} == dict.fromkeys(OUTCOMES, 1)
