"""Where each partition's log ends, and what it holds at an offset, on any broker.

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

`records_at` fetches the record at given offsets, so that a consumer can tell whether the
log still holds the record it last consumed (`fingerprint`): a topic recreated (Tansu
restarted, or ops deleted it) that has grown past the stored offset looks like the old one
by its offsets alone.
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Mapping, Sequence
from typing import Final

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

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


def fingerprint(record: ConsumerRecord) -> bytes:
    """What tells this record from another at its offset: the offset, the broker timestamp
    and a hash of key and value (24 bytes).

    Both brokers hand back a record's timestamp, key and value as stored, on every fetch;
    aiokafka's `checksum` is None for record batches v2 and no use. A recreated log whose
    producer sent the very same key and value at the same offset and millisecond holds,
    for that record, what was consumed.
    """
    digest = hashlib.blake2b(digest_size=8)
    for part in (record.key, record.value):
        if part is None:
            digest.update(b"\x00")
        else:
            digest.update(b"\x01" + len(part).to_bytes(4, "big") + part)
    return struct.pack(">qq", record.offset, record.timestamp) + digest.digest()


def fingerprint_offset(mark: bytes) -> int:
    """The offset of the record a fingerprint was taken of."""
    return int(struct.unpack_from(">q", mark)[0])


async def records_at(
    consumer: AIOKafkaConsumer, wanted: Mapping[TopicPartition, int]
) -> dict[TopicPartition, ConsumerRecord | None]:
    """The record at each partition's offset, or None where the log holds none there
    (before its start, at or past its end, or an offset the log skips).

    `consumer` must be one of the caller's own, not in a group, with
    auto_offset_reset="latest" (a fetch past the end then reads nothing instead of the
    whole log): its assignment becomes the partitions asked about.
    """
    tps = list(wanted)
    starts = await consumer.beginning_offsets(tps)
    found: dict[TopicPartition, ConsumerRecord | None] = {
        tp: None for tp in tps if wanted[tp] < starts[tp]
    }
    waiting = {tp for tp in tps if tp not in found}
    if not waiting:
        return found
    consumer.assign(sorted(waiting))
    for tp in waiting:
        consumer.seek(tp, wanted[tp])
    deadline = time.monotonic() + FETCH_TIMEOUT_S
    while waiting:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no record or high watermark fetched for {sorted(waiting)}")
        batches = await consumer.getmany(*waiting, timeout_ms=100)
        for tp in list(waiting):
            # A fetch from inside a record batch may hand back its earlier records too
            # (after a reset past the end, the last batch): only the first at or after
            # the offset asked decides.
            later = [r for r in batches.get(tp, []) if r.offset >= wanted[tp]]
            high = consumer.highwater(tp)
            if later:
                found[tp] = later[0] if later[0].offset == wanted[tp] else None
            elif high is not None and high <= wanted[tp]:
                found[tp] = None
            else:
                continue
            waiting.discard(tp)
    return found


async def records_at_of(
    bootstrap: str, wanted: Mapping[TopicPartition, int]
) -> dict[TopicPartition, ConsumerRecord | None]:
    """`records_at` with a consumer of its own, started and stopped around the question."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="latest"
    )
    try:
        await consumer.start()
        return await records_at(consumer, wanted)
    finally:
        await consumer.stop()
