"""Rules service: activity in, grants out, under the rule-set version in force at event time.

Per batch, in one transaction: keep the activity as received (its event id is the
idempotency key, so a redelivered event is dropped here), load the members' rule state,
fold each event through the pure evaluator, store the states and put the grants in the
outbox. The relay then publishes them to `loyalty.grants.v1`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Final

import asyncpg
import structlog
from aiokafka.structs import ConsumerRecord
from faststream import FastStream
from faststream.specification import AsyncAPI
from prometheus_client import Counter

import services.rules
from schemas.activity import Activity, parse_activity
from schemas.grants import GrantEvent
from services.common.config import Settings, load_settings
from services.common.consumer import (
    BatchConsumer,
    BatchWork,
    refuse_record,
    register_lag,
    validate_records,
)
from services.common.kafka_clients import start_client
from services.common.outbox import OutboxRelay, OutboxRow, make_producer
from services.common.planner_stats import keep_planner_stats
from services.common.runtime import Background, create_broker, create_pool, start_metrics_server
from services.rules import referral_chain as chain
from services.rules import reused_ids
from services.rules.dated_ahead import LABEL as DATED_AHEAD
from services.rules.dated_ahead import reference_time, refuse_dated_ahead
from services.rules.emit import grant_json
from services.rules.engine import HeldEvent, due_after, evaluate
from services.rules.rulebook_store import book_stamp, load_book
from services.rules.ruleset import RuleBook, RuleSetError
from services.rules.state import MemberState, dump_state, load_state, with_shared_tz
from services.rules.tier_sweeper import TierSweeper

SERVICE: Final = "rules"
log = structlog.get_logger()
# The contract keys activity by member, which keeps a member's events in order on one
# partition; a producer keying otherwise is paid all the same (`_lock_states`), but shown.
KEY_MISMATCH: Final = Counter(
    "loyalty_activity_key_mismatch_total",
    "Activity records whose key is not their member_id",
    ["consumer"],
)

# Every activity is kept (for backtests); a redelivered one is found by its id
# (`reused_ids.sort_out`) and only the new ones are COPYed in (why that is safe:
# services/common/consumer.py; bench/experiments/dedupe_writes.py: 5.7 -> 3.8 us of
# Postgres backend CPU per row against INSERT ... unnest ... ON CONFLICT DO NOTHING RETURNING).
ACTIVITY_COLUMNS: Final = [
    "event_id", "member_id", "type", "occurred_at", "topic", "partition", "offset", "payload"
]  # fmt: skip
SELECT_STATES: Final = """
SELECT member_id, referrer_id, referrer_since, tier_due_at, state::text AS state
FROM rules_member_state WHERE member_id = ANY($1::text[]) ORDER BY member_id FOR UPDATE
"""
# A member without a row yet: its row inserted first, so this transaction holds it like the
# others. One whose row another transaction is creating (its events on two partitions, a
# producer keying by something else than the member) waits here for that one, and is then
# read again: both started from an empty state, and both paid the first-purchase bonus.
# The placeholder is the empty state; the batch writes every member's state before it
# commits, so none is ever seen. One statement, in batches with new members only.
INSERT_NEW: Final = """
INSERT INTO rules_member_state (member_id, state)
SELECT m, json_build_object('member_id', m) FROM unnest($1::text[]) AS m
ON CONFLICT (member_id) DO NOTHING RETURNING member_id
"""
INSERT_HELD: Final = """
INSERT INTO rules_held (event_id, member_id, type, occurred_at, payload, reason)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::bytea[],
                     $6::text[])
ON CONFLICT (event_id) DO NOTHING
"""
UPSERT_STATES: Final = """
INSERT INTO rules_member_state AS s (member_id, referrer_id, referrer_since, state,
                                     tier_valid_until, tier_due_at, activity_partition,
                                     updated_at)
SELECT m, r, rs, st::json, tu, d, p, now()
FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::timestamptz[],
            $6::timestamptz[], $7::int[]) AS u(m, r, rs, st, tu, d, p)
ON CONFLICT (member_id) DO UPDATE
SET referrer_id = EXCLUDED.referrer_id,
    referrer_since = COALESCE(s.referrer_since, EXCLUDED.referrer_since),
    state = EXCLUDED.state, tier_valid_until = EXCLUDED.tier_valid_until,
    tier_due_at = EXCLUDED.tier_due_at, activity_partition = EXCLUDED.activity_partition,
    updated_at = now()
"""


class RulesProcessor:
    """Holds the current rule book; `handle` is the consumer's per-batch function."""

    def __init__(self, settings: Settings, consumer_name: str) -> None:
        self.settings = settings
        self.consumer_name = consumer_name
        self.book: RuleBook | None = None
        # The stamp read *before* the book it goes with: a version published while the book
        # loads then shows as a new stamp at the next check, instead of being marked seen.
        self._stamp: tuple[int, object] | None = None
        # The watcher and the consumer's per-batch check both reload; one at a time, so an
        # older book finishing later never replaces a newer one.
        self._book_lock = asyncio.Lock()
        self._key_mismatch = KEY_MISMATCH.labels(consumer_name)  # exported at zero

    async def refresh_book(self, pool: asyncpg.Pool) -> bool:
        # The connection first, then the lock: a batch holds its connection when it takes
        # the lock, so the other order could wait on a pool a batch is waiting in.
        async with pool.acquire() as conn, self._book_lock:
            return await self._reload(conn)

    async def _reload(self, conn: asyncpg.Connection) -> bool:
        """Load the book if its stamp moved (call under `_book_lock`); True if loaded."""
        stamp = await book_stamp(conn)
        if stamp == self._stamp and self.book is not None:
            return False
        try:
            async with conn.transaction():  # in a batch, a savepoint: it stays usable
                book = await load_book(conn)
        except RuleSetError:
            if self.book is None:
                raise
            # Publishing validates, so this means a hand-edited row: keep what is in force.
            log.exception("rulebook_reload_failed")
            return False
        self.book, self._stamp = book, stamp
        log.info("rulebook_loaded", versions=[r.version for r in book.versions],
                 compiled_core=services.rules.NATIVE)  # fmt: skip
        return True

    async def watch_book(self, pool: asyncpg.Pool) -> None:
        while True:
            await asyncio.sleep(self.settings.rulebook_poll_seconds)
            try:
                await self.refresh_book(pool)
            except Exception:
                # A bad published body must not stop payments under the versions in force.
                log.exception("rulebook_reload_failed")

    def _dated_ahead(self, record: ConsumerRecord, event: Activity) -> None:
        """`refuse_dated_ahead`, judged by the record's timestamp where a producer cannot
        push it ahead (`reference_time`), so a replay of the topic refuses the same events."""
        received, received_as = reference_time(
            record.timestamp, record.timestamp_type, datetime.now(UTC)
        )
        limit = self.settings.activity_max_ahead_seconds
        refuse_dated_ahead(event.occurred_at, received, limit, received_as)

    async def handle(
        self, conn: asyncpg.Connection, records: Sequence[ConsumerRecord], work: BatchWork
    ) -> None:
        # One tiny query per batch: a version published (committed) before this batch
        # started is in force for it, whatever the watcher's poll interval.
        async with self._book_lock:
            await self._reload(conn)
        good = validate_records(
            records, parse_activity, work, self.consumer_name, self.settings.topics.dlq,
            self._dated_ahead,
        )  # fmt: skip
        self._count_misrouted(good, work)
        first, recorded, reused = await reused_ids.sort_out(conn, good)
        if not first:
            return
        for (record, event), first_at in reused:
            exc = reused_ids.refusal(event.event_id, first_at)
            refuse_record(record, exc, work, self.consumer_name, self.settings.topics.dlq)
        fresh = [(r, e) for i, (r, e) in first.items() if i not in recorded]
        if not fresh:
            return
        await conn.copy_records_to_table(
            "rules_activity",
            records=[
                (e.event_id, e.member_id, e.type, e.occurred_at, r.topic, r.partition, r.offset,
                 r.value)
                for r, e in fresh
            ],
            columns=ACTIVITY_COLUMNS,
        )  # fmt: skip
        members = sorted({e.member_id for _, e in fresh})
        states: dict[str, MemberState] = {}
        referrers: dict[str, str | None] = {}
        since: dict[str, datetime | None] = {}
        due: dict[str, datetime | None] = {}  # the tier sweep's (tier_sweeper.py)
        for r in await self._lock_states(conn, members):
            states[r["member_id"]] = load_state(r["state"])
            referrers[r["member_id"]] = r["referrer_id"]
            since[r["member_id"]] = r["referrer_since"]
            due[r["member_id"]] = r["tier_due_at"]
        # The referrers' own referrers (two hops at most), under their locks: see
        # `referral_chain` for why, and why this order cannot deadlock.
        await chain.lock(conn, chain.members_to_lock((e for _, e in fresh), referrers))
        await self._load_referrer_chain(
            conn, referrers, since, chain.named_referrers(e for _, e in fresh)
        )
        work_chain = chain.ChainWork()
        grants: list[GrantEvent] = []
        held: list[tuple[ConsumerRecord, HeldEvent]] = []
        touched: set[str] = set()
        partition: dict[str, int] = {}  # where each member's activity arrives (tier sweep)
        book = self.book
        assert book is not None  # `_reload` loads one or raises
        for record, event in fresh:
            event = with_shared_tz(event)  # compared with every stored time of the member
            member = event.member_id
            state = states.get(member) or MemberState(member_id=member)
            refs = chain.as_of(referrers, since, state, event)
            ruleset = book.at(event.occurred_at)
            result = evaluate(state, event, ruleset, refs, book.tiers_at)
            new = states[member] = result.state
            due[member] = due_after(result, ruleset, due.get(member))
            referrers[member] = new.referrer_id
            if state.referrer_id is None and new.referrer_id is not None:
                since[member] = event.occurred_at
            work_chain.observe(state, new, event, book, result.grants)
            touched.add(member)
            partition[member] = record.partition
            grants.extend(result.grants)
            held.extend((record, h) for h in result.held)
        grants.extend(await work_chain.apply(conn, book, referrers))
        if held:
            # Kept for ops review (`ledgerctl rules held ...`) in the same transaction.
            await conn.execute(
                INSERT_HELD,
                [h.event.event_id for _, h in held],
                [h.event.member_id for _, h in held],
                [h.event.type for _, h in held],
                [h.event.occurred_at for _, h in held],
                [r.value for r, _ in held],
                [h.reason for _, h in held],
            )
            log.warning("engagement_held", events=len(held))
        ordered = sorted(touched)
        await conn.execute(
            UPSERT_STATES,
            ordered,
            [states[m].referrer_id for m in ordered],
            [since.get(m) for m in ordered],
            [dump_state(states[m]).decode() for m in ordered],
            [states[m].tier_valid_until for m in ordered],
            [due[m] for m in ordered],
            [partition[m] for m in ordered],
        )
        topic = self.settings.topics.grants
        work.outbox.extend(OutboxRow(topic, g.member_id, grant_json(g)) for g in grants)

    def _count_misrouted(
        self, good: Sequence[tuple[ConsumerRecord, Activity]], work: BatchWork
    ) -> None:
        """Counted, not dead-lettered: the key is the producer's error, and the events are
        still paid right. One warning a batch, so a wrong producer does not flood the log."""
        wrong = [(r, e) for r, e in good if r.key != e.member_id.encode()]
        if not wrong:
            return
        work.counts.append((self._key_mismatch, len(wrong)))
        record, event = wrong[0]
        log.warning("activity_key_mismatch", consumer=self.consumer_name, records=len(wrong),
                    event_id=event.event_id, member_id=event.member_id,
                    partition=record.partition, offset=record.offset)  # fmt: skip

    async def _lock_states(
        self, conn: asyncpg.Connection, members: list[str]
    ) -> list[asyncpg.Record]:
        """The stored rows of `members` (sorted), each locked by this transaction, those
        of members new to it included (`INSERT_NEW`).

        Rows are locked in member order within each statement, not across them (the stored
        ones, then the new, then those another transaction created meanwhile), so two
        batches sharing two members, one created between their reads, can deadlock:
        Postgres ends one and the consumer retries it (a TRANSIENT error). It takes a
        member's events on several partitions, which the contract rules out. The referral
        chain's advisory locks come after all of these in every batch, so they add no
        cycle: a batch waiting here holds none of them, and past them it takes no row of
        rules_member_state that it does not hold already."""
        rows = list(await conn.fetch(SELECT_STATES, members))
        if len(rows) == len(members):
            return rows
        stored = {r["member_id"] for r in rows}
        new = [m for m in members if m not in stored]
        created = {r["member_id"] for r in await conn.fetch(INSERT_NEW, new)}
        if raced := [m for m in new if m not in created]:
            rows += await conn.fetch(SELECT_STATES, raced)
        return rows

    async def _load_referrer_chain(
        self,
        conn: asyncpg.Connection,
        referrers: dict[str, str | None],
        since: dict[str, datetime | None],
        named: Iterable[str],
    ) -> None:
        """Referrers' own referrers, for the indirect referral bonus (two hops at most):
        of the referrers already known and of those the batch's own sign-ups name."""
        wanted = {r for r in (*referrers.values(), *named) if r and r not in referrers}
        if wanted:
            for row in await conn.fetch(chain.SELECT_CHAIN, sorted(wanted)):
                referrers[row["member_id"]] = row["referrer_id"]
                since[row["member_id"]] = row["referrer_since"]


def caught_up(consumer: BatchConsumer, slack: int) -> bool:
    """Every partition this instance owns is applied to within `slack` records of the
    broker's end (none owned, or an end not known yet: no). Not exactly zero: under steady
    traffic some partition nearly always has a batch in flight, and those records are
    minutes old, not from before an expiry an hour past; a replay or a backlog is far
    more than a batch behind."""
    try:
        lag = consumer.lag()
    except AssertionError:  # aiokafka, mid-rebalance: "Partition is not assigned"
        return False
    return bool(lag) and len(lag) == len(consumer.assigned) and max(lag.values()) <= slack


def create_app(settings: Settings | None = None) -> FastStream:
    settings = settings or load_settings()
    broker = create_broker(settings, SERVICE)
    app = FastStream(
        broker,
        logger=structlog.get_logger(),  # its start/stop lines as JSON too
        specification=AsyncAPI(
            title="loyalty rules", version="1", description="Activity in, point grants out."
        ),
    )
    consumer_name = settings.consumer_prefix + "rules"
    consumer = BatchConsumer(
        name=consumer_name,
        group_id=settings.group_prefix + "rules",
        service=SERVICE,
        topic=settings.topics.activity,
        dlq_topic=settings.topics.dlq,
        refusals=(DATED_AHEAD, reused_ids.LABEL),
    )
    consumer.attach(
        broker,
        kafka=settings.kafka,
        max_batch=settings.max_batch,
        batch_wait_ms=settings.batch_wait_ms,
        fetch_wait_ms=settings.fetch_wait_ms,
        session_timeout_ms=settings.session_timeout_ms,
    )
    register_lag([consumer])
    processor = RulesProcessor(settings, consumer_name)
    background = Background()
    resources: dict[str, Any] = {}

    @app.on_startup
    async def startup() -> None:
        pool = await create_pool(settings)
        await processor.refresh_book(pool)
        producer = make_producer(settings.kafka, settings.metadata_max_age_ms)
        await start_client(producer, settings.kafka)
        relay = OutboxRelay(pool, producer, SERVICE, dlq_topic=settings.topics.dlq)
        consumer.bind(pool, processor.handle, relay.wake)
        resources.update(pool=pool, producer=producer)
        background.spawn("outbox-relay", relay.run)
        background.spawn("rulebook-watch", lambda: processor.watch_book(pool))
        sweeper = TierSweeper(
            pool,
            settings.topics.grants,
            lambda: processor.book,
            lambda: caught_up(consumer, settings.max_batch),
            lambda: sorted(tp.partition for tp in consumer.assigned),
            relay.wake,
            interval_s=settings.tier_sweep_seconds,
            grace_s=settings.tier_sweep_grace_seconds,
        )
        background.spawn("tier-sweep", sweeper.run)
        background.spawn(
            "planner-stats", lambda: keep_planner_stats(pool, settings.planner_stats_seconds)
        )
        start_metrics_server(settings.metrics_port)

    @app.on_shutdown
    async def stop_consuming() -> None:
        await consumer.stop()

    # After FastStream has stopped the broker, which lets the batch in flight commit:
    # closed before it (on_shutdown), the pool failed that batch's every retry until the
    # broker's 15 s grace ran out, and a busy service outlived `make down`'s wait.
    @app.after_shutdown
    async def close_resources() -> None:
        await background.stop()
        if "producer" in resources:
            await resources["producer"].stop()
        if "pool" in resources:
            await resources["pool"].close()

    return app
