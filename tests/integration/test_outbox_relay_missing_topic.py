"""A topic the cluster lacks (an operator deleted loyalty.dlq.v1 to purge it, and the
cluster does not create topics on its own) holds back only its own outbox rows: the other
topics' rows are published and deleted, and the held ones go, in order, once the topic
exists again. Before, the relay looked up every topic of a page before sending any of it,
so the page failed after the producer's request timeout, round after round: no grant
reached the ledger."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from structlog.testing import capture_logs

from services.common.config import KafkaAccess, Topics
from services.common.outbox import OutboxRelay, OutboxRow, make_producer, write_outbox
from tests.integration.direct import migrated_pool
from tests.integration.harness import wait_until

pytestmark = pytest.mark.integration


async def test_a_missing_topic_holds_back_only_its_own_rows(
    broker: str, broker_name: str, fresh_database: str
) -> None:
    if broker_name == "tansu":
        pytest.skip("Tansu creates a topic a client asks about: none can be missing")
    topics = Topics(prefix=f"t{uuid.uuid4().hex[:10]}.")
    admin = AIOKafkaAdminClient(bootstrap_servers=broker)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topics.grants, 2, 1)])
        # A letter first, then grants: the page starts with the missing topic's row.
        rows = [OutboxRow(topics.dlq, "m-0", b'{"dlq_id": "d-0"}')] + [
            OutboxRow(topics.grants if i % 3 else topics.dlq, f"m-{i}", b'{"n": %d}' % i)
            for i in range(1, 30)
        ]
        async with migrated_pool(fresh_database) as pool:
            async with pool.acquire() as conn:
                await write_outbox(conn, "rules", rows)
            # A short metadata age: the relay learns of the topic created below soon.
            producer = make_producer(KafkaAccess(broker), metadata_max_age_ms=1000)
            await producer.start()
            relay = OutboxRelay(pool, producer, "rules", dlq_topic=topics.dlq)
            letters = [r.payload for r in rows if r.topic == topics.dlq]

            async def left() -> dict[str, int]:
                got = await pool.fetch("SELECT topic, count(*) AS n FROM outbox GROUP BY topic")
                return {r["topic"]: r["n"] for r in got}

            async def grants_gone() -> bool:
                return topics.grants not in await left()

            async def none_left() -> bool:
                return not await left()

            with capture_logs() as logs:
                task = asyncio.create_task(relay.run())
                try:
                    await wait_until(grants_gone, timeout=30, what="the grants relayed")
                    if topics.dlq in await admin.list_topics():  # auto.create.topics.enable
                        pytest.skip("this broker creates a topic a client asks about")
                    assert await left() == {topics.dlq: len(letters)}, "the letters are kept"
                    await admin.create_topics([NewTopic(topics.dlq, 1, 1)])
                    await wait_until(none_left, timeout=30, what="the letters relayed")
                finally:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    await producer.stop()
            # Said once, by name, not once a row or a round.
            missing = [e for e in logs if e["event"] == "outbox_relay_topic_missing"]
            assert [e["topic"] for e in missing] == [topics.dlq]
    finally:
        await admin.close()

    # The letters are on their topic, in the order they were written.
    consumer = AIOKafkaConsumer(topics.dlq, bootstrap_servers=broker, auto_offset_reset="earliest")
    await consumer.start()
    got: list[bytes] = []
    try:
        async with asyncio.timeout(30):
            while len(got) < len(letters):
                for recs in (await consumer.getmany(timeout_ms=500)).values():
                    got.extend(r.value for r in recs if r.value is not None)
    finally:
        await consumer.stop()
    assert got == letters
