"""`loyalty_points_expired_total` counts every point journaled as expired: the sweeper's,
and the grants consumer's (a grant more than 12 months late, journaled expired in its own
batch), once that batch commits. Only the sweeper's were counted, so a backfill of old
grants expired points the metric never showed."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from aiokafka.structs import ConsumerRecord

from services.common.config import Settings
from services.common.consumer import BatchWork
from services.ledger import projector
from services.ledger.rulebook import LedgerRules
from services.ledger.sweeper import EXPIRED, ExpirySweeper
from tests.integration import direct
from tests.integration.direct import consumer_of, migrated_pool
from tests.integration.ledger_helpers import grant

pytestmark = pytest.mark.integration
TOPIC = "loyalty.grants.v1"


async def test_points_the_grants_consumer_expires_are_counted_once(fresh_database: str) -> None:
    settings = Settings(database_url=fresh_database, bootstrap_servers="")
    handle = projector.make_handler(settings, "ledger", LedgerRules())
    failures = [asyncpg.DeadlockDetectedError("deadlock detected")]

    async def failing_once(
        conn: asyncpg.Connection, records: Sequence[ConsumerRecord], work: BatchWork
    ) -> None:
        await handle(conn, records, work)
        if failures:  # the transaction fails after the handler ran, and is retried
            raise failures.pop()

    now = datetime.now(UTC)
    before = EXPIRED._value.get()
    async with migrated_pool(fresh_database) as pool:
        consumer = consumer_of(pool, "ledger", TOPIC, failing_once)
        # A grant 14 months late (an offline till synced at last), and one on time.
        batch = direct.records(
            TOPIC, grant("m-late", 700, now - timedelta(days=430)), grant("m-now", 50, now)
        )
        await asyncio.wait_for(consumer.process(batch), timeout=30)
        sweeper = ExpirySweeper(pool, "loyalty.ledger.v1", 60, lambda: None, grace_s=3600)
        assert await sweeper.sweep_once(now) == (0, 0)  # nothing left to it
        journaled = await pool.fetchval(
            "SELECT -sum(points) FROM ledger_entries WHERE kind = 'expire'"
        )
    assert journaled == 700
    assert EXPIRED._value.get() - before == 700
