"""Notifications reach the clinic's webhook once each, signed, in zh-CN."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import pytest
from starlette.requests import Request
from starlette.responses import Response

from schemas.ledger import parse_ledger_event
from services.notifier import signing
from tests.integration.direct import webhook
from tests.integration.events import CST, purchase
from tests.integration.harness import Stack, make_stack, wait_until

pytestmark = pytest.mark.integration
SECRET = "test-webhook-secret"


class Receiver:
    """A webhook endpoint that fails the first call, to prove delivery is retried."""

    def __init__(self) -> None:
        self.received: list[tuple[dict, str | None, bool]] = []
        self.calls = 0

    async def hook(self, request: Request) -> Response:
        self.calls += 1
        body = await request.body()
        if self.calls == 1:
            return Response(status_code=503)
        stamp = request.headers.get("x-loyalty-timestamp")
        signature = request.headers.get("x-loyalty-signature")
        self.received.append(
            (
                json.loads(body),
                signature,
                signing.verify(SECRET, stamp, body, signature, time.time()),
            )
        )
        return Response(status_code=204)


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    rec = Receiver()
    async with webhook(rec.hook) as url:
        yield rec, url


@pytest.fixture
async def notifying_stack(
    broker: str, broker_name: str, fresh_database: str, receiver: tuple[Receiver, str]
) -> AsyncIterator[Stack]:
    _, url = receiver
    s = await make_stack(
        broker,
        fresh_database,
        broker_name,
        {
            "NOTIFIER_WEBHOOK_URL": url,
            "NOTIFIER_WEBHOOK_SECRET": SECRET,
        },
    )
    try:
        await s.wait_ready()
        yield s
    finally:
        s.stop_all()


async def test_points_and_tier_change_are_delivered_once_signed(
    notifying_stack: Stack, receiver: tuple[Receiver, str]
) -> None:
    rec, _ = receiver
    now = datetime.now(CST)
    crossing = purchase("m-note", "10000.00", now - timedelta(hours=1))
    await notifying_stack.produce([crossing, crossing])  # redelivered: still one of each

    async def delivered() -> int:
        return await notifying_stack.scalar(
            "SELECT count(*) FROM notifications WHERE status = 'delivered'"
        )

    # base 10,000, first purchase 200 (the largest bonus), and silver: three notifications.
    await wait_until(lambda: _at_least(delivered, 3), timeout=60, what="three deliveries")
    kinds = sorted(b["kind"] for b, _, _ in rec.received)
    assert kinds == ["points_earned", "points_earned", "tier_changed"]
    assert all(signed for _, _, signed in rec.received)  # timestamp and body, fresh
    messages = {b["message"] for b, _, _ in rec.received}
    assert "恭喜您由普通会员升级为银卡会员！" in messages
    assert "您获得10000积分（消费积分），当前可用积分10000。" in messages
    # Each carries the ledger event as published, still a valid contract event.
    events = [parse_ledger_event(json.dumps(b["event"])) for b, _, _ in rec.received]
    assert sorted(e.type for e in events) == kinds
    assert {e.member_id for e in events} == {"m-note"}
    ids = [b["notification_id"] for b, _, _ in rec.received]
    assert len(ids) == len(set(ids))
    assert await notifying_stack.scalar("SELECT count(*) FROM notifications") == 3


async def _at_least(probe, n: int) -> bool:  # type: ignore[no-untyped-def]
    return (await probe()) >= n


async def test_without_a_webhook_notifications_are_recorded_as_skipped(stack: Stack) -> None:
    now = datetime.now(CST)
    crossing = purchase("m-quiet", "10000.00", now - timedelta(hours=1))
    await stack.produce([crossing, crossing])  # redelivered: still one of each

    async def recorded() -> int:
        return await stack.scalar("SELECT count(*) FROM notifications WHERE member_id = 'm-quiet'")

    await wait_until(lambda: _at_least(recorded, 3), timeout=60, what="three notifications")
    statuses = await stack.scalar(
        "SELECT array_agg(DISTINCT status) FROM notifications WHERE member_id = 'm-quiet'"
    )
    assert statuses == ["skipped"]
    assert await recorded() == 3

    # The same ledger events delivered to the notifier again: recorded once, none refused.
    ledger = stack.topics.ledger
    records = await stack.read_topic(ledger, expect=3)
    await stack.produce([json.loads(r.value) for r in records], topic=ledger)

    async def consumed() -> bool:
        n = await stack.scalar(
            "SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets"
            " WHERE topic = $1 AND consumer LIKE '%notifier'",
            ledger,
        )
        return bool(n >= 2 * len(records))

    await wait_until(consumed, timeout=60, what="the notifier to consume the re-sent events")
    assert await recorded() == 3
    assert await stack.scalar("SELECT count(*) FROM dead_letters") == 0
