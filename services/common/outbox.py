"""The transactional outbox: rows written with the state change, relayed to Kafka after.

A relay publishes rows in id order and deletes them only after the broker acknowledged
them, so a crash between the two re-sends a few rows with the same event ids; consumers
dedupe on those ids. One relay per service holds an advisory lock so member order holds.
A row the broker refuses as too large for it can never go: it becomes a dead letter.
A topic the cluster lacks holds back its own rows only.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

import asyncpg
import orjson
import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)
from aiokafka.partitioner import DefaultPartitioner, murmur2
from aiokafka.producer.message_accumulator import BatchBuilder
from prometheus_client import Counter, Gauge

from services.common.config import KafkaAccess
from services.common.kafka_clients import client_kwargs

RELAY_BATCH: Final = 5000  # rows per broker round trip; bounded to keep memory flat
RELAY_IDLE_POLL_S: Final = 0.2  # fallback poll when no in-process commit woke us
# A topic whose partitions the producer cannot learn within TOPIC_WAIT_S (the cluster lacks
# it) is left out of the pages for TOPIC_HOLD_S, or until the producer's metadata has it.
TOPIC_WAIT_S: Final = 5.0
TOPIC_HOLD_S: Final = 60.0

PUBLISHED = Counter("loyalty_outbox_published_total", "Outbox rows relayed", ["service"])
OLDEST_AGE = Gauge(
    "loyalty_outbox_oldest_age_seconds",
    "Age of the oldest row not yet relayed, as of the relay's last read of the outbox",
    ["service"],
)
log = structlog.get_logger()
# What a broker answers for a record batch over its limit: MESSAGE_TOO_LARGE (Apache
# Kafka's `message.max.bytes`, a topic's `max.message.bytes`), RECORD_LIST_TOO_LARGE
# (bigger than a log segment). The producer's own size check is skipped by `send_batch`.
TOO_LARGE: Final = (MessageSizeTooLargeError, RecordListTooLargeError)
TOO_LARGE_LABEL: Final = "relay_too_large"  # the dead letters' reason and metric label
PAGE: Final = """
SELECT id, topic, key, payload, created_at FROM outbox
WHERE service = $1 AND topic <> ALL($3::text[]) ORDER BY id LIMIT $2
"""
OLDEST: Final = "SELECT created_at FROM outbox WHERE service = $1 ORDER BY id LIMIT 1"
DELETE_GONE: Final = """
DELETE FROM outbox WHERE service = $1 AND id <= $2 AND id = ANY($3::bigint[])
"""


Messages = list[tuple[int, bytes | None, bytes]]  # (id, key, payload) of a partition, by id


@dataclass(frozen=True, slots=True)
class OutboxRow:
    topic: str
    key: str | None
    payload: bytes


async def write_outbox(conn: asyncpg.Connection, service: str, rows: Iterable[OutboxRow]) -> int:
    """COPY the rows in: one round trip however many (the hot path writes thousands)."""
    records = [(service, r.topic, r.key, r.payload) for r in rows]
    if records:
        await conn.copy_records_to_table(
            "outbox", records=records, columns=["service", "topic", "key", "payload"]
        )
    return len(records)


def make_producer(kafka: KafkaAccess, metadata_max_age_ms: int = 30_000) -> AIOKafkaProducer:
    # acks=all for durability; no idempotence: Tansu lacks it and our ids make it moot.
    # The metadata age (`Settings.metadata_max_age_ms`): the relays place rows by the
    # partitions the producer knows of, stale for that long after a topic is recreated.
    return AIOKafkaProducer(
        **client_kwargs(kafka),
        metadata_max_age_ms=metadata_max_age_ms,
        acks="all",
        linger_ms=2,
        max_batch_size=512 * 1024,
        enable_idempotence=False,
        request_timeout_ms=30000,
    )


@functools.lru_cache(maxsize=1 << 18)
def key_hash(key: bytes) -> int:
    """The non-negative murmur2 of a key, as Kafka's default partitioner takes it.

    aiokafka's murmur2 is pure Python, ~2 µs a key, and the relays hash ~2.4 keys per
    activity event; keys are member ids, so the same few thousand recur batch after batch.
    """
    return int(murmur2(key)) & 0x7FFFFFFF


def partition_for(key: bytes | None, partitions: list[int]) -> int:
    """Where the producer's `DefaultPartitioner` puts `key` (`partitions` sorted)."""
    if key is None:
        return int(DefaultPartitioner()(None, partitions, partitions))
    return partitions[key_hash(key) % len(partitions)]


def by_partition(rows: list[asyncpg.Record], partitions: list[int]) -> dict[int, Messages]:
    """A topic's rows of each of its `partitions` (sorted), in id order.

    `producer.send` per row costs a future, a partitioner call and a metadata lookup
    each (a tenth of the rules service's CPU in the bench profile); building the
    batches here does the same work once per batch. Partitions come from the
    producer's own default partitioner (murmur2 of the key, cached per key), so a
    member's events land where `send` would have put them, and in the same order.
    """
    groups: dict[int, Messages] = {}
    for r in rows:
        key = r["key"].encode() if r["key"] is not None else None
        groups.setdefault(partition_for(key, partitions), []).append((r["id"], key, r["payload"]))
    return groups


@dataclass(frozen=True, slots=True)
class TooLarge:
    """A row the broker refused, alone in its batch, as larger than it takes."""

    row_id: int
    topic: str
    partition: int
    key: bytes | None
    payload: bytes
    error: str


@dataclass(slots=True)
class Settled:
    """What became of a page's rows so far, chain by chain, as the broker answered."""

    acknowledged: list[int] = field(default_factory=list)
    too_large: list[TooLarge] = field(default_factory=list)


class OutboxRelay:
    def __init__(
        self, pool: asyncpg.Pool, producer: AIOKafkaProducer, service: str, *, dlq_topic: str
    ) -> None:
        self._pool = pool
        self._producer = producer
        self._service = service
        self._dlq_topic = dlq_topic
        # The `consumer` of the dead letters it writes: not the service's consumer, which
        # never saw these rows; `dlq list --consumer rules-relay` shows them.
        self.relay_name = f"{service}-relay"
        from services.common.dlq import DEAD_LETTERS  # as in `_dead_letter`

        # At zero from the start, as the consumers' (`BatchConsumer`).
        PUBLISHED.labels(service)
        DEAD_LETTERS.labels(self.relay_name, TOO_LARGE_LABEL)
        self._wake = asyncio.Event()
        self._lock_key = zlib.crc32(f"outbox:{service}".encode())
        # Topics the cluster lacked, each with when to look for it again (`_send_topic`).
        self._held: dict[str, float] = {}

    def wake(self) -> None:
        """Called after a commit that wrote outbox rows, so they leave within milliseconds."""
        self._wake.set()

    async def run(self) -> None:
        """Relay for as long as the process lives, holding the service's lock meanwhile.

        The lock lives with its connection: when Postgres drops that connection (a restart,
        a terminated backend) the lock is gone and another instance's relay may take it, so
        this one stops publishing and queues for the lock again on a new connection.
        """
        while True:
            try:
                await self._relay_holding_lock()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("outbox_relay_lock_lost", error=repr(exc))
                await asyncio.sleep(1.0)

    async def _relay_holding_lock(self) -> None:
        async with self._pool.acquire() as lock_conn:
            # Session-level advisory lock: exactly one relay per service publishes.
            while not await lock_conn.fetchval("SELECT pg_try_advisory_lock($1)", self._lock_key):
                await asyncio.sleep(1.0)
            try:
                while not lock_conn.is_closed():
                    # Cleared before reading, not after: a commit that lands while a page
                    # is in flight keeps its wake-up, instead of waiting out the idle poll.
                    self._wake.clear()
                    try:
                        sent = await self.relay_once()
                    except Exception as exc:
                        # Policy: the relay never dies. Broker or database down: the rows
                        # stay in the outbox and go out once both answer again.
                        log.warning("outbox_relay_retry", error=repr(exc))
                        await asyncio.sleep(1.0)
                        continue
                    if sent < RELAY_BATCH:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._wake.wait(), RELAY_IDLE_POLL_S)
                log.warning("outbox_relay_lock_lost", error="lock connection closed")
            finally:
                if not lock_conn.is_closed():
                    await lock_conn.execute("SELECT pg_advisory_unlock($1)", self._lock_key)

    async def relay_once(self) -> int:
        held = self._held_topics()
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(PAGE, self._service, RELAY_BATCH, held)
            if held:  # the oldest row may be a held topic's, left out of the page
                oldest = await conn.fetchval(OLDEST, self._service)
            else:
                oldest = rows[0]["created_at"] if rows else None
            OLDEST_AGE.labels(self._service).set(
                (datetime.now(UTC) - oldest).total_seconds() if oldest else 0.0
            )
            if not rows:
                return 0
            by_topic: dict[str, list[asyncpg.Record]] = {}
            for r in rows:
                by_topic.setdefault(r["topic"], []).append(r)
            page = Settled()
            # Every chain settles before the page may be sent again: a batch still in
            # flight could land behind the re-sent copies of the rows before it.
            outcomes = await asyncio.gather(
                *(self._send_topic(topic, of_topic, page) for topic, of_topic in by_topic.items()),
                return_exceptions=True,
            )
            # What the broker has goes, whatever became of the other partitions: order only
            # matters within a partition, and a failed chain keeps its rows from the first
            # one not acknowledged. Deleting only whole pages, one partition that kept
            # failing had every other partition's rows of the page re-sent each round.
            gone = page.acknowledged + [r.row_id for r in page.too_large]
            # Rows set aside leave the outbox with their dead letters written, or stay.
            async with conn.transaction() if page.too_large else contextlib.nullcontext():
                await self._dead_letter(conn, page.too_large)
                if gone:
                    await conn.execute(DELETE_GONE, self._service, rows[-1]["id"], gone)
        PUBLISHED.labels(self._service).inc(len(page.acknowledged))
        self._report(page.too_large)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return len(rows)

    def _held_topics(self) -> list[str]:
        """The topics left out of this round's page: those the cluster lacked, until it is
        time to look for them again or the producer's metadata has them (the lookup that
        failed made the producer ask for them at each refresh, `metadata_max_age_ms`)."""
        now = time.monotonic()
        for topic, due in list(self._held.items()):
            if now >= due or self._producer.client.cluster.partitions_for_topic(topic):
                del self._held[topic]
        return list(self._held)

    async def _send_topic(self, topic: str, rows: list[asyncpg.Record], page: Settled) -> None:
        """Send a topic's rows of the page, its partitions side by side.

        Its partitions are looked up here, topic by topic: a topic the cluster lacks (an
        operator deleted it, and the cluster creates none on its own) keeps its rows, in
        order, while the other topics' go, and stays out of the pages while held (a page
        full of its rows would hold up every other row behind them, and each lookup waits
        TOPIC_WAIT_S). Looked up for the whole page first, that one topic failed every
        page after the producer's request timeout (~40 s), round after round: nothing went.
        """
        try:
            found = await asyncio.wait_for(self._producer.partitions_for(topic), TOPIC_WAIT_S)
        except (TimeoutError, UnknownTopicOrPartitionError, TopicAuthorizationFailedError) as exc:
            self._held[topic] = time.monotonic() + TOPIC_HOLD_S
            log.error(
                "outbox_relay_topic_missing",
                service=self._service,
                topic=topic,
                rows_in_page=len(rows),
                retry_in_s=TOPIC_HOLD_S,
                error=repr(exc),
            )
            return
        outcomes = await asyncio.gather(
            *(
                self._send_in_order(topic, part, messages, page)
                for part, messages in by_partition(rows, sorted(found)).items()
            ),
            return_exceptions=True,
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _send_in_order(
        self, topic: str, part: int, messages: Messages, page: Settled
    ) -> None:
        """Send a partition's rows batch after batch, each once the one before is acknowledged.

        The producer is not idempotent (Tansu has no idempotence), so of two batches of a
        partition in flight, the first may expire in a broker stall while the second gets
        through: its rows would sit on the topic ahead of the first's re-sent copies, and
        consumers, which keep the first copy of an id, would apply a member's events out
        of order. A failed batch ends the chain; the partition is re-sent from its first
        row not acknowledged (`page` holds what was, batch by batch).
        Most pages fit one batch per partition, where the chain adds no wait.
        """
        batch = self._producer.create_batch()
        chunk: Messages = []
        for message in messages:
            _, key, value = message
            if batch.append(key=key, value=value, timestamp=None) is None:
                await self._deliver(topic, part, batch, chunk, page)
                batch, chunk = self._producer.create_batch(), []
                # An empty batch takes any record (a too-big one is the broker's to refuse).
                batch.append(key=key, value=value, timestamp=None)
            chunk.append(message)
        await self._deliver(topic, part, batch, chunk, page)

    async def _deliver(
        self, topic: str, part: int, batch: BatchBuilder, chunk: Messages, page: Settled
    ) -> None:
        """Send one batch and wait for the broker's answer.

        A record the broker refuses as too large would be refused every round, its
        partition stuck behind it for good: alone in its batch, it is set aside for the
        dead letters instead, and the chain goes on. A batch of several refused (a broker
        whose limit is below our batch size) is tried again a record at a time.
        """
        try:
            await (await self._producer.send_batch(batch, topic, partition=part))
        except TOO_LARGE as exc:
            if len(chunk) == 1:
                row_id, key, value = chunk[0]
                page.too_large.append(TooLarge(row_id, topic, part, key, value, repr(exc)))
                return
            for message in chunk:
                alone = self._producer.create_batch()
                alone.append(key=message[1], value=message[2], timestamp=None)
                await self._deliver(topic, part, alone, [message], page)
            return
        page.acknowledged.extend(row_id for row_id, _, _ in chunk)

    async def _dead_letter(self, conn: asyncpg.Connection, refused: list[TooLarge]) -> None:
        """Moves rows the broker refused as too large into `dead_letters` (whole) and onto
        the DLQ topic (cut to size), in the transaction that deletes them from the outbox."""
        if not refused:
            return
        from services.common import dlq  # here, not above: dlq builds on this module

        letters, records = [], []
        for r in refused:
            reason = (
                f"{TOO_LARGE_LABEL}: the broker refused the record ({len(r.payload)} bytes)"
                f" as larger than it takes: {r.error}"
            )
            letter, record = dlq.unsent_letter(
                self.relay_name, r.topic, r.partition, r.key, r.payload, reason, self._dlq_topic
            )
            records.append(record)
            # A letter is cut below any broker's limit; one refused even so is kept in the
            # table alone, or it would make a letter of itself round after round.
            if r.topic != self._dlq_topic:
                letters.append(letter)
        await dlq.record_dead_letters(conn, records)
        await write_outbox(conn, self._service, letters)

    def _report(self, refused: list[TooLarge]) -> None:
        from services.common.dlq import DEAD_LETTERS  # as in `_dead_letter`

        for r in refused:
            DEAD_LETTERS.labels(self.relay_name, TOO_LARGE_LABEL).inc()
            event_id, member_id = ids_of(r.payload)
            log.error(
                "outbox_relay_too_large",
                service=self._service,
                topic=r.topic,
                partition=r.partition,
                event_id=event_id,
                member_id=member_id,
                size=len(r.payload),
                error=r.error,
            )


def ids_of(payload: bytes) -> tuple[object, object]:
    """The event and member ids of an outbox row, for the log: ours are JSON objects."""
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(doc, dict):
        return None, None
    return doc.get("event_id", doc.get("dlq_id")), doc.get("member_id")
