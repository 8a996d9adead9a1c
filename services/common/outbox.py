"""The transactional outbox: rows written with the state change, relayed to Kafka after.

A relay publishes rows in id order and deletes them only after the broker acknowledged
them, so a crash between the two re-sends a few rows with the same event ids; consumers
dedupe on those ids. One relay per service holds an advisory lock so member order holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import asyncpg
import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner, murmur2
from prometheus_client import Counter, Gauge

RELAY_BATCH: Final = 5000  # rows per broker round trip; bounded to keep memory flat
RELAY_IDLE_POLL_S: Final = 0.2  # fallback poll when no in-process commit woke us

PUBLISHED = Counter("loyalty_outbox_published_total", "Outbox rows relayed", ["service"])
OLDEST_AGE = Gauge(
    "loyalty_outbox_oldest_age_seconds",
    "Age of the oldest row not yet relayed, as of the relay's last read of the outbox",
    ["service"],
)
log = structlog.get_logger()


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


def make_producer(bootstrap: str, metadata_max_age_ms: int = 30_000) -> AIOKafkaProducer:
    # acks=all for durability; no idempotence: Tansu lacks it and our ids make it moot.
    # The metadata age (`Settings.metadata_max_age_ms`): the relays place rows by the
    # partitions the producer knows of, stale for that long after a topic is recreated.
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
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


class OutboxRelay:
    def __init__(self, pool: asyncpg.Pool, producer: AIOKafkaProducer, service: str) -> None:
        self._pool = pool
        self._producer = producer
        self._service = service
        self._wake = asyncio.Event()
        self._lock_key = zlib.crc32(f"outbox:{service}".encode())

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
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT id, topic, key, payload, created_at FROM outbox"
                " WHERE service = $1 ORDER BY id LIMIT $2",
                self._service,
                RELAY_BATCH,
            )
            OLDEST_AGE.labels(self._service).set(
                (datetime.now(UTC) - rows[0]["created_at"]).total_seconds() if rows else 0.0
            )
            if not rows:
                return 0
            groups = await self._by_partition(rows)
            acknowledged: list[int] = []
            # Every chain settles before the page may be sent again: a batch still in
            # flight could land behind the re-sent copies of the rows before it.
            outcomes = await asyncio.gather(
                *(
                    self._send_in_order(topic, part, msgs, acknowledged)
                    for (topic, part), msgs in groups.items()
                ),
                return_exceptions=True,
            )
            # What the broker has goes, whatever became of the other partitions: order only
            # matters within a partition, and a failed chain keeps its rows from the first
            # one not acknowledged. Deleting only whole pages, one partition that kept
            # failing had every other partition's rows of the page re-sent each round.
            if acknowledged:
                await conn.execute(
                    "DELETE FROM outbox WHERE service = $1 AND id <= $2 AND id = ANY($3::bigint[])",
                    self._service,
                    rows[-1]["id"],
                    acknowledged,
                )
        PUBLISHED.labels(self._service).inc(len(acknowledged))
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return len(rows)

    async def _by_partition(self, rows: list[asyncpg.Record]) -> dict[tuple[str, int], Messages]:
        """The rows of each partition, in id order.

        `producer.send` per row costs a future, a partitioner call and a metadata lookup
        each (a tenth of the rules service's CPU in the bench profile); building the
        batches here does the same work once per batch. Partitions come from the
        producer's own default partitioner (murmur2 of the key, cached per key), so a
        member's events land where `send` would have put them, and in the same order.
        """
        groups: dict[tuple[str, int], Messages] = {}
        partitions: dict[str, list[int]] = {}
        for r in rows:
            topic = r["topic"]
            if topic not in partitions:
                partitions[topic] = sorted(await self._producer.partitions_for(topic))
            key = r["key"].encode() if r["key"] is not None else None
            part = partition_for(key, partitions[topic])
            groups.setdefault((topic, part), []).append((r["id"], key, r["payload"]))
        return groups

    async def _send_in_order(
        self, topic: str, part: int, messages: Messages, acknowledged: list[int]
    ) -> None:
        """Send a partition's rows batch after batch, each once the one before is acknowledged.

        The producer is not idempotent (Tansu has no idempotence), so of two batches of a
        partition in flight, the first may expire in a broker stall while the second gets
        through: its rows would sit on the topic ahead of the first's re-sent copies, and
        consumers, which keep the first copy of an id, would apply a member's events out
        of order. A failed batch ends the chain; the partition is re-sent from its first
        row not acknowledged (whose ids are added to `acknowledged` batch by batch).
        Most pages fit one batch per partition, where the chain adds no wait.
        """
        batch, ids = self._producer.create_batch(), []
        for row_id, key, value in messages:
            if batch.append(key=key, value=value, timestamp=None) is None:
                await (await self._producer.send_batch(batch, topic, partition=part))
                acknowledged += ids
                batch, ids = self._producer.create_batch(), []
                # An empty batch takes any record (a too-big one is the broker's to refuse).
                batch.append(key=key, value=value, timestamp=None)
            ids.append(row_id)
        await (await self._producer.send_batch(batch, topic, partition=part))
        acknowledged += ids
