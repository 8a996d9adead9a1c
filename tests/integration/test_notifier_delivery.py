"""Webhook delivery (services/notifier/delivery.py) with the notifier's real handler and
Deliverer on real Postgres and a local webhook receiver: each member's notifications
arrive in the ledger's order even when one of them needs a retry, and one notification
that cannot be sent never holds up anyone else's."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from aiokafka.structs import ConsumerRecord
from starlette.requests import Request
from starlette.responses import Response

from services.common.config import Settings
from services.common.consumer import BatchConsumer
from services.notifier.app import make_handler
from services.notifier.delivery import DELIVERED, Deliverer, Failure
from tests.integration import direct
from tests.integration.direct import consumer_of, migrated_pool, webhook

pytestmark = pytest.mark.integration
TOPIC = "loyalty.ledger.v1"


class Receiver:
    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.fail_once: set[str] = set()

    async def hook(self, request: Request) -> Response:
        body = json.loads(await request.body())
        if body["notification_id"] in self.fail_once:
            self.fail_once.discard(body["notification_id"])
            return Response(status_code=503)
        self.received.append(body)
        return Response(status_code=204)


@pytest.fixture
async def env(
    fresh_database: str,
) -> AsyncIterator[tuple[asyncpg.Pool, BatchConsumer, Deliverer, Receiver]]:
    rec = Receiver()
    async with migrated_pool(fresh_database, max_size=4) as pool, webhook(rec.hook) as url:
        settings = Settings(database_url=fresh_database, bootstrap_servers="", webhook_url=url,
                            webhook_secret="s")  # fmt: skip
        deliverer = Deliverer(pool, url, "s")
        handler = make_handler(settings, "notifier")
        yield pool, consumer_of(pool, "notifier", TOPIC, handler), deliverer, rec


def records(*events: dict[str, Any]) -> list[ConsumerRecord]:
    return direct.records(TOPIC, *events)


def earned(eid: str, member: str, points: int, balance: int, at: str) -> dict[str, Any]:
    return {"event_id": eid, "type": "points_earned", "schema_version": 1, "occurred_at": at,
            "member_id": member, "data": {"points": points, "balance_after": balance,
                                          "rule_id": "base"}}  # fmt: skip


def expiring(eid: str, member: str, points: int, expires_at: datetime) -> dict[str, Any]:
    return {"event_id": eid, "type": "points_expiring", "schema_version": 1,
            "occurred_at": datetime.now(UTC).isoformat(), "member_id": member,
            "data": {"points": points, "balance_after": points,
                     "expires_at": expires_at.isoformat()}}  # fmt: skip


async def _drain(pool: asyncpg.Pool, deliverer: Deliverer, rounds: int = 5) -> None:
    async with httpx.AsyncClient(timeout=10.0) as client:
        for _ in range(rounds):
            await deliverer.deliver_once(client)
            # make every back-off due now (what time passing would do)
            await pool.execute("UPDATE notifications SET next_attempt_at = now()"
                               " WHERE status = 'pending'")  # fmt: skip


async def test_one_members_notifications_reach_the_webhook_in_ledger_order(env: Any) -> None:
    pool, consumer, deliverer, rec = env
    e1 = earned("e-1", "m-1", 100, 100, "2026-03-01T10:00:00+08:00")
    e2 = earned("e-2", "m-1", 200, 300, "2026-03-01T10:05:00+08:00")
    e3 = earned("e-3", "m-1", 50, 350, "2026-03-01T10:10:00+08:00")
    other = earned("e-4", "m-2", 10, 10, "2026-03-01T10:06:00+08:00")
    await consumer.process(records(e1, e2, other, e3))
    rec.fail_once.add("e-1")  # one transient 503 on the member's first message
    async with httpx.AsyncClient(timeout=10.0) as client:
        await deliverer.deliver_once(client)
        # The first failed: the member's later ones wait behind it; others go on.
        assert [b["notification_id"] for b in rec.received] == ["e-4"]
        await deliverer.deliver_once(client)
        assert [b["notification_id"] for b in rec.received] == ["e-4"]
        await _drain(pool, deliverer)
    got = [b["notification_id"] for b in rec.received if b["member_id"] == "m-1"]
    # The member's last message shows the latest balance (350), not 100.
    assert got == ["e-1", "e-2", "e-3"]
    left = "SELECT count(*) FROM notifications WHERE status <> 'delivered'"
    assert await pool.fetchval(left) == 0


async def test_the_deliverer_is_woken_once_the_notifications_are_committed(env: Any) -> None:
    # Woken from inside the consumer's transaction, the deliverer could look before the
    # commit, find nothing and sleep out its poll (a second) with the notification waiting.
    pool, _, _, _ = env
    settings = Settings(database_url="", bootstrap_servers="", webhook_url="http://x/hook",
                        webhook_secret="s")  # fmt: skip
    wakes: list[int] = []
    handler = make_handler(settings, "notifier")
    woken_inside: list[int] = []

    async def spied(conn: asyncpg.Connection, recs: Any, work: Any) -> None:
        await handler(conn, recs, work)
        woken_inside.append(len(wakes))  # still inside the batch's transaction

    consumer = BatchConsumer(name="notifier", service="notifier", topic=TOPIC,
                             dlq_topic="loyalty.dlq.v1")  # fmt: skip
    consumer.bind(pool, spied, lambda: wakes.append(1))
    batch = [earned("w-1", "m-w", 10, 10, "2026-03-01T10:00:00+08:00")]
    await consumer.process(records(*batch))
    assert woken_inside == [0]
    assert wakes == [1]
    # A redelivered batch records nothing new: nothing to wake the deliverer for.
    await consumer.process(records(earned("w-1", "m-w", 10, 10, "2026-03-01T10:00:00+08:00")))
    assert wakes == [1]


async def test_a_member_taken_by_another_process_is_left_to_it(env: Any) -> None:
    pool, consumer, deliverer, rec = env
    await consumer.process(
        records(
            earned("e-5", "m-5", 10, 10, "2026-03-01T10:00:00+08:00"),
            earned("e-6", "m-6", 10, 10, "2026-03-01T10:00:00+08:00"),
        )
    )
    async with pool.acquire() as other, other.transaction():
        # Another notifier process is delivering to m-5 (its round's lock).
        await other.execute("SELECT pg_advisory_xact_lock(hashtextextended('notifier:m-5', 0))")
        async with httpx.AsyncClient(timeout=10.0) as client:
            await deliverer.deliver_once(client)
        assert [b["notification_id"] for b in rec.received] == ["e-6"]
    await _drain(pool, deliverer, rounds=1)
    assert sorted(b["notification_id"] for b in rec.received) == ["e-5", "e-6"]


async def test_one_undecodable_row_does_not_stop_every_other_delivery(env: Any) -> None:
    pool, consumer, deliverer, rec = env
    # A ledger event with an added field (CONTRACT: adding fields is fine) whose number
    # Postgres's json type and pydantic accept but orjson cannot decode: it is passed on
    # as published, and whatever happens to it, the other member's goes out.
    odd = earned("e-odd", "m-2", 10, 10, "2026-03-01T10:00:00+08:00")
    odd["_raw"] = orjson.dumps(odd)[:-1] + b',"score":1e400}'
    await consumer.process(records(odd))
    other = earned("e-ok", "m-3", 10, 10, "2026-03-01T10:01:00+08:00")
    await consumer.process(records(other))
    await _drain(pool, deliverer, rounds=1)
    assert sorted(b["notification_id"] for b in rec.received) == ["e-odd", "e-ok"]
    sent = next(b for b in rec.received if b["notification_id"] == "e-odd")
    assert sent["event"]["score"] == float("inf")  # the receiver's parser's business


async def test_a_notification_refused_for_too_long_is_given_up_and_frees_the_member(
    env: Any,
) -> None:
    pool, consumer, deliverer, rec = env
    old = earned("e-old", "m-7", 10, 10, "2026-03-01T10:00:00+08:00")
    new = earned("e-new", "m-7", 20, 30, "2026-03-01T10:05:00+08:00")
    await consumer.process(records(old, new))
    # Recorded more than a day ago, and refused once more now.
    await pool.execute(
        "UPDATE notifications SET created_at = now() - interval '25 hours'"
        " WHERE notification_id = 'e-old'"
    )
    rec.fail_once.add("e-old")
    async with httpx.AsyncClient(timeout=10.0) as client:
        await deliverer.deliver_once(client)
        assert (
            await pool.fetchval("SELECT status FROM notifications WHERE notification_id = 'e-old'")
            == "failed"
        )
        await deliverer.deliver_once(client)  # the member's next one is no longer held back
    assert [b["notification_id"] for b in rec.received] == ["e-new"]


async def test_one_members_backlog_behind_a_retry_does_not_hold_up_other_members(
    env: Any,
) -> None:
    # A member's backlog (a webhook outage, say) waits behind its first notification's
    # back-off with its old due times; a round used to pick its candidates from those and
    # deliver nothing to anyone until that back-off ended.
    _, consumer, deliverer, rec = env
    backlog = [earned(f"a-{i:03}", "m-1", 1, i + 1, "2026-03-01T10:00:00+08:00")
               for i in range(60)]  # fmt: skip
    await consumer.process(records(*backlog))
    rec.fail_once.add("a-000")
    async with httpx.AsyncClient(timeout=10.0) as client:
        await deliverer.deliver_once(client)  # a-000 refused: the other 59 wait behind it
        assert rec.received == []
        await consumer.process(records(earned("b-1", "m-2", 5, 5, "2026-03-01T10:01:00+08:00")))
        await deliverer.deliver_once(client)
    assert [b["notification_id"] for b in rec.received] == ["b-1"]


async def test_a_retry_waits_its_back_off_from_the_failure_not_from_the_rounds_start(
    env: Any,
) -> None:
    # The round's posts run inside its transaction, whose now() is its start: a receiver
    # that took longer than the back-off to refuse was retried at once.
    pool, consumer, deliverer, _ = env
    await consumer.process(records(earned("s-1", "m-9", 1, 1, "2026-03-01T10:00:00+08:00")))

    async def slow_refusal(client: httpx.AsyncClient, row: asyncpg.Record) -> Failure:
        await asyncio.sleep(2.5)
        return Failure("HTTP 503", time.monotonic())

    deliverer._post = slow_refusal  # type: ignore[method-assign]
    async with httpx.AsyncClient(timeout=10.0) as client:
        await deliverer.deliver_once(client)
    wait = await pool.fetchval(
        "SELECT extract(epoch FROM next_attempt_at - clock_timestamp()) FROM notifications"
        " WHERE notification_id = 's-1'"
    )
    assert 1.5 < wait <= 2.0  # the first back-off (2 s), counted from the refusal


async def test_a_warning_whose_points_lapse_while_it_waits_for_a_retry_is_dropped(
    env: Any,
) -> None:
    # Recorded in time, refused, and retried (for up to NOTIFIER_GIVE_UP_HOURS) after the
    # lot lapsed: the member was told "您有800积分将于…过期，请尽快使用。" about points gone.
    pool, consumer, deliverer, rec = env
    lapse = datetime.now(UTC) + timedelta(seconds=1)
    after = earned("x-2", "m-x", 10, 10, "2026-03-01T10:05:00+08:00")
    await consumer.process(records(expiring("x-1", "m-x", 800, lapse), after))
    dropped = DELIVERED.labels("expired_before_warning")._value.get()
    rec.fail_once.add("x-1")
    async with httpx.AsyncClient(timeout=10.0) as client:
        await deliverer.deliver_once(client)  # x-1 refused; x-2 waits behind its retry
        assert rec.received == []
        await asyncio.sleep((lapse - datetime.now(UTC)).total_seconds() + 0.1)
        await pool.execute("UPDATE notifications SET next_attempt_at = now()"
                           " WHERE status = 'pending'")  # fmt: skip
        await deliverer.deliver_once(client)
    # Dropped, not failed or given up, and the member's next one is no longer held back.
    assert [b["notification_id"] for b in rec.received] == ["x-2"]
    status = "SELECT notification_id, status FROM notifications ORDER BY seq"
    assert [tuple(r) for r in await pool.fetch(status)] == [
        ("x-1", "skipped"),
        ("x-2", "delivered"),
    ]
    assert DELIVERED.labels("expired_before_warning")._value.get() == dropped + 1
