"""A webhook outage leaves every member a backlog behind their first notification's retry:
the rounds that find nothing due must read nothing, however long the backlogs, and the
backlogs still go out in each member's order once the webhook is back."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from starlette.requests import Request
from starlette.responses import Response

from services.common.config import Settings
from services.notifier.app import make_handler
from services.notifier.delivery import _CANDIDATES, DELIVERY_BATCH, Deliverer
from tests.integration import direct
from tests.integration.direct import consumer_of, migrated_pool, webhook

pytestmark = pytest.mark.integration
TOPIC = "loyalty.ledger.v1"
MEMBERS, PER_MEMBER = 300, 10


class Receiver:
    def __init__(self) -> None:
        self.up = False
        self.received: list[dict[str, Any]] = []

    async def hook(self, request: Request) -> Response:
        if not self.up:
            return Response(status_code=503)
        self.received.append(json.loads(await request.body()))
        return Response(status_code=204)


@pytest.fixture
async def env(fresh_database: str) -> AsyncIterator[tuple[asyncpg.Pool, Any, Deliverer, Receiver]]:
    rec = Receiver()
    async with migrated_pool(fresh_database, max_size=4) as pool, webhook(rec.hook) as url:
        settings = Settings(database_url=fresh_database, bootstrap_servers="", webhook_url=url,
                            webhook_secret="s")  # fmt: skip
        consumer = consumer_of(pool, "notifier", TOPIC, make_handler(settings, "notifier"))
        yield pool, consumer, Deliverer(pool, url, "s"), rec


def earned(eid: str, member: str) -> dict[str, Any]:
    return {"event_id": eid, "type": "points_earned", "schema_version": 1,
            "occurred_at": "2026-03-01T10:00:00+08:00", "member_id": member,
            "data": {"points": 1, "balance_after": 1, "rule_id": "base"}}  # fmt: skip


async def rows_read_by_the_candidate_query(pool: asyncpg.Pool) -> int:
    """Rows the round's candidate query takes from the due index (EXPLAIN ANALYZE)."""
    sql = _CANDIDATES.replace("$1", str(DELIVERY_BATCH))
    async with pool.acquire() as conn:
        plan = await conn.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + sql)

    def scans(node: dict[str, Any]) -> list[dict[str, Any]]:
        found = [node] if node.get("Index Name") == "notifications_pending" else []
        for child in node.get("Plans", []):
            found += scans(child)
        return found

    doc = orjson.loads(plan) if isinstance(plan, str) else plan  # the pool's json codec
    (outer, *_) = scans(doc[0]["Plan"])  # the first: the candidates' own
    return int(outer["Actual Rows"]) + int(outer.get("Rows Removed by Filter", 0))


async def test_an_outage_backlog_is_not_read_by_rounds_with_nothing_due(env: Any) -> None:
    pool, consumer, deliverer, rec = env
    # Recorded over the outage in ledger order, members interleaved, all pending; the
    # outage has lasted (attempts 8: the next back-off is the longest, 300 s).
    await pool.execute(
        "INSERT INTO notifications (notification_id, member_id, kind, message, payload,"
        "                           attempts)"
        " SELECT 'n-' || m || '-' || lpad(k::text, 2, '0'), 'm-' || m, 'points_earned', 'x',"
        "        '{}', 8 FROM generate_series(1, $2) AS k, generate_series(1, $1) AS m"
        " ORDER BY k, m",
        MEMBERS, PER_MEMBER,
    )  # fmt: skip
    async with httpx.AsyncClient(timeout=10.0) as client:
        for _ in range(2 * MEMBERS // DELIVERY_BATCH):  # each member's first one is refused
            if not await deliverer.deliver_once(client):
                break
    assert await pool.fetchval("SELECT count(*) FROM notifications WHERE attempts > 8") == MEMBERS
    # Every member's backlog waits behind a back-off: none of it is due, so the next round
    # reads nothing (it read all 2,700 waiting rows, and discarded each, every round).
    due = "SELECT count(*) FROM notifications WHERE status = 'pending' AND next_attempt_at <= now()"
    assert await pool.fetchval(due) == 0
    await pool.execute("ANALYZE notifications")
    assert await rows_read_by_the_candidate_query(pool) == 0

    # One more for a waiting member, recorded during the outage, waits with the others.
    await consumer.process(direct.records(TOPIC, earned("n-1-new", "m-1")))
    assert await pool.fetchval(due) == 0
    assert await rows_read_by_the_candidate_query(pool) == 0

    # The webhook is back and the back-offs are over: each member's in their order.
    rec.up = True
    await pool.execute("UPDATE notifications SET next_attempt_at = next_attempt_at"
                       " - interval '1 hour' WHERE status = 'pending'")  # fmt: skip
    async with httpx.AsyncClient(timeout=10.0) as client:
        while await deliverer.deliver_once(client):
            pass
    assert len(rec.received) == MEMBERS * PER_MEMBER + 1
    got: dict[str, list[str]] = {}
    for body in rec.received:
        got.setdefault(body["member_id"], []).append(body["notification_id"])
    assert all(ids == sorted(ids) for ids in got.values())
    assert got["m-1"][-1] == "n-1-new"


async def test_a_member_whose_retry_is_given_up_goes_on_at_once(env: Any) -> None:
    # Its later ones were made to wait with the retries; the one given up leaves them due.
    pool, consumer, deliverer, rec = env
    await consumer.process(direct.records(TOPIC, earned("g-1", "m-g"), earned("g-2", "m-g")))
    async with httpx.AsyncClient(timeout=10.0) as client:
        await deliverer.deliver_once(client)  # g-1 refused: g-2 waits with it
        wait = "SELECT next_attempt_at > now() FROM notifications WHERE notification_id = 'g-2'"
        assert await pool.fetchval(wait)
        await pool.execute("UPDATE notifications SET next_attempt_at = now(),"
                           " created_at = now() - interval '25 hours'")  # fmt: skip
        await deliverer.deliver_once(client)  # refused again, and given up
        assert (
            await pool.fetchval("SELECT status FROM notifications WHERE notification_id = 'g-1'")
            == "failed"
        )
        rec.up = True
        await deliverer.deliver_once(client)
    assert [b["notification_id"] for b in rec.received] == ["g-2"]
