"""On Apache Kafka, whose `message.max.bytes` (~1 MB by default) refuses a bigger record:
a dead letter must stay under it, and a row the broker refuses anyway is set aside into
`dead_letters` by the outbox relay; before, the relay retried it for ever (its
`send_batch` skips the producer's `max_request_size` check) and every row behind waited."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import ConsumerRecord

from schemas.ledger import DeadLetter
from services.common.config import KafkaAccess, Topics
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
    producer = make_producer(KafkaAccess(kafka_bootstrap))
    await producer.start()
    relay = OutboxRelay(pool, producer, "rules", dlq_topic=topics.dlq)
    consumer = AIOKafkaConsumer(
        topics.dlq, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest",
        fetch_max_bytes=4 << 20, max_partition_fetch_bytes=4 << 20,
    )  # fmt: skip
    try:
        # What the letter used to be: the broker refuses it, and the relay keeps it in
        # `dead_letters` alone (a letter of it would be refused in turn).
        async with pool.acquire() as conn:
            await write_outbox(conn, "rules", [OutboxRow(topics.dlq, "m-1", b'"' * 1_400_000)])
        assert await relay.relay_once() == 1
        assert await pool.fetchval("SELECT count(*) FROM outbox") == 0
        assert await pool.fetchval("SELECT topic FROM dead_letters") == topics.dlq
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


async def test_a_grant_too_large_for_apache_kafka_is_dead_lettered_and_the_next_one_goes(
    kafka_bootstrap: str, fresh_database: str
) -> None:
    """A grant over `message.max.bytes` (an activity's 1 MB store id, copied) stalled the
    rules relay for good: the member was never paid again, the page re-sent every second."""
    await asyncio.to_thread(apply_migrations, fresh_database)
    topics = Topics(prefix=f"t{uuid.uuid4().hex[:10]}.")
    await create_topics(kafka_bootstrap, topics, partitions=1)
    big = b'{"event_id":"g-big","member_id":"m-1","store_id":"' + b"s" * 1_100_000 + b'"}'
    pool = await asyncpg.create_pool(fresh_database, min_size=1, max_size=2, init=init_connection)
    assert pool is not None
    producer = make_producer(KafkaAccess(kafka_bootstrap))
    await producer.start()
    relay = OutboxRelay(pool, producer, "rules", dlq_topic=topics.dlq)
    consumer = AIOKafkaConsumer(
        topics.grants, topics.dlq, bootstrap_servers=kafka_bootstrap,
        auto_offset_reset="earliest", fetch_max_bytes=4 << 20, max_partition_fetch_bytes=4 << 20,
    )  # fmt: skip
    try:
        async with pool.acquire() as conn:
            await write_outbox(conn, "rules", [
                OutboxRow(topics.grants, "m-1", big),
                OutboxRow(topics.grants, "m-1", b'{"event_id":"g-2","member_id":"m-1"}'),
            ])  # fmt: skip
        assert await relay.relay_once() == 2
        dead = await pool.fetchrow(
            'SELECT consumer, topic, "offset", reason, original FROM dead_letters'
        )
        assert dead is not None
        assert (dead["consumer"], dead["topic"], dead["offset"]) == (
            "rules-relay",
            topics.grants,
            -1,
        )
        assert dead["reason"].startswith("relay_too_large: the broker refused the record")
        assert bytes(dead["original"]) == big
        assert await relay.relay_once() == 1  # its letter, cut to size
        await consumer.start()
        got: dict[str, list[bytes]] = {}
        for _ in range(10):
            for tp, batch in (await consumer.getmany(timeout_ms=2_000)).items():
                got.setdefault(tp.topic, []).extend(m.value or b"" for m in batch)
            if len(got.get(topics.dlq, [])) == 1:
                break
        assert got[topics.grants] == [b'{"event_id":"g-2","member_id":"m-1"}']
        [raw] = got[topics.dlq]
        letter = DeadLetter.model_validate_json(raw)
        assert (letter.consumer, letter.source_topic, letter.source_offset) == (
            "rules-relay", topics.grants, -1,
        )  # fmt: skip
        assert letter.original_truncated
        assert letter.original_size == len(big)
    finally:
        await consumer.stop()
        await producer.stop()
        await pool.close()
