"""Batch consumption with the consumed offsets stored in Postgres: effectively once.

Each batch runs in one Postgres transaction that (1) locks this consumer's offset rows,
(2) drops records below the stored offsets (a redelivery, or a zombie consumer's batch
after a rebalance), (3) lets the service apply the rest and write its outbox, (4) stores
the next offsets, with a fingerprint of each partition's last record applied. On
assignment the consumer seeks to the stored offsets, so Kafka's own group commits are never
relied upon (and never made), once it has found that fingerprint in the log: a log that no
longer holds it was recreated (an in-memory broker restarted, a topic deleted and created
again) and is read from its start, since offsets alone cannot tell a recreated log that has
grown past them (`recreated_log`). Re-reading is harmless: every handler dedupes by event
id.

Handlers may therefore write rows keyed by event id as "select the ids already recorded,
COPY the rest" (the journal, `rules_activity`, notifications) instead of `INSERT … ON
CONFLICT`, which costs Postgres 35–50 % more per row (bench/experiments/dedupe_writes.py):
two consumers of one partition are serialized by the lock on its offsets row. Only a
partition's first batch has no row to lock; should two consumers race on it, the COPY
fails on the key, and `process` applies the batch again record by record, finding those
ids recorded (nothing is dead-lettered).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import asyncpg
import structlog
from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import ConsumerRecord
from faststream.kafka import KafkaBroker
from faststream.message import StreamMessage
from faststream.middlewares import AckPolicy
from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from services.common.config import KafkaAccess
from services.common.dlq import (
    DEAD_LETTERS,
    REASONS,
    classify,
    dead_letter,
    logged_ids,
    record_dead_letters,
)
from services.common.log_end import LogEnds, fingerprint
from services.common.log_start import SKIPPED, gaps, report_skipped
from services.common.outbox import OutboxRow, write_outbox
from services.common.recreated_log import LogWatch, mark_of

log = structlog.get_logger()

CONSUMED = Counter("loyalty_consumed_total", "Records applied", ["consumer"])
BATCH_SECONDS = Histogram(
    "loyalty_batch_seconds",
    "Time to apply one batch in Postgres",
    ["consumer"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
# Back-off for transient failures (database restart, network blip): short, then capped.
RETRY_BACKOFF_S: Final = (0.1, 0.5, 1.0, 2.0, 5.0)
# Failures of the database's state, not of the batch: retried, never dead-lettered. A
# database refusing writes (read-only after a failover), out of disk or memory, or
# shutting down fails every batch alike; isolating one would dead-letter good records.
TRANSIENT = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TransactionRollbackError,  # deadlocks and serialization failures among them
    asyncpg.LockNotAvailableError,  # a DBA's lock_timeout, while another writer holds a row
    asyncpg.TooManyConnectionsError,
    asyncpg.OperatorInterventionError,  # admin or crash shutdown, a cancelled statement
    asyncpg.InsufficientResourcesError,  # disk full, out of memory
    asyncpg.ReadOnlySQLTransactionError,
    asyncpg.PostgresSystemError,  # I/O errors
)


@dataclass
class BatchWork:
    """What a service's handler produced for one batch, applied in the same transaction."""

    outbox: list[OutboxRow] = field(default_factory=list)
    dead: list[tuple[object, ...]] = field(default_factory=list)
    # Each dead letter's reason label, counted in loyalty_dlq_messages_total once the
    # batch commits (an attempt rolled back and retried counts nothing).
    dead_labels: list[str] = field(default_factory=list)
    # Counters of what the batch did and by how much (the notifier's outcomes, the points
    # the ledger expired), added once it commits, as the dead letters are.
    counts: list[tuple[Counter, float]] = field(default_factory=list)
    # Rows a background task of the service picks up from its tables (the notifier's
    # pending notifications): `on_commit` runs once the batch commits, as for outbox rows.
    # Woken earlier, the task finds nothing committed yet and sleeps its full poll.
    wake: bool = False


Handler = Callable[[asyncpg.Connection, Sequence[ConsumerRecord], BatchWork], Awaitable[None]]


class BatchConsumer:
    def __init__(
        self,
        *,
        name: str,
        service: str,
        topic: str,
        dlq_topic: str,
        pool: asyncpg.Pool | None = None,
        handler: Handler | None = None,
        on_commit: Callable[[], None] = lambda: None,
        refusals: Sequence[str] = (),
        group_id: str | None = None,
    ) -> None:
        """`refusals`: the labels of the `dlq.Refused` its handler raises, exported at zero
        from the start with the other reasons. `group_id`: its Kafka consumer group, `name`
        if not given. Its offsets, dead letters and metrics go by `name`, so that a group
        renamed (`LOYALTY_GROUP_PREFIX`) re-reads nothing: Kafka's group offsets are not
        used (the partitions are sought to the offsets stored under `name`)."""
        self.name = name
        self.group_id = group_id or name
        self.service = service
        self.topic = topic
        self.dlq_topic = dlq_topic
        self._pool: Any = pool
        self._handler: Any = handler
        self._on_commit = on_commit
        self.subscriber: Any = None
        self.next_offsets: dict[tuple[str, int], int] = {}
        self.assigned: set[TopicPartition] = set()
        # What this consumer knows of its logs, to tell one recreated under it.
        self._watch = LogWatch(name)
        self.log_ends = LogEnds()  # where they end, for the lag gauge
        # Seeks the rebalance listener could not finish, retried in the background, each
        # with its partitions (paused until it succeeds).
        self._seeking: dict[asyncio.Task[None], frozenset[TopicPartition]] = {}
        # How long the listener tries itself: aiokafka sends no heartbeat meanwhile.
        self._attempt_s = 5.0
        # Per partition, how many times this process reset it to a recreated log's start,
        # and the counts as a batch found them on entering `process`: a batch fetched
        # before a reset (in flight, retried) must not raise the offsets row again.
        self._resets: dict[tuple[str, int], int] = {}
        self._batch_resets: dict[tuple[str, int], int] = {}
        # The batches FastStream handed to our parser (`attach`) that `process` has not
        # finished: the one being applied, or none. Their records are fetched, not
        # applied (`lag`); an earlier one still here was lost on its way (`_reread_lost`).
        self._in_flight: list[tuple[ConsumerRecord, ...]] = []
        # Its series exported from the start, at zero: a series born at its first increment
        # has no earlier sample, so rate() and increase() miss that increment (the first
        # dead letters, the first records lost).
        CONSUMED.labels(name)
        BATCH_SECONDS.labels(name)
        SKIPPED.labels(name)
        for reason in (*REASONS, *refusals):
            DEAD_LETTERS.labels(name, reason)

    # --- wiring -------------------------------------------------------------------------

    def bind(
        self, pool: asyncpg.Pool, handler: Handler, on_commit: Callable[[], None] = lambda: None
    ) -> None:
        """Resources arrive at start-up; the subscriber exists earlier (AsyncAPI docs)."""
        self._pool, self._handler, self._on_commit = pool, handler, on_commit

    def attach(
        self,
        broker: KafkaBroker,
        *,
        kafka: KafkaAccess,
        max_batch: int,
        batch_wait_ms: int,
        fetch_wait_ms: int,
        session_timeout_ms: int = 10_000,
    ) -> None:
        consumer = self
        # Its own clients (out of the group) reach the broker as `broker` does.
        self._watch.kafka = kafka
        self.log_ends.kafka = kafka
        # Half the session: the broker evicts a member that sends no heartbeat for all of it.
        self._attempt_s = session_timeout_ms / 2000

        class _SeekToStored(ConsumerRebalanceListener):  # type: ignore[misc]
            async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
                await consumer.stop_seeking(set(revoked))
                consumer.assigned -= set(revoked)
                for tp in revoked:
                    consumer._watch.revoked((tp.topic, tp.partition))

            async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
                consumer.log_ends.start(consumer.fetched_ends)  # at the first assignment
                await consumer.seek_assigned(assigned)

        async def _records(records: tuple[ConsumerRecord, ...]) -> StreamMessage[Any]:
            # FastStream's own parser decodes every header of every record as UTF-8: one
            # that is not (Spring's kafka_correlationId, a tracing id) or is null (Java
            # clients send them) raised, and FastStream logged it and dropped the whole
            # batch, its fetch position past it. This one reads nothing of the records, so
            # nothing in them can fail it (nor a `reply_to` header make FastStream publish
            # the handler's result). Async: FastStream runs a sync one in a thread.
            consumer._in_flight.append(records)
            return StreamMessage(raw_message=records, body=records)

        async def _raw(msg: Any) -> Any:
            # Skip FastStream's JSON decoding (its batch decoder parses each record again,
            # headers included): we validate bytes ourselves so that a bad message becomes
            # a dead letter rather than an exception. The handler gets the batch's records
            # as its body (the broker does no dependency injection).
            return msg.raw_message

        self.subscriber = broker.subscriber(
            self.topic,
            group_id=self.group_id,
            batch=True,
            max_records=max_batch,
            batch_timeout_ms=batch_wait_ms,
            fetch_max_wait_ms=fetch_wait_ms,
            # A group join waits up to about half of this on some brokers (Tansu): shorter
            # in tests, the Kafka default in production (a GC pause must not evict us).
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=max(1000, session_timeout_ms // 3),
            max_partition_fetch_bytes=4 * 1024 * 1024,
            auto_offset_reset="earliest",
            # An upstream writing with transactions (Kafka Connect, a Java till) leaves
            # the records of an aborted one in the log: read uncommitted, they were paid.
            isolation_level="read_committed",
            listener=_SeekToStored(),
            ack_policy=AckPolicy.MANUAL,
            parser=_records,
            decoder=_raw,
            title=f"{self.name}:{self.topic}",
        )

        @self.subscriber  # type: ignore[untyped-decorator]
        async def on_batch(records: Any) -> None:  # the batch (`_raw`)
            await consumer.process(list(records))

    async def seek_assigned(self, assigned: set[TopicPartition]) -> None:
        """Seek the assigned partitions to their stored offsets; what fails is retried in
        the background, the partitions paused (and not counted assigned) until it is done.

        aiokafka logs and swallows an exception of the rebalance listener: the partitions
        then kept the broker's position (`auto_offset_reset`, the log's start) and were
        never counted assigned, so /readyz answered 503, the lag gauge was empty and the
        rules' tier sweep (it waits to be caught up) never ran again, until a restart.
        Nor may the listener wait for the database: aiokafka sends no heartbeat while it
        runs, and after the session timeout the broker gives the partitions to another
        member while this one, returning, consumes them too. So it tries once, for at
        most half the session, and leaves the rest to a task (`_seek_until_done`) that a
        revocation of those partitions cancels.
        """
        # Until then the fetcher reads from a position of its own (the log's start): a
        # record it handed over would be applied before the partition's earlier ones, were
        # the log a new one. Paused, none is.
        kafka = self.subscriber.consumer
        kafka.pause(*assigned)
        try:
            await asyncio.wait_for(self._seek_to_stored(assigned), self._attempt_s)
        except Exception as exc:  # TimeoutError among them
            self._log_retry(exc, 0)
            task = asyncio.create_task(self._seek_until_done(set(assigned)))
            self._seeking[task] = frozenset(assigned)
            task.add_done_callback(lambda t: self._seeking.pop(t, None))
            return
        kafka.resume(*assigned)

    async def _seek_until_done(self, assigned: set[TopicPartition]) -> None:
        attempt = 0
        while True:
            await asyncio.sleep(RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)])
            attempt += 1
            if getattr(self.subscriber, "consumer", None) is None:
                return  # the subscriber stopped (FastStream drops its consumer): nothing to seek
            try:
                await self._seek_to_stored(assigned)
            except Exception as exc:
                self._log_retry(exc, attempt)
                continue
            self.subscriber.consumer.resume(*assigned)
            return

    def _log_retry(self, exc: Exception, attempt: int) -> None:
        delay = RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)]
        # Anything else is not expected to pass by itself: logged with its trace, retried
        # all the same (readiness stays false meanwhile).
        # (an attempt timed out among the first: TimeoutError is an OSError).
        emit = log.warning if isinstance(exc, TRANSIENT) else log.exception
        emit("assignment_retry", consumer=self.name, error=repr(exc), delay_s=delay)

    async def stop(self) -> None:
        """Cancel every background seek, for a service's shutdown: aiokafka leaves the
        group without revoking, so `stop_seeking` never hears of it."""
        await self.log_ends.stop()
        tasks = list(self._seeking)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def stop_seeking(self, revoked: set[TopicPartition]) -> None:
        """Cancel the background seeks of revoked partitions (aiokafka revokes them all at
        each rebalance): a seek of a partition no longer assigned fails, and its next
        owner seeks for itself. Awaited, so that none seeks or resumes afterwards."""
        tasks = [t for t, tps in self._seeking.items() if tps & revoked]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def _seek_to_stored(self, assigned: set[TopicPartition]) -> None:
        tps = sorted(assigned)
        async with self._pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO consumer_offsets (consumer, topic, partition, next_offset)"
                " SELECT $1, t, p, 0 FROM unnest($2::text[], $3::int[]) AS u(t, p)"
                " ON CONFLICT DO NOTHING",
                self.name,
                [tp.topic for tp in tps],
                [tp.partition for tp in tps],
            )
            rows = await conn.fetch(
                "SELECT topic, partition, next_offset, last_record FROM consumer_offsets"
                " WHERE consumer = $1 AND topic = ANY($2::text[])",
                self.name,
                list({tp.topic for tp in tps}),
            )
        stored = {(r["topic"], r["partition"]): r["next_offset"] for r in rows}
        marks = {
            (r["topic"], r["partition"]): mark_of(r["next_offset"], r["last_record"]) for r in rows
        }
        kafka = self.subscriber.consumer
        starts = await kafka.beginning_offsets(tps)
        recreated = await self._watch.recreated_at_assignment(tps, stored, marks, starts, kafka)
        for tp in tps:
            key = (tp.topic, tp.partition)
            offset = stored.get(key, 0)
            if tp in recreated:
                # The log does not hold what we consumed: the topic was recreated (an
                # in-memory broker restarted, or ops deleted it). Start over from its
                # beginning; event-id dedupe downstream keeps a re-read from paying twice.
                log.warning(
                    recreated[tp],
                    consumer=self.name,
                    topic=tp.topic,
                    partition=tp.partition,
                    stored=offset,
                    log_start=starts[tp],
                )
                offset = starts[tp]
                await self._reset_offset(tp, offset)
                self._resets[key] = self._resets.get(key, 0) + 1
                self._watch.forget(key)
            elif offset < starts[tp]:
                # Records not yet applied were deleted (retention, DeleteRecords): the
                # fetch resumes at the log start, and the batch there counts them
                # (`log_start.report_skipped`).
                log.warning(
                    "stored_offset_before_log_start",
                    consumer=self.name,
                    topic=tp.topic,
                    partition=tp.partition,
                    stored=offset,
                    log_start=starts[tp],
                )
            elif offset == starts[tp] and marks.get(key) is not None:
                # The records applied were deleted, the record last applied with them;
                # none unread was: nothing to re-read (not a recreated log).
                log.info("log_start_at_stored_offset", consumer=self.name, topic=tp.topic,
                         partition=tp.partition, stored=offset)  # fmt: skip
            self.next_offsets[key] = offset
            kafka.seek(tp, offset)
            if tp not in recreated:
                self._watch.seeked(key, marks.get(key))
        self.assigned |= set(tps)
        log.info("partitions_assigned", consumer=self.name, partitions=[tp.partition for tp in tps])

    async def _reset_offset(self, tp: TopicPartition, offset: int) -> None:
        async with self._pool.acquire() as conn:
            await conn.execute(
                "UPDATE consumer_offsets SET next_offset = $4, last_record = NULL,"
                " updated_at = now() WHERE consumer = $1 AND topic = $2 AND partition = $3",
                self.name,
                tp.topic,
                tp.partition,
                offset,
            )

    # --- processing ---------------------------------------------------------------------

    async def process(self, records: Sequence[ConsumerRecord]) -> None:
        """Apply a batch; transient failures retry, a poison record is isolated and DLQ'd.

        Nothing escapes: FastStream would swallow the exception with the fetch position
        already past the batch, and the next batch's offsets would skip it (never paid,
        never dead-lettered). So whatever cannot be applied or dead-lettered, a dead
        letter's own write included, is retried with back-off until it can; records
        already committed by an earlier attempt are skipped by their stored offsets.
        """
        attempt = 0
        self._watch.looked = set()
        self._batch_resets = dict(self._resets)
        try:
            records = self._reread_lost(records)
            while True:
                try:
                    await self._apply_or_isolate(records)
                    if self._watch.went_back and await self._check_went_back():
                        continue  # the records held are of the log consumed: applied now
                    return
                except Exception as exc:
                    delay = RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)]
                    log.warning("batch_retry", consumer=self.name, error=repr(exc),
                                delay_s=delay)  # fmt: skip
                    attempt += 1
                    await asyncio.sleep(delay)
        finally:
            self._watch.looked = set()
            self._in_flight.clear()

    def _reread_lost(self, records: Sequence[ConsumerRecord]) -> Sequence[ConsumerRecord]:
        """Seek the partitions of a batch lost between our parser and `process` back to
        the offsets applied, and leave this batch's records of them out (they come again).

        Nothing FastStream runs between the two reads the records (`attach`), so none is
        expected to be lost there. But FastStream logs and swallows such a failure with
        the fetch position past the batch, and the next batch applied stores offsets past
        it: a gap that looks like a transaction's markers (`log_start.gaps`), records
        never paid nor dead-lettered. This makes it a re-read, said at ERROR.
        """
        lost = {(r.topic, r.partition) for batch in self._in_flight[:-1] for r in batch}
        if not lost:
            return records
        kafka: Any = getattr(self.subscriber, "consumer", None)
        owned = kafka.assignment() if kafka is not None else ()
        for key in sorted(lost):
            if TopicPartition(*key) in owned and key in self.next_offsets:
                kafka.seek(TopicPartition(*key), self.next_offsets[key])
        log.error("batch_lost_before_handler", consumer=self.name,
                  partitions=sorted(p for _, p in lost))  # fmt: skip
        del self._in_flight[:-1]
        return [r for r in records if (r.topic, r.partition) not in lost]

    async def _apply_or_isolate(self, records: Sequence[ConsumerRecord]) -> None:
        try:
            await self._apply(records)
        except TRANSIENT:
            raise
        except Exception as exc:
            if len(records) == 1:
                await self._dead_letter_poison(records[0], exc)
                return
            # Something in the batch breaks the handler: apply one at a time so only the
            # culprit goes to the DLQ and everything else is still paid.
            log.exception("batch_failed_isolating", consumer=self.name, size=len(records))
            for record in records:
                await self._apply_or_isolate([record])

    def _current(self, records: Sequence[ConsumerRecord]) -> Sequence[ConsumerRecord]:
        """The records of partitions this consumer still owns, fetched since their last
        reset. A batch of a revoked partition is its next owner's to apply (from the
        stored offsets), and one fetched before the partition was reset to a recreated
        log's start is of the position abandoned: applied, either would raise the offsets
        row past the new log's records still unread (`GREATEST`), and they were lost."""
        kafka = getattr(self.subscriber, "consumer", None)
        owned = kafka.assignment() if kafka is not None else None
        resets, seen = self._resets, self._batch_resets
        stale = {
            key
            for key in {(r.topic, r.partition) for r in records}
            if (owned is not None and TopicPartition(*key) not in owned)
            or resets.get(key, 0) != seen.get(key, 0)
        }
        if not stale:
            return records
        log.warning("stale_records_dropped", consumer=self.name,
                    partitions=sorted(p for _, p in stale))  # fmt: skip
        return [r for r in records if (r.topic, r.partition) not in stale]

    async def _apply(self, records: Sequence[ConsumerRecord]) -> None:
        started = time.perf_counter()
        records = self._current(records)
        if not records:
            return
        work = BatchWork()
        partitions = sorted({(r.topic, r.partition) for r in records})
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT topic, partition, next_offset, last_record FROM consumer_offsets"
                " WHERE consumer = $1 AND (topic, partition) IN"
                " (SELECT * FROM unnest($2::text[], $3::int[]))"
                " ORDER BY topic, partition FOR UPDATE",
                self.name,
                [t for t, _ in partitions],
                [p for _, p in partitions],
            )
            stored = {(r["topic"], r["partition"]): r["next_offset"] for r in rows}
            fresh: list[ConsumerRecord] = []
            last: dict[tuple[str, int], ConsumerRecord] = {}
            # Each partition's first record applied (a partition's records come in offset
            # order): past the stored offset, the log may have lost the ones between.
            first: dict[tuple[str, int], int] = {}
            behind: set[tuple[str, int]] = set()
            for r in records:
                key = (r.topic, r.partition)
                if r.offset >= stored.get(key, 0):
                    fresh.append(r)
                    if key not in last:
                        first[key] = r.offset
                        last[key] = r
                    elif r.offset > last[key].offset:
                        last[key] = r
                else:
                    behind.add(key)
            # Records below the stored offset: a batch retried after part of it committed,
            # a zombie's batch after a rebalance, or the position reset to the start of a
            # log that is a new one. Should the last be possible, the partition's records
            # wait, all of them, until the log is looked at (`_check_went_back`): dropped,
            # the new log's records below the offset were lost; and applied, its records
            # past it would go before them. Not a partition revoked meanwhile (a zombie's
            # batch), nor one already looked for in this call (`LogWatch.unconfirmed`).
            kafka: Any = getattr(self.subscriber, "consumer", None)
            owned = kafka.assignment() if kafka is not None else ()
            went_back = self._watch.unconfirmed(behind, owned, rows, records) if behind else {}
            if went_back:
                fresh = [r for r in fresh if (r.topic, r.partition) not in went_back]
                last = {k: r for k, r in last.items() if k not in went_back}
                first = {k: o for k, o in first.items() if k not in went_back}
            skipped = gaps(first, stored)
            if fresh:
                await self._handler(conn, fresh, work)
                await write_outbox(conn, self.service, work.outbox)
                await record_dead_letters(conn, work.dead)
            if last:
                keys = sorted(last)
                await conn.execute(
                    "INSERT INTO consumer_offsets AS o"
                    " (consumer, topic, partition, next_offset, last_record)"
                    " SELECT $1, t, p, n, f"
                    " FROM unnest($2::text[], $3::int[], $4::bigint[], $5::bytea[])"
                    " AS u(t, p, n, f)"
                    " ON CONFLICT (consumer, topic, partition) DO UPDATE"
                    " SET next_offset = GREATEST(o.next_offset, EXCLUDED.next_offset),"
                    " last_record = CASE WHEN EXCLUDED.next_offset >= o.next_offset"
                    " THEN EXCLUDED.last_record ELSE o.last_record END, updated_at = now()",
                    self.name,
                    [k[0] for k in keys],
                    [k[1] for k in keys],
                    [last[k].offset + 1 for k in keys],
                    [fingerprint(last[k]) for k in keys],
                )
        next_offsets = {k: r.offset + 1 for k, r in last.items()}
        self.next_offsets.update(next_offsets)
        self._watch.applied(last, went_back)
        if skipped and kafka is not None:  # else driven without a broker (tests)
            await report_skipped(self.name, kafka, skipped)
        CONSUMED.labels(self.name).inc(len(fresh))
        for label in work.dead_labels:
            DEAD_LETTERS.labels(self.name, label).inc()
        for counter, amount in work.counts:
            counter.inc(amount)
        BATCH_SECONDS.labels(self.name).observe(time.perf_counter() - started)
        if work.outbox or work.wake:
            self._on_commit()

    async def _check_went_back(self) -> bool:
        kafka: Any = getattr(self.subscriber, "consumer", None)

        async def restart(tp: TopicPartition, start: int) -> None:
            await self._reset_offset(tp, start)
            self.next_offsets[(tp.topic, tp.partition)] = start
            if tp in kafka.assignment():  # else its new owner looked for itself
                kafka.seek(tp, start)

        return await self._watch.check_went_back(kafka, restart)

    async def _dead_letter_poison(self, record: ConsumerRecord, exc: Exception) -> None:
        log.error(
            "poison_record",
            consumer=self.name,
            partition=record.partition,
            offset=record.offset,
            error=repr(exc),
            **logged_ids(record),
        )
        label, reason = classify(exc)
        try:
            await self._write_dead_letter(record, label, reason)
        except TRANSIENT:
            raise
        except Exception as failed:
            # The letter itself holds something the tables refuse: a plain one instead (no
            # key, the reason's kind), so that the record is kept and the partition moves.
            log.error("dead_letter_unwritable", consumer=self.name, partition=record.partition,
                      offset=record.offset, error=repr(failed))  # fmt: skip
            # The record itself is what is consumed (its fingerprint stored): a keyless copy
            # is not what the log holds, and the next look would take the log for new.
            await self._write_dead_letter(
                record,
                label,
                f"{label} (its reason could not be stored: {type(failed).__name__})",
                letter=dataclasses.replace(record, key=None),
            )

    async def _write_dead_letter(
        self,
        record: ConsumerRecord,
        label: str,
        reason: str,
        letter: ConsumerRecord | None = None,
    ) -> None:
        async def handler(
            conn: asyncpg.Connection, records: Sequence[ConsumerRecord], work: BatchWork
        ) -> None:
            row, dead = dead_letter(letter or record, self.name, label, reason, self.dlq_topic)
            work.outbox.append(row)
            work.dead.append(dead)
            work.dead_labels.append(label)

        original, self._handler = self._handler, handler
        try:
            await self._apply([record])
        finally:
            self._handler = original

    # --- observability ------------------------------------------------------------------

    def fetched_ends(self) -> dict[TopicPartition, int | None]:
        """Each partition owned, with its end as its last fetch reported it (None: none yet)."""
        kafka = getattr(self.subscriber, "consumer", None)
        try:
            return {tp: kafka.highwater(tp) for tp in self.assigned} if kafka else {}
        except AssertionError:  # aiokafka, mid-rebalance: "Partition is not assigned"
            return {}

    def lag(self) -> dict[tuple[str, int], int]:
        """Records not yet applied, per partition owned whose end is known: no I/O.

        Counted from the fetch position where that is past the offset applied and no
        batch in flight holds the partition: aiokafka reads past a transaction's marker
        and an aborted transaction's records (read_committed) without handing them over.
        From the offset applied alone, the lag stayed at 1 after each upstream
        transaction, and an aborted one larger than a batch at a partition's end kept the
        tier sweep waiting (`rules.app.caught_up`) for records that never come. Postgres
        keeps the offset applied: after a restart they are read past again.
        """
        kafka = getattr(self.subscriber, "consumer", None)
        out: dict[tuple[str, int], int] = {}
        if kafka is None:
            return out
        # Positions first: a batch fetched after them is in flight below, or applied; read
        # the other way round, one fetched in between would count as applied.
        positions = {tp: fetch_position(kafka, tp) for tp in self.assigned}
        busy = {(r.topic, r.partition) for batch in tuple(self._in_flight) for r in batch}
        for tp, position in positions.items():
            high = self.log_ends.end(tp, kafka.highwater(tp))
            if high is None:
                continue
            key = (tp.topic, tp.partition)
            done = self.next_offsets.get(key, 0)
            if position is not None and key not in busy:
                done = max(done, position)
            out[key] = max(0, high - done)
        return out


def fetch_position(kafka: Any, tp: TopicPartition) -> int | None:
    """Where `kafka`'s next fetch of `tp` starts (None: not assigned, or not known yet).

    aiokafka's `position()` is a coroutine, to wait for a position not known yet; `lag` is
    sync and runs in the metrics server's thread too, so this reads the partition's state
    as aiokafka's `highwater()` does."""
    try:
        return int(kafka._subscription.subscription.assignment.state_value(tp).position)
    except (AttributeError, AssertionError):  # unassigned meanwhile, or no position yet
        return None


class LagCollector(Collector):
    """Prometheus gauge computed on scrape: the log's end (`LogEnds`) minus where the
    consumer has applied or read past (`BatchConsumer.lag`)."""

    def __init__(self, consumers: list[BatchConsumer]) -> None:
        self.consumers = consumers

    def collect(self) -> Any:
        g = GaugeMetricFamily(
            "loyalty_consumer_lag",
            "Records not yet applied",
            labels=["consumer", "topic", "partition"],
        )
        for c in self.consumers:
            for (topic, partition), lag in sorted(c.lag().items()):
                g.add_metric([c.name, topic, str(partition)], lag)
        yield g


_LAG = LagCollector([])
_lag_registered = False


def register_lag(consumers: list[BatchConsumer]) -> None:
    """One collector per process; each service (or test) adds its consumers to it."""
    global _lag_registered
    if not _lag_registered:
        REGISTRY.register(_LAG)
        _lag_registered = True
    _LAG.consumers.extend(consumers)


def validate_records(
    records: Sequence[ConsumerRecord],
    parse: Callable[[bytes], Any],
    work: BatchWork,
    consumer: str,
    dlq_topic: str,
    check: Callable[[ConsumerRecord, Any], None] | None = None,
) -> list[tuple[ConsumerRecord, Any]]:
    """Parse each record; the bad ones become dead letters in `work`, the rest are returned.
    `check(record, parsed)` may refuse a message that parses (raising `dlq.Refused`)."""
    good: list[tuple[ConsumerRecord, Any]] = []
    for record in records:
        try:
            parsed = parse(record.value or b"")
            if check is not None:
                check(record, parsed)
            good.append((record, parsed))
        except Exception as exc:
            refuse_record(record, exc, work, consumer, dlq_topic)
    return good


def refuse_record(
    record: ConsumerRecord, exc: Exception, work: BatchWork, consumer: str, dlq_topic: str
) -> None:
    """Dead-letters `record` for `exc` in `work`: published and kept with the batch."""
    label, reason = classify(exc)
    row, dead = dead_letter(record, consumer, label, reason, dlq_topic)
    work.outbox.append(row)
    work.dead.append(dead)
    work.dead_labels.append(label)
    log.warning(
        "dead_letter",
        consumer=consumer,
        reason=label,
        partition=record.partition,
        offset=record.offset,
        **logged_ids(record),
    )
