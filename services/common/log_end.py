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

`LogEnds` keeps the ends of a group consumer's partitions, asked every few seconds, for
its lag gauge: the group consumer learns an end only from its own fetches, which stop
while a batch is held up.

`records_at` fetches the record at given offsets, so that a consumer can tell whether the
log still holds the record it last consumed (`fingerprint`): a topic recreated (Tansu
restarted, or ops deleted it) that has grown past the stored offset looks like the old one
by its offsets alone.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Final

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from services.common.config import KafkaAccess
from services.common.kafka_clients import client_kwargs

log = structlog.get_logger()

# A fetch from an offset just inside the log answers within the broker's fetch wait.
FETCH_TIMEOUT_S: Final = 10.0
# How often a consumer asks where its partitions end (`LogEnds`): a scrape (every 15-30 s)
# sees an end at most this old, for a ListOffsets and a fetch per partition behind.
LOG_ENDS_REFRESH_S: Final = 5.0
# A round that takes longer (a ListOffsets of a deleted topic waits for it) is given up;
# the lag meanwhile counts from the ends known before.
LOG_ENDS_ROUND_S: Final = 30.0


async def log_ends(
    consumer: AIOKafkaConsumer,
    tps: Sequence[TopicPartition],
    known: Mapping[TopicPartition, int] | None = None,
) -> dict[TopicPartition, int]:
    """The offset after each partition's last record.

    `consumer` must be one of the caller's own, not in a group: its assignment becomes
    the partitions asked about that have records. `known`: ends a fetch of this log
    reported earlier (high watermarks). A partition whose ListOffsets answer is not past
    its known end needs no fetch: the record batch that answer falls in was in the log
    when that end was reported, so the log still ends there.
    """
    known = known or {}
    reported = await consumer.end_offsets(list(tps))
    ends = {tp: max(reported[tp], known.get(tp, 0)) for tp in tps}
    unsure = [tp for tp in tps if reported[tp] > known.get(tp, -1)]
    if not unsure:
        return ends
    starts = await consumer.beginning_offsets(unsure)
    probe = [tp for tp in unsure if reported[tp] > starts[tp]]
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
                ends[tp] = max(ends[tp], high)
                waiting.discard(tp)
    return ends


async def log_ends_of(
    kafka: KafkaAccess, tps: Sequence[TopicPartition]
) -> dict[TopicPartition, int]:
    """`log_ends` with a consumer of its own, started and stopped around the question."""
    consumer = AIOKafkaConsumer(**client_kwargs(kafka), enable_auto_commit=False)
    try:
        await consumer.start()
        return await log_ends(consumer, tps)
    finally:
        await consumer.stop()


class LogEnds:
    """Where the logs of a group consumer's partitions end, asked every
    `LOG_ENDS_REFRESH_S` by a client of its own (out of the group), for the lag gauge.

    The group consumer learns a partition's end (its high watermark) only from its own
    fetches, and aiokafka fetches no more of a partition while records it fetched wait to
    be handed over: with a batch held up (the database down, a lock) the end it knew stood
    still exactly while the lag grew (the gauge showed 100 with 400 waiting).
    """

    def __init__(self) -> None:
        self.kafka = KafkaAccess("")  # set when its consumer is attached to a broker
        self.interval_s = LOG_ENDS_REFRESH_S
        self._asked: dict[TopicPartition, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    def start(self, owned: Callable[[], Mapping[TopicPartition, int | None]]) -> None:
        """Asks, until `stop`, for the partitions `owned` names, each with the end its
        group consumer last fetched (None: not yet). Once; not without a broker."""
        if self._task is None and self.kafka.bootstrap_servers and not self._stopped:
            self._task = asyncio.create_task(self._run(owned), name="log-ends")

    async def stop(self) -> None:
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def end(self, tp: TopicPartition, fetched: int | None) -> int | None:
        """The later of the end last asked and the one the group consumer `fetched`: both
        were exact when learnt, and a log only grows (one recreated shorter shows too much
        lag until the next round after its consumer's first fetch of it)."""
        return max((e for e in (self._asked.get(tp), fetched) if e is not None), default=None)

    async def _run(self, owned: Callable[[], Mapping[TopicPartition, int | None]]) -> None:
        client: AIOKafkaConsumer | None = None
        try:
            while True:
                await asyncio.sleep(self.interval_s)
                fetched = owned()
                if not fetched:
                    continue
                try:
                    if client is None:
                        client = AIOKafkaConsumer(
                            **client_kwargs(self.kafka), enable_auto_commit=False
                        )
                        await client.start()
                    known = {tp: end for tp, end in fetched.items() if end is not None}
                    async with asyncio.timeout(LOG_ENDS_ROUND_S):
                        self._asked = await log_ends(client, sorted(fetched), known)
                except Exception as exc:  # the broker out of reach: asked again next round
                    log.warning("log_ends_unknown", error=repr(exc))
                    if client is not None:
                        await client.stop()
                        client = None
                    continue
                # Fetched only to learn an end: nothing more until the next round.
                client.pause(*client.assignment())
        finally:
            if client is not None:
                await client.stop()


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
    kafka: KafkaAccess, wanted: Mapping[TopicPartition, int]
) -> dict[TopicPartition, ConsumerRecord | None]:
    """`records_at` with a consumer of its own, started and stopped around the question."""
    consumer = AIOKafkaConsumer(
        **client_kwargs(kafka), enable_auto_commit=False, auto_offset_reset="latest"
    )
    try:
        await consumer.start()
        return await records_at(consumer, wanted)
    finally:
        await consumer.stop()
