"""Where each partition's log ends: the offset after its last record, on any broker.

Kafka's ListOffsets (`end_offsets`) answers exactly that. Tansu 0.6 answers the offset
after the *first* record of the partition's last record batch: after a batch of 10
records at offsets 0-9 it says 1, not 10 (checked against both brokers by
`tests/integration/test_log_end.py`). A fetch's high watermark is right on both. So
`log_ends` takes ListOffsets' answer, and where a partition has records fetches once from
just before that answer and keeps the high watermark the fetch reports, which can only
be later.

A consumer that trusted ListOffsets on Tansu took its own stored offset, past the last
batch's first record, for a sign that the topic had been recreated, and read the whole
partition again on every restart; a progress check that compared stored offsets with it
could declare a stage done one batch early.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Final

from aiokafka import AIOKafkaConsumer, TopicPartition

# A fetch from an offset just inside the log answers within the broker's fetch wait.
FETCH_TIMEOUT_S: Final = 10.0


async def log_ends(
    consumer: AIOKafkaConsumer, tps: Sequence[TopicPartition]
) -> dict[TopicPartition, int]:
    """The offset after each partition's last record.

    `consumer` must be one of the caller's own, not in a group: its assignment becomes
    the partitions asked about that have records.
    """
    reported = await consumer.end_offsets(list(tps))
    starts = await consumer.beginning_offsets(list(tps))
    ends = {tp: reported[tp] for tp in tps}
    probe = [tp for tp in tps if reported[tp] > starts[tp]]
    if not probe:
        return ends
    consumer.assign(probe)
    for tp in probe:
        consumer.seek(tp, reported[tp] - 1)
    deadline = time.monotonic() + FETCH_TIMEOUT_S
    waiting = set(probe)
    while waiting:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no high watermark fetched for {sorted(waiting)}")
        await consumer.getmany(*waiting, timeout_ms=100, max_records=1)
        for tp in list(waiting):
            high = consumer.highwater(tp)
            if high is not None:
                ends[tp] = max(reported[tp], high)
                waiting.discard(tp)
    return ends


async def log_ends_of(bootstrap: str, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
    """`log_ends` with a consumer of its own, started and stopped around the question."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        await consumer.start()
        return await log_ends(consumer, tps)
    finally:
        await consumer.stop()
