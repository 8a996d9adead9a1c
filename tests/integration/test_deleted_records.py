"""Records deleted (DeleteRecords; retention does the same) before the consumer read them,
on Apache Kafka: the fetch past them is out of range and aiokafka goes on from the log
start. Before, that was said only by aiokafka at INFO, which the services' logging leaves
out, and the stored fingerprint's record, deleted, was taken at the next assignment for a
recreated log ('log_recreated_record_missing') even with nothing unread lost."""

from __future__ import annotations

import asyncio
import uuid
from types import SimpleNamespace
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete
from aiokafka.structs import ConsumerRecord
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from deploy import local
from services.common.config import KafkaAccess
from tests.integration.direct import consumer_of, migrated_pool
from tests.integration.harness import wait_until

pytestmark = pytest.mark.integration


async def _produce(bootstrap: str, tp: TopicPartition, values: range) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for i in values:
            await producer.send_and_wait(tp.topic, b"%d" % i, key=b"m-1", partition=tp.partition)
    finally:
        await producer.stop()


async def _delete_before(bootstrap: str, tp: TopicPartition, offset: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_records({tp: RecordsToDelete(before_offset=offset)})
    finally:
        await admin.close()


async def _fetch(kafka: AIOKafkaConsumer, tp: TopicPartition, n: int) -> list[ConsumerRecord]:
    out: list[ConsumerRecord] = []

    async def more() -> bool:
        out.extend((await kafka.getmany(tp, timeout_ms=200)).get(tp, []))
        return len(out) >= n

    await wait_until(more, timeout=30, what=f"{n} records fetched")
    return out


def _skipped(consumer: str) -> float:
    value = REGISTRY.get_sample_value("loyalty_records_skipped_total", {"consumer": consumer})
    return value or 0.0


async def test_records_deleted_before_they_were_read_are_said_and_counted(
    broker: str, broker_name: str, fresh_database: str
) -> None:
    if broker_name != "kafka":
        pytest.skip("DeleteRecords: Apache Kafka's")
    topic = f"t{uuid.uuid4().hex[:10]}.deleted"
    await local.create_topics_async(broker, [topic], partitions=1)
    tp = TopicPartition(topic, 0)
    await _produce(broker, tp, range(3))

    async def handler(conn: asyncpg.Connection, records: Any, work: Any) -> None:
        return None

    kafka = AIOKafkaConsumer(bootstrap_servers=broker, enable_auto_commit=False,
                             auto_offset_reset="earliest", fetch_max_wait_ms=100)  # fmt: skip
    await kafka.start()
    try:
        kafka.assign([tp])
        async with migrated_pool(fresh_database) as pool:
            consumer = consumer_of(pool, f"c{uuid.uuid4().hex[:6]}", topic, handler)
            consumer.subscriber = SimpleNamespace(consumer=kafka)
            consumer._watch.kafka = KafkaAccess(broker)
            await consumer._seek_to_stored({tp})
            await consumer.process(await _fetch(kafka, tp, 3))

            # The consumer lags: 3..9 are produced, and 3..6 deleted before it fetches them.
            kafka.pause(tp)
            await asyncio.sleep(0.5)  # no fetch left in flight
            await _produce(broker, tp, range(3, 10))
            await _delete_before(broker, tp, 7)
            kafka.resume(tp)
            batch = await _fetch(kafka, tp, 3)
            assert [r.offset for r in batch] == [7, 8, 9]  # aiokafka went on from the start
            before = _skipped(consumer.name)
            with capture_logs() as logs:
                await consumer.process(batch)
            said = [e for e in logs if e["event"] == "records_skipped_log_start_moved"]
            assert [(e["from_offset"], e["to_offset"], e["count"]) for e in said] == [(3, 7, 4)]
            assert _skipped(consumer.name) - before == 4

            # Everything applied is deleted now, nothing unread: the partition is resumed
            # where it was, not read again as a recreated log.
            await _delete_before(broker, tp, 10)
            with capture_logs() as logs:
                await consumer._seek_to_stored({tp})
            assert [e["event"] for e in logs] == ["log_start_at_stored_offset",
                                                  "partitions_assigned"]  # fmt: skip
            assert await kafka.position(tp) == 10
            row = await pool.fetchrow("SELECT next_offset, last_record FROM consumer_offsets")
            assert row["next_offset"] == 10  # not reset as a recreated log's
            assert row["last_record"] is not None
    finally:
        await kafka.stop()
