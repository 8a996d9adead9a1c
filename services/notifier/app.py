"""Notifier: ledger events in, one recorded zh-CN notification each, delivered by webhook."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Final
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import asyncpg
import orjson
import structlog
from aiokafka.structs import ConsumerRecord
from faststream import FastStream
from faststream.specification import AsyncAPI

from schemas.ledger import LEDGER_TYPES, LedgerEvent, parse_ledger_event
from services.common.config import ConfigError, Settings, load_settings, redacted
from services.common.consumer import BatchConsumer, BatchWork, register_lag, validate_records
from services.common.kafka_clients import start_client
from services.common.outbox import OutboxRelay, make_producer
from services.common.planner_stats import keep_planner_stats
from services.common.runtime import Background, create_broker, create_pool, start_metrics_server
from services.ledger.rulebook import LedgerRules
from services.notifier.delivery import DELIVERED, Deliverer, hold_behind_retries
from services.notifier.render import render, skip_reason
from services.rules.ruleset import RuleBook

SERVICE: Final = "notifier"
log = structlog.get_logger()

# A redelivered event is already recorded: those ids are skipped, the rest COPYed in (why
# that is safe: services/common/consumer.py; bench/experiments/dedupe_writes.py: 8.9 -> 6.6
# us of Postgres backend CPU per notification against INSERT ... unnest ... ON CONFLICT).
SELECT_RECORDED: Final = (
    "SELECT notification_id FROM notifications WHERE notification_id = ANY($1::text[])"
)
COLUMNS: Final = ["notification_id", "member_id", "kind", "message", "payload", "status"]


KNOWN_TYPES: Final = frozenset(t.model_fields["type"].default for t in LEDGER_TYPES)


def parse_or_skip(raw: bytes) -> LedgerEvent | None:
    """The ledger event, or None for a type this notifier does not know (tolerant reader).

    A newer ledger may publish a kind of event an older notifier has no message for: that
    is not bad input, so it is skipped and counted (`outcome="unknown_type"`) instead of
    dead-lettered. An event of a known type that fails its model still raises (DLQ).
    """
    try:
        return parse_ledger_event(raw)
    except ValueError:  # pydantic's ValidationError
        try:
            kind = orjson.loads(raw).get("type")
        except (orjson.JSONDecodeError, AttributeError):  # not a JSON object
            kind = None
        if isinstance(kind, str) and kind and kind not in KNOWN_TYPES:
            return None
        raise  # the validation error, to the DLQ


def zone_of(event: LedgerEvent, rules: LedgerRules, book: RuleBook) -> ZoneInfo:
    """The calendar a message dates the event on: the one the ledger counted its lot's
    months on, read from the same published book (`rules` refreshed for `book`). Its
    version's zone, the default zone for a version the book does not hold (as the ledger
    does); an event without one (a warning for a manual adjustment's lot) takes the
    version in force at its time, as the adjustment's lot took the one in force then."""
    version = event.data.ruleset_version
    return book.at(event.occurred_at).zone if version is None else rules.zone(version)


def make_handler(  # type: ignore[no-untyped-def]
    settings: Settings, consumer_name: str, rules: LedgerRules | None = None
):
    # Dates are printed on the rule set's calendar: the ledger's cache of the book (one
    # stamp query a batch, the book re-read only when a version was published).
    rules = rules or LedgerRules()
    # With no webhook there is nothing to deliver: record each notification as `skipped`
    # at once, rather than as `pending` for the deliverer to select and update again
    # (those two statements were a third of Postgres's time in the benchmark).
    status = "pending" if settings.webhook_url else "skipped"

    async def handle(
        conn: asyncpg.Connection, records: Sequence[ConsumerRecord], work: BatchWork
    ) -> None:
        good = validate_records(records, parse_or_skip, work, consumer_name, settings.topics.dlq)
        rows: dict[str, tuple[str, str, str, str, object, str]] = {}
        now = datetime.now(UTC)
        book: RuleBook | None = None
        outcomes: Counter[str] = Counter()  # counted once the batch commits (`BatchWork`)
        for record, event in good:
            if event is None:
                outcomes["unknown_type"] += 1
                log.info("ledger_event_type_unknown", partition=record.partition,
                         offset=record.offset)  # fmt: skip
                continue
            reason = skip_reason(event, now)
            if reason is not None:
                # Not bad input (no DLQ): an event members are better not told about.
                outcomes[reason] += 1
                log.info("notification_skipped", event_id=event.event_id,
                         member_id=event.member_id, reason=reason)  # fmt: skip
                continue
            if book is None:
                book = await rules.refresh(conn)
            message = render(event, now, zone_of(event, rules, book))
            if message is not None and event.event_id not in rows:
                # The event as the ledger published it, which just passed the contract
                # model (fields a newer ledger added are kept, as published). The json
                # codec (orjson.dumps) writes a Fragment's JSON text verbatim, so nothing
                # is serialized again here.
                payload = orjson.Fragment(record.value)
                rows[event.event_id] = (
                    event.event_id, event.member_id, event.type, message, payload, status
                )  # fmt: skip
        if rows:
            for r in await conn.fetch(SELECT_RECORDED, list(rows)):
                del rows[r["notification_id"]]
        if rows:
            await conn.copy_records_to_table(
                "notifications", records=list(rows.values()), columns=COLUMNS
            )
            if status == "pending":
                # Behind their member's retry, if one waits (services/notifier/delivery.py).
                await hold_behind_retries(conn, sorted({r[1] for r in rows.values()}), list(rows))
                work.wake = True  # the deliverer, once they are committed (`consumer.bind`)
            else:
                outcomes["skipped"] += len(rows)
        work.counts.extend((DELIVERED.labels(o), n) for o, n in outcomes.items())

    return handle


def check_webhook(url: str) -> None:
    """Refuses a webhook URL no post can reach (`htps://…`, no host): taken, it failed
    every post, each retried until given up, while the notifier looked healthy."""
    try:
        parts = urlsplit(url)
        usable = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 - raises for a port that is no number or out of range
    except ValueError:
        usable = False
    if not usable:
        # Shown without its query, where a receiver may take a token, and password.
        shown = redacted(url.split("?", 1)[0].split("#", 1)[0])
        raise ConfigError(
            f"NOTIFIER_WEBHOOK_URL={shown}: must be an http:// or https:// URL with a host"
        )


def create_app(settings: Settings | None = None) -> FastStream:
    settings = settings or load_settings()
    if settings.webhook_url:
        check_webhook(settings.webhook_url)
    if settings.webhook_url and not settings.webhook_secret:
        # An unsigned post would let anyone who can reach the receiver send members
        # messages in the clinic's name: refuse to start rather than send one.
        raise ConfigError(
            "NOTIFIER_WEBHOOK_SECRET must be set when NOTIFIER_WEBHOOK_URL is"
            " (posts are signed with it)"
        )
    broker = create_broker(settings, SERVICE)
    app = FastStream(
        broker,
        logger=structlog.get_logger(),  # its start/stop lines as JSON too
        specification=AsyncAPI(title="loyalty notifier", version="1", description=__doc__),
    )
    state: dict[str, object] = {}
    background = Background()
    consumer_name = settings.consumer_prefix + "notifier"

    consumer = BatchConsumer(
        name=consumer_name,
        group_id=settings.group_prefix + "notifier",
        service=SERVICE,
        topic=settings.topics.ledger,
        dlq_topic=settings.topics.dlq,
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

    @app.on_startup
    async def startup() -> None:
        pool = await create_pool(settings)
        producer = make_producer(settings.kafka, settings.metadata_max_age_ms)
        await start_client(producer, settings.kafka)
        relay = OutboxRelay(pool, producer, SERVICE, dlq_topic=settings.topics.dlq)
        deliverer = Deliverer(pool, settings.webhook_url, settings.webhook_secret,
                              give_up_s=settings.notifier_give_up_hours * 3600)  # fmt: skip

        def committed() -> None:
            relay.wake()  # dead letters
            deliverer.wake()  # new pending notifications

        consumer.bind(pool, make_handler(settings, consumer_name), committed)
        state.update(pool=pool, producer=producer)
        background.spawn("outbox-relay", relay.run)
        background.spawn("webhook-delivery", deliverer.run)
        background.spawn(
            "planner-stats", lambda: keep_planner_stats(pool, settings.planner_stats_seconds)
        )
        start_metrics_server(settings.metrics_port)

    @app.on_shutdown
    async def stop_consuming() -> None:
        await consumer.stop()

    # After the broker, which lets the batch in flight commit (services/rules/app.py).
    @app.after_shutdown
    async def close_resources() -> None:
        await background.stop()
        producer = state.get("producer")
        if producer is not None:
            await producer.stop()  # type: ignore[attr-defined]
        pool = state.get("pool")
        if pool is not None:
            await pool.close()  # type: ignore[attr-defined]

    return app
