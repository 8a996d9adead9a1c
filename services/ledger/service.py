"""The ledger process's moving parts: pool, grants consumer, outbox relay, expiry sweeper."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import Any

import asyncpg
import structlog
from aiokafka.errors import KafkaError
from faststream.kafka import KafkaBroker

from services.common.config import POOL_MIN_SIZE, Settings
from services.common.consumer import BatchConsumer, register_lag
from services.common.kafka_clients import start_client
from services.common.outbox import OutboxRelay, make_producer
from services.common.planner_stats import keep_planner_stats
from services.common.runtime import Background, create_broker, create_pool
from services.ledger import projector
from services.ledger.rulebook import LedgerRules
from services.ledger.sweeper import ExpirySweeper

SERVICE = "ledger"
log = structlog.get_logger()


class LedgerService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.broker: KafkaBroker = create_broker(settings, SERVICE)
        self.consumer = BatchConsumer(
            name=settings.consumer_prefix + "ledger",
            group_id=settings.group_prefix + "ledger",
            service=SERVICE,
            topic=settings.topics.grants,
            dlq_topic=settings.topics.dlq,
        )
        self.consumer.attach(
            self.broker,
            kafka=settings.kafka,
            max_batch=settings.max_batch,
            batch_wait_ms=settings.batch_wait_ms,
            fetch_wait_ms=settings.fetch_wait_ms,
            session_timeout_ms=settings.session_timeout_ms,
        )
        self._background = Background()
        self._pool: asyncpg.Pool | None = None
        self._producer: Any = None
        self.relay: OutboxRelay | None = None
        self.sweeper: ExpirySweeper | None = None
        self.rules = LedgerRules()
        # Whether the process was asked to stop: the wait for Postgres at start ends then
        # (`__main__` hands it uvicorn's flag).
        self.stopping: Callable[[], bool] = lambda: False

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("ledger service not started")
        return self._pool

    async def start(self) -> None:
        self._pool = await create_pool(
            self.settings, min_size=POOL_MIN_SIZE, stopping=self.stopping
        )
        self._producer = make_producer(self.settings.kafka, self.settings.metadata_max_age_ms)
        await start_client(self._producer, self.settings.kafka)
        self.relay = OutboxRelay(
            self._pool, self._producer, SERVICE, dlq_topic=self.settings.topics.dlq
        )
        self.consumer.bind(
            self._pool,
            projector.make_handler(self.settings, self.consumer.name, self.rules),
            self.relay.wake,
        )
        register_lag([self.consumer])
        await self.broker.start()
        self._background.spawn("outbox-relay", self.relay.run)
        self.sweeper = ExpirySweeper(
            self._pool,
            self.settings.topics.ledger,
            self.settings.expiry_sweep_seconds,
            self.relay.wake,
            grace_s=self.settings.expiry_grace_seconds,
        )
        self._background.spawn("expiry-sweeper", self.sweeper.run)
        pool = self._pool
        self._background.spawn(
            "planner-stats", lambda: keep_planner_stats(pool, self.settings.planner_stats_seconds)
        )

    async def stop(self) -> None:
        await self.consumer.stop()
        await self.broker.stop()
        await self._background.stop()
        if self._producer is not None:
            await self._producer.stop()
        if self._pool is not None:
            await self._pool.close()

    def wake_relay(self) -> None:
        """After a commit that wrote outbox rows, so the events leave within milliseconds."""
        if self.relay is not None:
            self.relay.wake()

    async def readiness(self) -> dict[str, bool]:
        db = False
        if self._pool is not None:
            try:
                async with self._pool.acquire(timeout=2) as conn:
                    db = await conn.fetchval("SELECT true")
            except (OSError, asyncpg.PostgresError, TimeoutError):
                db = False
        return {
            "database": bool(db),
            "broker": await self._broker_reachable(),
            "consumer_assigned": bool(self.consumer.assigned),
        }

    async def _broker_reachable(self) -> bool:
        """A metadata round trip to the brokers (the consumer's assignment alone outlives
        a broker outage): what the relay needs to publish and the consumer to fetch."""
        if self._producer is None:
            return False
        try:
            await asyncio.wait_for(self._producer.client.fetch_all_metadata(), timeout=2)
        except (KafkaError, OSError, TimeoutError):
            return False
        return True

    async def member_as_of(
        self, conn: asyncpg.Connection, member_id: str, at: datetime
    ) -> dict[str, Any] | None:
        return await projector.member_as_of(conn, member_id, at)
