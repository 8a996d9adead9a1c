"""On Apache Kafka, whose `message.max.bytes` (~1 MB by default) refuses a bigger record:
a dead letter must stay under it, or the outbox relay retries it for ever (its
`send_batch` skips the producer's `max_request_size` check) and every row behind waits."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import MessageSizeTooLargeError
from aiokafka.structs import ConsumerRecord

from schemas.ledger import DeadLetter
from services.common.config import Topics
from services.common.dlq import dead_letter
from services.common.migrations import apply_migrations
from services.common.outbox import OutboxRelay, OutboxRow, make_producer, write_outbox
from services.common.runtime import init_connection
from tests.integration.harness import create_topics

pytestmark = pytest.mark.integration


async def test_a_dead_letter_of_a_huge_message_reaches_apache_kafka(
    kafka_bootstrap: str, fresh_database: str
) -> None:
    await asyncio.to_thread(apply_migrations, fresh_database)
    topics = Topics(prefix=f"t{uuid.uuid4().hex[:10]}.")
    await create_topics(kafka_bootstrap, topics, partitions=1)
    value = b'"' * 700_000  # escaped in the letter's JSON: 1.4 MB
    bad = ConsumerRecord(
        topic=topics.activity, partition=0, offset=7, timestamp=0, timestamp_type=0,
        key=b"m-1", value=value, checksum=None, serialized_key_size=3,
        serialized_value_size=len(value), headers=(),
    )  # fmt: skip
    row, _dead = dead_letter(bad, "rules", "invalid_json", "malformed JSON", topics.dlq)
    pool = await asyncpg.create_pool(fresh_database, min_size=1, max_size=2, init=init_connection)
    assert pool is not None
    producer = make_producer(kafka_bootstrap)
    await producer.start()
    relay = OutboxRelay(pool, producer, "rules")
    consumer = AIOKafkaConsumer(
        topics.dlq, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest",
        fetch_max_bytes=4 << 20, max_partition_fetch_bytes=4 << 20,
    )  # fmt: skip
    try:
        # What the letter used to be: the broker refuses it, and the relay can only retry.
        async with pool.acquire() as conn:
            await write_outbox(conn, "rules", [OutboxRow(topics.dlq, "m-1", b'"' * 1_400_000)])
        with pytest.raises(MessageSizeTooLargeError):
            await relay.relay_once()
        await pool.execute("DELETE FROM outbox")
        # What it is now: cut to size, it goes out, and so does the row behind it.
        async with pool.acquire() as conn:
            await write_outbox(conn, "rules", [row, OutboxRow(topics.dlq, "m-2", b"{}")])
        assert await relay.relay_once() == 2
        await consumer.start()
        got = await consumer.getmany(timeout_ms=10_000)
        values = [m.value for batch in got.values() for m in batch]
        assert len(values) == 2, values
        letter = DeadLetter.model_validate_json(values[0] or b"")
        assert letter.original_truncated
        assert letter.original_size == len(value)
        assert letter.source_offset == 7
    finally:
        await consumer.stop()
        await producer.stop()
        await pool.close()
