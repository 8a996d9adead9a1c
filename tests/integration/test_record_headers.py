"""Record headers are no business of the consumers: a binary one (Spring's
kafka_correlationId, a tracing id) or a null one (Kafka allows it, Java clients send it)
lost the whole fetched batch. FastStream's parser decoded every header of every record as
UTF-8 before our handler ran; it logged the error and dropped the batch, its fetch
position already past it, and the next batch stored offsets beyond it."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import pytest
from aiokafka import AIOKafkaProducer

from services.common.outbox import partition_for
from tests.integration.events import CST, purchase
from tests.integration.harness import Stack
from tests.integration.streams import assert_paid_exactly_once

pytestmark = pytest.mark.integration
NOW = datetime.now(CST).replace(microsecond=0)


async def test_purchases_with_binary_or_null_headers_are_paid_with_their_batch(
    stack: Stack,
) -> None:
    at = NOW - timedelta(hours=1)
    events = [purchase("m-hdr", amount, at) for amount in ("100.00", "200.00", "300.00")]
    headers: list[list[tuple[str, bytes | None]]] = [
        [("source", b"till-7")],
        [("kafka_correlationId", bytes.fromhex("9f3a00ffee"))],  # not UTF-8
        [("x-trace", None)],
    ]
    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap)
    await producer.start()
    try:
        topic = stack.topics.activity
        partition = partition_for(b"m-hdr", sorted(await producer.partitions_for(topic)))
        batch = producer.create_batch()  # one record batch: one fetch, one consumer batch
        for event, hs in zip(events, headers, strict=True):
            value = json.dumps(event).encode()
            assert batch.append(key=b"m-hdr", value=value, timestamp=None, headers=hs)
        await (await producer.send_batch(batch, topic, partition=partition))
    finally:
        await producer.stop()

    await assert_paid_exactly_once(stack, events, timeout=60)
    assert await stack.scalar("SELECT count(*) FROM dead_letters") == 0
