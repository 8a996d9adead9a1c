"""Driving a service's batch handler on a real Postgres without a broker, for the cases
that need exact control over what arrives in which batch (ordering, concurrency), and a
local webhook receiver for the notifier's deliveries."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import orjson
import uvicorn
from aiokafka.structs import ConsumerRecord
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from services.common.consumer import BatchConsumer
from services.common.migrations import apply_migrations
from services.common.runtime import init_connection
from tests.integration.harness import free_port, wait_until

_offsets = itertools.count()


def records(topic: str, *events: dict[str, Any]) -> list[ConsumerRecord]:
    """Consumer records of `events` keyed by member, as the broker would hand them over;
    an event's `_raw` (popped) is sent instead of its JSON, for bytes no model writes."""
    out = []
    for e in events:
        value = e.pop("_raw", None) or orjson.dumps(e)
        out.append(ConsumerRecord(topic, 0, next(_offsets), 0, 0, e["member_id"].encode(),
                                  value, None, 0, len(value), []))  # fmt: skip
    return out


@asynccontextmanager
async def migrated_pool(dsn: str, max_size: int = 6) -> AsyncIterator[asyncpg.Pool]:
    """A pool like the services' (their codecs) on a freshly migrated database."""
    await asyncio.to_thread(apply_migrations, dsn)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=max_size, init=init_connection)
    assert pool is not None
    try:
        yield pool
    finally:
        await pool.close()


def consumer_of(pool: asyncpg.Pool, name: str, topic: str, handler: Any) -> BatchConsumer:
    """`handler` bound as the service binds it: `consumer.process(records(...))` runs a batch."""
    consumer = BatchConsumer(name=name, service=name, topic=topic, dlq_topic="loyalty.dlq.v1")
    consumer.bind(pool, handler)
    return consumer


@asynccontextmanager
async def webhook(hook: Callable[[Request], Awaitable[Response]]) -> AsyncIterator[str]:
    """A local HTTP endpoint answering POSTs with `hook`; yields its URL."""
    port = free_port()
    app = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
    task = asyncio.create_task(server.serve())
    await wait_until(lambda: asyncio.sleep(0, server.started), what="webhook receiver")
    try:
        yield f"http://127.0.0.1:{port}/hook"
    finally:
        server.should_exit = True
        await task
