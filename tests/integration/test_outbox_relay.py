"""The outbox relay's advisory lock lives with its connection: when Postgres drops that
connection the lock is gone (another instance's relay may take it), so the relay must
stop publishing under it and take the lock again on a new connection, then go on."""

from __future__ import annotations

import asyncio
import uuid
import zlib

import asyncpg
import pytest

from services.common.config import KafkaAccess, Topics
from services.common.migrations import apply_migrations
from services.common.outbox import OutboxRelay, OutboxRow, make_producer, write_outbox
from services.common.runtime import init_connection
from tests.integration.harness import create_topics, wait_until

pytestmark = pytest.mark.integration
HOLDER = """
SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objid = $1::bigint::oid
"""


async def test_the_relay_takes_its_lock_again_after_losing_its_connection(
    broker: str, fresh_database: str
) -> None:
    await asyncio.to_thread(apply_migrations, fresh_database)
    topics = Topics(prefix=f"t{uuid.uuid4().hex[:10]}.")
    await create_topics(broker, topics, partitions=1)
    pool = await asyncpg.create_pool(fresh_database, min_size=1, max_size=4, init=init_connection)
    assert pool is not None
    producer = make_producer(KafkaAccess(broker))
    await producer.start()
    relay = OutboxRelay(pool, producer, "ledger", dlq_topic=topics.dlq)
    task = asyncio.create_task(relay.run())
    key = zlib.crc32(b"outbox:ledger")
    try:
        first = await wait_until(lambda: pool.fetchval(HOLDER, key), what="the relay's lock")
        await pool.execute("SELECT pg_terminate_backend($1)", first)

        async def held_again() -> int | None:
            pid = await pool.fetchval(HOLDER, key)
            return pid if pid not in (None, first) else None

        await wait_until(held_again, timeout=15, what="the lock taken again")
        # And it still relays.
        async with pool.acquire() as conn:
            await write_outbox(conn, "ledger", [OutboxRow(topics.ledger, "m-1", b'{"n": 1}')])
        relay.wake()
        await wait_until(
            lambda: pool.fetchval("SELECT count(*) = 0 FROM outbox"), what="the row relayed"
        )
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await producer.stop()
        await pool.close()
