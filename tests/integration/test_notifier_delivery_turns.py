"""Webhook delivery's turns (services/notifier/delivery.py): a receiver that never
finishes its answer is cut off at the post's deadline; a retry's back-off counts from the
failed attempt."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from services.common.config import Settings
from services.notifier.app import make_handler
from services.notifier.delivery import POST_TIMEOUT_S, Deliverer
from tests.integration import direct
from tests.integration.direct import consumer_of, migrated_pool, webhook

pytestmark = pytest.mark.integration
TOPIC = "loyalty.ledger.v1"
DUE_NOW = ("UPDATE notifications SET next_attempt_at = now()"
           " WHERE status = 'pending' AND next_attempt_at > now()")  # fmt: skip


class Receiver:
    """Answers 204 at once unless told otherwise; logs what it accepted, and when."""

    def __init__(self) -> None:
        self.accepted: list[tuple[str, float]] = []  # (notification id, when)
        self.refused_at: dict[str, float] = {}
        self.refuse: set[str] = set()  # 503 to these, every time
        self.slow: dict[str, float] = {}  # member -> seconds before the answer
        self.trickle: set[str] = set()  # 200 at once, then a byte a second, never ending
        self.flaky: random.Random | None = None  # 503 to a quarter of all posts
        self.in_flight: set[str] = set()  # members being posted to
        self.overlaps: list[str] = []  # a member posted to while a post of theirs was open

    async def hook(self, request: Request) -> Response:
        body = json.loads(await request.body())
        nid, member = body["notification_id"], body["member_id"]
        if nid in self.trickle:
            return StreamingResponse(_trickle(), status_code=200)
        if member in self.in_flight:
            self.overlaps.append(nid)
        self.in_flight.add(member)
        try:
            await asyncio.sleep(self.slow.get(member, 0.0))
        finally:
            self.in_flight.discard(member)
        if nid in self.refuse or (self.flaky is not None and self.flaky.random() < 0.25):
            self.refused_at[nid] = time.time()
            return Response(status_code=503)
        self.accepted.append((nid, time.time()))
        return Response(status_code=204)

    def ids(self, prefix: str = "") -> list[str]:
        return [nid for nid, _ in self.accepted if nid.startswith(prefix)]


async def _trickle() -> AsyncIterator[bytes]:
    while True:
        yield b"x"
        await asyncio.sleep(1.0)  # well within httpx's 10 s between reads


@pytest.fixture
async def env(fresh_database: str) -> AsyncIterator[tuple[asyncpg.Pool, Any, Receiver, str]]:
    rec = Receiver()
    async with migrated_pool(fresh_database, max_size=6) as pool, webhook(rec.hook) as url:
        settings = Settings(database_url=fresh_database, bootstrap_servers="", webhook_url=url,
                            webhook_secret="s")  # fmt: skip
        yield (
            pool,
            consumer_of(pool, "notifier", TOPIC, make_handler(settings, "notifier")),
            rec,
            url,
        )


def earned(eid: str, member: str, balance: int = 10) -> dict[str, Any]:
    return {"event_id": eid, "type": "points_earned", "schema_version": 1,
            "occurred_at": "2026-03-01T10:00:00+08:00", "member_id": member,
            "data": {"points": 10, "balance_after": balance, "rule_id": "base"}}  # fmt: skip


async def record(consumer: Any, *events: dict[str, Any]) -> None:
    await consumer.process(direct.records(TOPIC, *events))


async def open_transactions(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND state LIKE 'idle in transaction%'"
    ))  # fmt: skip


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_a_receiver_that_trickles_its_answer_is_cut_off_at_the_posts_deadline(
    env: Any,
) -> None:
    # httpx's timeout bounds each read: a byte a second kept the post, its round and the
    # round's transaction open for good.
    pool, consumer, rec, url = env
    rec.trickle.add("t-1")
    await record(consumer, earned("t-1", "m-t"))
    async with httpx.AsyncClient(timeout=10.0) as client:
        async with asyncio.timeout(POST_TIMEOUT_S + 5):
            assert await Deliverer(pool, url, "s").deliver_once(client) == 1
    row = await pool.fetchrow("SELECT status, attempts, last_error"
                              " FROM notifications WHERE notification_id = 't-1'")  # fmt: skip
    assert (row["status"], row["attempts"]) == ("pending", 1)
    assert row["last_error"].startswith("timeout")


async def test_a_retry_is_due_its_back_off_after_the_failed_attempt_not_after_the_round(
    env: Any,
) -> None:
    # The back-off was counted from when the round wrote its outcomes: after its slowest
    # post, 3 s here, so the first retry came 5 s after the refusal instead of 2.
    pool, consumer, rec, url = env
    await record(consumer, earned("r-fast", "m-fast"), earned("r-slow", "m-slow"))
    rec.refuse.add("r-fast")
    rec.slow["m-slow"] = 3.0
    async with httpx.AsyncClient(timeout=10.0) as client:
        await Deliverer(pool, url, "s").deliver_once(client)
    due = await pool.fetchval("SELECT extract(epoch FROM next_attempt_at) FROM notifications"
                              " WHERE notification_id = 'r-fast'")  # fmt: skip
    assert 1.5 < float(due) - rec.refused_at["r-fast"] < 2.5  # the first back-off, 2 s
